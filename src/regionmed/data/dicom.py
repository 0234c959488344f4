"""PHI-safe DICOM pixel reading (pydicom, imported lazily): the library's one DICOM reader.

Used by the dataset builder (:mod:`regionmed.apps.curation.dicom` wraps it) and by
inference (:func:`regionmed.inference.load_image`). Only an allow-list of
non-identifying attributes (:data:`ALLOWED_ATTRIBUTES`) leaves this module; patient,
study, institution and date attributes are never read into results, messages or
logs. The one exception is PatientID, which leaves only as a salted hash
(:func:`patient_key`), for the builder's patient grouping.

Errors are :class:`DicomError` with a ``reason`` (``unreadable_image``,
``unsupported_dicom``, ``decompression_bomb``: the builder's reject reasons) and a
detail that never quotes an attribute value other than sizes, frame counts, the
photometric interpretation and the transfer syntax name.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from regionmed.data.missing import MISSING_SPELLINGS, PLACEHOLDER_IDS, is_placeholder_id
from regionmed.errors import RegionmedError

# The only DICOM attributes that may flow into records or results (as ``meta``).
ALLOWED_ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
)

_UNCOMPRESSED = {
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
}

# PatientID values that identify nobody (anonymisers' placeholders): treated as absent,
# so that they do not merge every file of an export into one patient group
# (:func:`regionmed.data.missing.is_placeholder_id`, the same rule as a table's patient column).
PLACEHOLDER_PATIENT_IDS = PLACEHOLDER_IDS | MISSING_SPELLINGS | {"-"}
PATIENT_SALT = "regionmed-dicom-patient-v1"
DICOM_SUFFIXES = (".dcm", ".dicom")


class DicomError(RegionmedError, ValueError):
    """A DICOM file whose pixels cannot be used.

    ``reason``: ``"unreadable_image"`` (not DICOM, pixel data that cannot be decoded),
    ``"unsupported_dicom"`` (multi-frame, no pixel data, no size, an unsupported
    photometric interpretation or transfer syntax) or ``"decompression_bomb"`` (more
    pixels than allowed); ``detail``: what was found (never an identifier)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DicomImage:
    """A decoded DICOM file: ``array`` uint8 (H, W) or (H, W, 3); ``meta`` the
    allow-listed attributes plus ``decode_mapping`` (how stored values became 8-bit);
    ``spacing`` (row mm, column mm) or None; ``patient_key`` a salted hash of
    PatientID (None when absent or a placeholder) — never the identifier itself."""

    array: np.ndarray
    meta: dict[str, Any]
    spacing: tuple[float, float] | None
    patient_key: str | None


def is_dicom(raw: bytes, path: str | None = None) -> bool:
    """True for the DICOM part-10 magic (``DICM`` at byte 128) or a ``.dcm`` / ``.dicom`` name."""
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        return True
    return bool(path) and str(path).lower().endswith(DICOM_SUFFIXES)


def patient_key(ds) -> str | None:
    """``"dicom/patient/<32 hex>"``: a salted SHA-256 of the dataset's PatientID, or None
    when it is absent, blank or a placeholder (:func:`regionmed.data.missing.is_placeholder_id`:
    a missing value, an anonymiser's placeholder, or all zeros). The identifier itself is never returned, stored or logged."""
    value = ds.get("PatientID")
    text = str(value if value is not None else "").strip()
    if is_placeholder_id(text):
        return None
    digest = hashlib.sha256(f"{PATIENT_SALT}\x00{text}".encode("utf-8")).hexdigest()[:32]
    return "dicom/patient/" + digest


def _pydicom():
    try:
        import pydicom  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("DICOM input needs pydicom: pip install 'regionmed[build]' (or pip install pydicom)") from err
    return pydicom


def _first(value: Any) -> float | None:
    if value is None:
        return None
    try:
        if hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def allowed_meta(ds) -> dict[str, Any]:
    """The :data:`ALLOWED_ATTRIBUTES` present in ``ds`` (strings cut to 64 characters)."""
    meta: dict[str, Any] = {}
    for name in ALLOWED_ATTRIBUTES:
        value = ds.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, (int, float)):
            meta[name] = value
        else:
            text = str(value).strip()[:64]
            if text:
                meta[name] = text
    return meta


#: Photometric interpretations read (PS3.3 C.7.6.3.1.2). YBR_FULL and YBR_FULL_422 are converted to
#: RGB by pydicom (``convert_color_space``), PALETTE COLOR through its palette (``apply_color_lut``).
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")


def read_dicom(raw: bytes, max_pixels: int, window: str = "auto") -> DicomImage:
    """Decode a single-frame DICOM file into 8-bit display values; raise :class:`DicomError`.

    Grey images go through the grayscale pipeline of DICOM PS3.4 N.2 / PS3.3 C.11, in the
    standard's order (:func:`display_values`): stored values (Bits Stored, High Bit, Pixel
    Representation) → Modality LUT → VOI LUT → Presentation LUT (or MONOCHROME1's
    inversion). ``window``: ``"auto"`` (the file's VOI LUT: its VOI LUT Sequence, else its
    first Window Center/Width with its VOI LUT Function, else min–max of the modality
    values) or ``"minmax"`` (min–max of the modality values, whatever the file says).
    Colour images (:data:`COLOUR`) become RGB with pydicom's conversions, scaled by their
    Bits Stored (palette entries by the palette's bit depth). What was done is recorded in
    ``meta["decode_mapping"]``.
    """
    pydicom = _pydicom()
    from pydicom.pixels import pixel_array

    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    except Exception as err:  # noqa: BLE001
        raise DicomError("unreadable_image", f"not a readable DICOM file ({type(err).__name__})") from err
    if "PixelData" not in ds:
        raise DicomError("unsupported_dicom", "no pixel data")
    frames = int(_first(ds.get("NumberOfFrames")) or 1)
    if frames > 1:
        raise DicomError("unsupported_dicom", f"multi-frame DICOM ({frames} frames)")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREY + COLOUR:
        raise DicomError("unsupported_dicom", f"photometric interpretation {photometric[:32]}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DicomError("unsupported_dicom", "no image size")
    if rows * cols > max_pixels:
        raise DicomError("decompression_bomb", f"{cols}x{rows} = {cols * rows:,} pixels, more than the limit of {max_pixels:,} (the builder's max_image_pixels, the commands' --max-pixels)")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    tsyntax_name = getattr(tsyntax, "name", str(tsyntax)) if tsyntax else "unknown"
    try:
        arr = _stored_values(ds, pixel_array)
    except DicomError:
        raise
    except Exception as err:  # noqa: BLE001
        if tsyntax is not None and str(tsyntax) not in _UNCOMPRESSED:
            raise DicomError("unsupported_dicom", f"transfer syntax {tsyntax_name} cannot be decoded here") from err
        raise DicomError("unreadable_image", f"DICOM pixel data cannot be decoded ({type(err).__name__})") from err
    if photometric in COLOUR:
        out, mapping = _colour(arr, ds, photometric)
    else:
        if arr.ndim != 2:
            raise DicomError("unsupported_dicom", f"pixel array of shape {arr.shape}")
        out, mapping = display_values(arr, ds, window)
    img = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
    spacing = None
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(name)
        if value is not None and len(value) == 2:
            try:
                spacing = (float(value[0]), float(value[1]))
                break
            except (TypeError, ValueError):
                pass
    meta = allowed_meta(ds)
    meta["decode_mapping"] = mapping
    return DicomImage(img, meta, spacing, patient_key(ds))


def _stored_values(ds, pixel_array) -> np.ndarray:
    """The stored values (PS3.5 8.1.1, PS3.3 C.7.6.3.1): the Bits Stored bits that end at
    High Bit, signed (two's complement) when Pixel Representation is 1. pydicom's decoders
    mask and sign-extend Bits Stored bits that end at bit Bits Stored - 1; a file whose High
    Bit lies higher (allowed by older IODs) is read with the bits up to High Bit and shifted
    down. Colour data come back as RGB for YBR_FULL / YBR_FULL_422 (pydicom's
    ``convert_color_space``, through ``as_rgb``), palette indices for PALETTE COLOR."""
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    high_bit = int(ds.get("HighBit") if ds.get("HighBit") is not None else bits_stored - 1)
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    shift = high_bit - (bits_stored - 1)
    if bits_stored <= 0 or shift < 0 or (bits_allocated and high_bit >= bits_allocated):
        raise DicomError("unsupported_dicom", f"Bits Stored {bits_stored} with High Bit {high_bit} "
                                              f"(Bits Allocated {bits_allocated}) do not fit")
    if not shift:
        return np.asarray(pixel_array(ds, as_rgb=True))
    ds.BitsStored = high_bit + 1  # read the bits up to High Bit, then drop the unused low ones
    try:
        arr = np.asarray(pixel_array(ds, as_rgb=True))
    finally:
        ds.BitsStored = bits_stored
    return np.right_shift(arr, shift)  # arithmetic for signed data: the sign is kept


def _colour(arr: np.ndarray, ds, photometric: str) -> tuple[np.ndarray, str]:
    """RGB values in [0, 1] of a colour image (:data:`COLOUR`), with the mapping in words."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        if arr.ndim != 2:
            raise DicomError("unsupported_dicom", f"PALETTE COLOR data of shape {arr.shape}")
        try:
            rgb = np.asarray(apply_color_lut(arr, ds), dtype=np.float64)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as err:  # noqa: BLE001 - a palette that is missing or malformed
            raise DicomError("unsupported_dicom", f"PALETTE COLOR without a usable palette ({type(err).__name__})") from err
        return rgb[..., :3] / (2.0**bits - 1), f"PALETTE COLOR through its {bits}-bit palette -> RGB"
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DicomError("unsupported_dicom", f"{photometric} data of unexpected shape {arr.shape}")
    bits = int(ds.get("BitsStored", 8) or 8)
    how = "RGB" if photometric == "RGB" else f"{photometric} converted to RGB"
    return arr.astype(np.float64) / (2.0**bits - 1), f"{how}, {bits} bits stored -> 0..255"


def display_values(arr: np.ndarray, ds, window: str = "auto") -> tuple[np.ndarray, str]:
    """The grey display values of stored values ``arr`` (H, W), in [0, 1] (0 black), and the
    mapping in words: DICOM's grayscale pipeline (PS3.4 N.2), in its order, with pydicom's
    functions:

    1. Modality LUT (PS3.3 C.11.1): Rescale Slope/Intercept or a Modality LUT Sequence
       (``apply_modality_lut``).
    2. VOI LUT (C.11.2), with ``window="auto"``: a VOI LUT Sequence, else Window Center /
       Width with the VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID; ``apply_voi_lut``).
       With several windows or LUTs (alternative views) the first is used, the default
       view. Its output is scaled by the output range of the transform itself (0 .. 2^n - 1
       for a LUT of n-bit entries; what the window function gives far below and far above
       the window), not by the image's own extremes. Without one (or with
       ``window="minmax"``, or a window the standard does not allow, e.g. a width < 1 for
       LINEAR), the min–max of the modality values.
    3. Presentation LUT (C.11.4): a Presentation LUT Sequence or Presentation LUT Shape
       IDENTITY / INVERSE (``apply_presentation_lut``) gives the polarity; without one,
       MONOCHROME1 (minimum shown white, C.7.6.3.1.2) is inverted. A file with both
       MONOCHROME1 and a Presentation LUT Shape is inverted once, by the shape (the DX IOD
       requires INVERSE with MONOCHROME1: C.8.11.7.1.1).

    Raises :class:`DicomError` (``unsupported_dicom``) for a Modality LUT or Presentation
    LUT that cannot be applied."""
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut, apply_voi_lut, apply_windowing

    steps = []
    try:
        modality = apply_modality_lut(arr, ds)
    except Exception as err:  # noqa: BLE001 - a malformed Modality LUT Sequence
        raise DicomError("unsupported_dicom", f"Modality LUT cannot be applied ({type(err).__name__})") from err
    if ds.get("ModalityLUTSequence"):
        steps.append("Modality LUT sequence")
    elif ds.get("RescaleSlope") is not None or ds.get("RescaleIntercept") is not None:
        steps.append(f"rescale x{_first(ds.get('RescaleSlope')) or 1:g} {_first(ds.get('RescaleIntercept')) or 0:+g}")
    out, voi = None, ""
    has_lut = bool(ds.get("VOILUTSequence")) and ds.VOILUTSequence[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if window == "auto" and (has_lut or has_window):
        try:
            if has_lut:
                # the LUT is indexed by integers: modality values are rounded (pydicom: "a modality
                # LUT or rescale operation ... must be applied before")
                values = np.rint(modality).astype(np.int64) if np.issubdtype(modality.dtype, np.floating) else modality
                descriptor = ds.VOILUTSequence[0].LUTDescriptor
                bits = int(descriptor[2])
                lo, hi = 0.0, 2.0**bits - 1
                if bits == 8:  # pydicom 3.0 indexes an 8-bit LUT with uint8 indices (wrapping past 255
                    descriptor[2] = 16  # entries); each entry is in a 16-bit word either way
                voi_out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)
                n = len(ds.VOILUTSequence)
                voi = "VOI LUT sequence" + (f" (the first of {n})" if n > 1 else "")
            else:
                center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
                function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
                far = 1e3 * abs(width or 1) + 1  # the window function's output range, from its own ends
                with np.errstate(over="ignore"):
                    lo, hi = (float(v) for v in apply_windowing(np.array([center - far, center + far]), ds, index=0))
                voi_out = np.asarray(apply_windowing(modality, ds, index=0), dtype=np.float64)
                n = len(ds["WindowCenter"].value) if ds["WindowCenter"].VM > 1 else 1
                voi = f"window C={center:g} W={width:g} {function}" + (f" (the first of {n})" if n > 1 else "")
            if not hi > lo:
                raise ValueError("empty output range")
            out = (voi_out - lo) / (hi - lo)
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
            voi = f"VOI LUT not usable ({str(err)[:80]}): "
            out = None
    if out is None:
        data = np.asarray(modality, dtype=np.float64)
        lo, hi = float(data.min()), float(data.max())
        out = np.zeros_like(data) if hi <= lo else (data - lo) / (hi - lo)
        voi = (voi if voi.startswith("VOI LUT not usable") else "") + f"min-max {lo:g}..{hi:g}"
    steps.append(voi)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if ds.get("PresentationLUTSequence") or ds.get("PresentationLUTShape") is not None:
        # The range's ends go in with the values, so that pydicom's input scaling (by the
        # array's own min and max) and its INVERSE (max - value) work on the range, not on the image.
        ends = np.concatenate([np.clip(out, 0.0, 1.0).ravel(), [0.0, 1.0]])
        try:
            p_values = np.asarray(apply_presentation_lut(ends, ds), dtype=np.float64)[:-2].reshape(out.shape)
        except Exception as err:  # noqa: BLE001 - a shape other than IDENTITY/INVERSE, a malformed LUT
            raise DicomError("unsupported_dicom", f"Presentation LUT cannot be applied ({type(err).__name__}: "
                                                  f"{str(err)[:80]})") from err
        if ds.get("PresentationLUTSequence"):
            bits = int(ds.PresentationLUTSequence[0].LUTDescriptor[2])
            out = p_values / (2.0**bits - 1)
            steps.append("Presentation LUT sequence")
        else:
            out = p_values
            steps.append(f"Presentation LUT Shape {str(ds.PresentationLUTShape).strip().upper()}")
    elif photometric == "MONOCHROME1":
        out = 1.0 - np.clip(out, 0.0, 1.0)
        steps.append("MONOCHROME1 inverted")
    return out, "DICOM " + "; ".join(steps) + " -> 0..255"
