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
# so that they do not merge every file of an export into one patient group.
PLACEHOLDER_PATIENT_IDS = frozenset({
    "", "-", "0", "anon", "anonymous", "anonymized", "anonymised", "na", "n/a", "none", "null", "unknown",
    "removed", "patient", "noid", "no id", "xxx",
})
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
    when it is absent, blank or a placeholder (:data:`PLACEHOLDER_PATIENT_IDS`, or all
    zeros). The identifier itself is never returned, stored or logged."""
    value = ds.get("PatientID")
    text = str(value if value is not None else "").strip()
    if text.lower() in PLACEHOLDER_PATIENT_IDS or set(text) <= {"0"}:
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


def read_dicom(raw: bytes, max_pixels: int, window: str = "auto") -> DicomImage:
    """Decode a single-frame DICOM file into 8-bit pixels; raise :class:`DicomError`.

    ``window``: ``"auto"`` (VOI LUT sequence, else the first window centre/width,
    else min–max of the modality-LUT values), or ``"minmax"``. MONOCHROME1 is
    inverted; RGB is min–max scaled. The mapping used is recorded in
    ``meta["decode_mapping"]``.
    """
    pydicom = _pydicom()
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
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise DicomError("unsupported_dicom", f"photometric interpretation {photometric[:32]}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DicomError("unsupported_dicom", "no image size")
    if rows * cols > max_pixels:
        raise DicomError("decompression_bomb", f"{cols}x{rows} = {cols * rows:,} pixels, more than the limit of {max_pixels:,} (the builder's max_image_pixels, the commands' --max-pixels)")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    tsyntax_name = getattr(tsyntax, "name", str(tsyntax)) if tsyntax else "unknown"
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001
        if tsyntax is not None and str(tsyntax) not in _UNCOMPRESSED:
            raise DicomError("unsupported_dicom", f"transfer syntax {tsyntax_name} cannot be decoded here") from err
        raise DicomError("unreadable_image", f"DICOM pixel data cannot be decoded ({type(err).__name__})") from err
    if photometric == "RGB":
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise DicomError("unsupported_dicom", "RGB data of unexpected shape")
        out = arr.astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
        out = np.zeros_like(out) if hi <= lo else (out - lo) / (hi - lo)
        mapping = f"RGB min-max {lo:g}..{hi:g} -> 0..255"
    else:
        if arr.ndim != 2:
            raise DicomError("unsupported_dicom", f"pixel array of shape {arr.shape}")
        out, mapping = _window(arr, ds, window)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
            mapping += "; MONOCHROME1 inverted"
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


def _window(arr: np.ndarray, ds, window: str) -> tuple[np.ndarray, str]:
    """Modality LUT, then VOI LUT / window; return (values in [0, 1], the mapping in words)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = apply_modality_lut(arr, ds)
    data = modality.astype(np.float64)
    if window == "auto" and "VOILUTSequence" in ds:
        # The VOI LUT maps the modality LUT's output, not the stored values (DICOM PS3.3
        # C.11.2; pydicom's apply_voi_lut: "a modality LUT or rescale operation ... must be
        # applied before"); a LUT is indexed by integers, so rescaled values are rounded.
        if np.issubdtype(modality.dtype, np.floating):
            modality = np.rint(modality).astype(np.int64)
        voi = np.asarray(apply_voi_lut(modality, ds), dtype=np.float64)
        lo, hi = float(voi.min()), float(voi.max())
        return (np.zeros_like(voi) if hi <= lo else (voi - lo) / (hi - lo)), "DICOM VOI LUT sequence"
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if window == "auto" and center is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear window.
        low = center - 0.5 - (width - 1) / 2
        how = f"DICOM window C={center:g} W={width:g}"
        return (np.clip((data - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) if width > 1 else (data > low).astype(np.float64)), how
    lo, hi = float(data.min()), float(data.max())
    return (np.zeros_like(data) if hi <= lo else (data - lo) / (hi - lo)), f"min-max {lo:g}..{hi:g} -> 0..255"
