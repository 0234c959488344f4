"""Image decoding: the one function that turns an encoded image into regionmed pixels.

Every path that decodes an image file or encoded bytes — the dataset builder, the
shard reader, evaluation — calls :func:`decode_image`; preprocessing of an image
that is already decoded uses the same mode conversion (:func:`to_8bit`). The
rules (also in :data:`DECODING_POLICY`, which the builder writes into a dataset's
provenance):

* **Orientation.** The EXIF Orientation tag (274) is applied once, with
  Pillow's :func:`PIL.ImageOps.exif_transpose`: width, height and every pixel
  coordinate (boxes included) are those of the image as a viewer displays it, and
  the returned image carries no orientation tag (so applying it again is a no-op).
  The MedRegion shard format stores upright pixels without an orientation tag
  (:func:`check_stored_image`), so the shard reader decodes the stored grid as is.
* **Modes.** The result is always 8-bit ``"L"`` or ``"RGB"``:

  ========================  ====================================================
  input                     result
  ========================  ====================================================
  ``L``, ``RGB``            unchanged
  ``1`` (bilevel)           ``L``, 0 / 255
  ``I;16*``, ``I``, ``F``   ``L`` by a per-image **min–max** linear map of the
                            finite values (lowest → 0, highest → 255, rounded;
                            a constant image → 0; NaN → 0, ±inf → 255 / 0); the
                            range used is recorded (``"min-max 312..3901 -> 0..255"``)
  ``P`` (palette)           expanded through its palette: ``L`` when every pixel
                            is gray (R = G = B), else ``RGB``
  alpha (``LA``, ``RGBA``,  composited over a black background (``background``:
  ``PA``, a ``tRNS`` key)   ``"black"`` or ``"white"``): ``L`` for gray inputs,
                            ``RGB`` otherwise
  ``CMYK``                  ``RGB`` by Pillow's conversion (no colour management:
                            an embedded ICC profile is not applied)
  others (``YCbCr``,        ``RGB`` by Pillow's conversion
  ``LAB``, ``HSV``)
  ========================  ====================================================

  A 16-bit RGB PNG (which Pillow reads as 8-bit ``RGB``, keeping the high byte) is
  ``RGB`` too; its bytes are never stored as they are (``as_is`` is False).
* **Several frames** (multi-page TIFF, animated GIF): the first frame; the number
  of frames is reported.

Errors are :class:`ImageDecodeError` with a ``reason`` (``unreadable_image``,
``truncated_image``, ``decompression_bomb``) and a message naming the input.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from regionmed.data.metadata import has_metadata, strip_info
from regionmed.errors import RegionmedError

DECODING_POLICY = (
    "EXIF orientation applied (Pillow exif_transpose); stored images are 8-bit L or RGB: 16-bit/integer/float "
    "-> L by per-image min-max over finite values (range recorded in record meta decode_mapping); palette expanded "
    "(L if all gray, else RGB); alpha composited over black; CMYK -> RGB by Pillow (no colour management); "
    "multi-frame: first frame"
)
BACKGROUNDS = {"black": 0, "white": 255}
# The default most pixels (width x height) of an input image for the inference library, its
# commands and `regionmed serve` (64 Mi pixels); here so that they share it without torch.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
ORIENTATION_TAG = 0x0112
_HIGH_BIT_MODES = ("I", "F")  # every I;16* mode starts with "I"
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageDecodeError(RegionmedError, ValueError):
    """An input that cannot be decoded as an image.

    ``reason``: ``"unreadable_image"`` (missing, empty, not an image, decoder
    failure), ``"truncated_image"`` (data ends early) or ``"decompression_bomb"``
    (declares more pixels than allowed); ``detail``: what was found; ``where``:
    the input's name (a path, ``shard:key``), when the caller gave one.
    """

    def __init__(self, reason: str, detail: str, where: str | None = None):
        super().__init__(f"{where}: {reason}: {detail}" if where else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.where = where


def _read(src: Any, where: str | None) -> tuple[bytes, str | None]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        raw = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        where = where or str(src)
        try:
            with open(src, "rb") as fh:
                raw = fh.read()
        except OSError as err:
            raise ImageDecodeError("unreadable_image", f"cannot read file ({err.strerror or type(err).__name__})", where) from err
    elif hasattr(src, "read"):
        raw = src.read()
    else:
        raise TypeError(f"decode_image takes bytes, a path or a binary file, not {type(src).__name__}")
    if not raw:
        raise ImageDecodeError("unreadable_image", "empty file", where)
    return raw, where


def _png_depth(raw: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk, or None for another format."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and len(raw) >= 26:
        return raw[24], raw[25]
    return None


def _orientation(img: Image.Image, header_only: bool = False) -> int:
    """The EXIF Orientation value (1 when absent or unreadable). ``header_only``: do not
    let Pillow decode a PNG's pixels to look for an eXIf chunk after the image data."""
    if header_only and (img.format or "").upper() == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # noqa: BLE001 - a malformed EXIF block means no usable orientation
        return 1


def _bomb_detail(err: Exception, max_pixels: int | None, size: tuple[int, int] | None = None) -> str:
    """The numbers of a refused declared size: Pillow's decompression-bomb error says the
    pixel count (``Image size (N pixels) exceeds limit of M pixels``) before the image is
    opened; ``size``: (w, h) when known."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(err))
    pixels = size[0] * size[1] if size else int(found.group(1)) if found else None
    pillow_limit = int(found.group(2)) if found else None
    limit = max_pixels if max_pixels is not None and (pixels is None or pixels > max_pixels) else pillow_limit
    said = f"{size[0]}x{size[1]} = " if size else ""
    count = f"{said}{pixels:,} pixels" if pixels is not None else "a declared size"
    bound = f"the limit of {limit:,}" if limit is not None else "the decoder's limit"
    return (f"declared size of {count}, more than {bound} (the builder's max_image_pixels, the commands' "
            "--max-pixels; Pillow refuses twice its MAX_IMAGE_PIXELS whatever the limit)")


def _open(raw: bytes, max_pixels: int | None, where: str | None) -> Image.Image:
    """Open and fully decode ``raw`` (header checks first), converting Pillow's errors."""
    with warnings.catch_warnings():
        bomb = "error" if max_pixels is None or max_pixels <= (Image.MAX_IMAGE_PIXELS or 0) else "ignore"
        warnings.simplefilter(bomb, Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageDecodeError("decompression_bomb", _bomb_detail(err, max_pixels), where) from err
        except Exception as err:  # noqa: BLE001 - Pillow raises many types
            raise ImageDecodeError("unreadable_image", f"not a decodable image ({type(err).__name__})", where) from err
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError("unreadable_image", "zero-sized image", where)
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError("decompression_bomb", f"{w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} (the builder's max_image_pixels, the commands' --max-pixels)", where)
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageDecodeError("decompression_bomb", _bomb_detail(err, max_pixels, img.size), where) from err
        except Exception as err:  # noqa: BLE001
            if "truncated" in str(err).lower() or "broken data stream" in str(err).lower():
                raise ImageDecodeError("truncated_image", "image data ends early", where) from err
            raise ImageDecodeError("unreadable_image", f"decode failed ({type(err).__name__}: {err})", where) from err
    return img


def _minmax(img: Image.Image) -> tuple[Image.Image, str]:
    arr = np.asarray(img).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", img.size, 0), "min-max: no finite value -> 0"
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(np.isnan(arr), lo, np.clip(arr, lo, hi))  # NaN -> 0, +inf -> 255, -inf -> 0
    scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L"), f"min-max {lo:g}..{hi:g} -> 0..255"


def _gray_if_gray(rgb: Image.Image) -> Image.Image:
    arr = np.asarray(rgb)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]), "L")
    return rgb


def to_8bit(image: Image.Image, background: str = "black") -> tuple[Image.Image, str]:
    """``(image in mode "L" or "RGB", mapping)`` by the rules in the module docstring.

    ``mapping`` states what was done (``""`` when the image already was L/RGB
    without transparency). Orientation is not touched: this converts pixels that
    are already decoded (:func:`decode_image` calls it after orienting).
    Raises ``ValueError`` for an unknown ``background``.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} is not one of {sorted(BACKGROUNDS)}")
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image, ""
    if mode == "1":
        return image.convert("L"), "bilevel -> L 0/255"
    if mode.startswith(_HIGH_BIT_MODES):
        return _minmax(image)
    if mode == "P":
        has_alpha = "transparency" in image.info or (image.palette is not None and image.palette.mode == "RGBA")
        if has_alpha:
            out, how = _composite(image.convert("RGBA"), background)
            return _gray_if_gray(out), "palette " + how
        return _gray_if_gray(image.convert("RGB")), "palette expanded"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("LA" if mode in ("L", "LA", "La") else "RGBA")
        return _composite(rgba, background)
    if mode == "CMYK":
        return image.convert("RGB"), "CMYK -> RGB (Pillow, no colour management)"
    return image.convert("RGB"), f"{mode} -> RGB (Pillow)"


def _composite(image: Image.Image, background: str) -> tuple[Image.Image, str]:
    """``image`` in LA or RGBA composited over the background (alpha 0 -> background)."""
    if image.mode == "La":
        image = image.convert("LA")
    if image.mode == "RGBa":
        image = image.convert("RGBA")
    base_mode = "L" if image.mode == "LA" else "RGB"
    bg = Image.new(image.mode, image.size, (BACKGROUNDS[background],) * (len(image.mode) - 1) + (255,))
    out = Image.alpha_composite(bg, image) if image.mode == "RGBA" else _composite_la(bg, image)
    return out.convert(base_mode), f"alpha composited over {background}"


def _composite_la(bg: Image.Image, image: Image.Image) -> Image.Image:
    arr = np.asarray(image, dtype=np.float64)
    a = arr[..., 1] / 255.0
    value = arr[..., 0] * a + np.asarray(bg, dtype=np.float64)[..., 0] * (1 - a)
    return Image.fromarray(np.round(value).astype(np.uint8), "L")


def decode_image(
    src: bytes | str | os.PathLike | Any,
    *,
    max_pixels: int | None = None,
    background: str = "black",
    exif_orientation: bool = True,
    where: str | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Decode an encoded image into 8-bit ``"L"`` or ``"RGB"`` pixels, displayed upright.

    ``src``: encoded bytes, a path, or a binary file object (JPEG, PNG, TIFF, BMP,
    GIF, WebP, ... — anything Pillow opens; DICOM is decoded by the dataset builder).
    ``max_pixels``: the most pixels the header may declare (``None``: Pillow's
    decompression-bomb limit). ``background``: what transparent pixels become
    (``"black"`` or ``"white"``). ``exif_orientation``: apply the EXIF Orientation
    tag (True everywhere except for MedRegion shard members, which are upright by
    format). ``where``: the input's name for error messages (a path names itself).

    Returns ``(image, info)``; ``info`` holds ``format`` (Pillow's name),
    ``stored_size`` (w, h as encoded), ``size`` (w, h as returned, after
    orientation), ``mode`` (the decoded mode, e.g. ``"I;16"``), ``bits`` (bits per
    sample when known), ``orientation`` (1–8, the EXIF value found; applied when
    ``exif_orientation``), ``mapping`` (the mode conversion done, ``""`` for none),
    ``frames`` and ``as_is`` (True when the encoded bytes are a single-frame 8-bit
    L/RGB JPEG or PNG without transparency, already upright and without metadata, i.e.
    storing them unchanged stores exactly the returned pixels and nothing else:
    :func:`regionmed.data.metadata.has_metadata`) and ``as_is_stripped`` (True when only
    their metadata stands in the way: :func:`regionmed.data.metadata.strip_metadata` of the
    bytes stores exactly the returned pixels). The image carries no metadata (its
    ``info`` is empty: :mod:`regionmed.data.metadata`). Raises :class:`ImageDecodeError`.
    """
    raw, where = _read(src, where)
    img = _open(raw, max_pixels, where)
    fmt = (img.format or "").upper()
    mode = img.mode
    stored_size = img.size
    frames = int(getattr(img, "n_frames", 1) or 1)
    png = _png_depth(raw)
    bits = png[0] if png else (16 if mode.startswith("I;16") else 32 if mode in ("I", "F") else 1 if mode == "1" else 8)
    orientation = _orientation(img)
    if exif_orientation and orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as err:  # noqa: BLE001
            raise ImageDecodeError("unreadable_image", f"EXIF orientation {orientation} cannot be applied ({type(err).__name__})", where) from err
    img, mapping = to_8bit(img, background)
    strip_info(img)  # pixels only: no EXIF, text chunk, comment or ICC profile leaves the decoder
    pixels_as_is = (fmt in ("JPEG", "PNG") and not mapping and bits == 8 and frames == 1
                    and (orientation == 1 or not exif_orientation) and (png is None or png[1] in (0, 2)))
    metadata = pixels_as_is and has_metadata(raw)
    info = {"format": fmt, "stored_size": stored_size, "size": img.size, "mode": mode, "bits": bits,
            "orientation": orientation, "mapping": mapping, "frames": frames, "as_is": pixels_as_is and not metadata,
            "as_is_stripped": bool(metadata)}
    return img, info


def record_meta(info: dict[str, Any], exif_orientation: bool = True) -> dict[str, str | int]:
    """The non-trivial parts of a :func:`decode_image` ``info`` as flat record metadata:
    ``decode_orientation`` (EXIF value applied), ``decode_mode`` (the decoded mode when
    it was not 8-bit L/RGB), ``decode_mapping`` (the conversion), ``decode_frames``
    (frames in the file, when more than one; the first was used)."""
    meta: dict[str, str | int] = {}
    if exif_orientation and info.get("orientation", 1) != 1:
        meta["decode_orientation"] = int(info["orientation"])
    if info.get("mapping"):
        meta["decode_mode"] = str(info.get("mode", ""))
        meta["decode_mapping"] = str(info["mapping"])
    elif info.get("bits", 8) != 8:
        meta["decode_mode"] = f"{info.get('mode', '')} {info['bits']}-bit"
        meta["decode_mapping"] = f"{info['bits']}-bit samples -> 8-bit (Pillow)"
    if info.get("frames", 1) > 1:
        meta["decode_frames"] = int(info["frames"])
    return meta


def displayed_size(src: bytes | str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation 5–8 swaps them),
    from its header only (no pixel decoding). Raises :class:`ImageDecodeError`."""
    raw, where = _read(src, None)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            return (h, w) if _orientation(img, header_only=True) in (5, 6, 7, 8) else (w, h)
    except Exception as err:  # noqa: BLE001
        raise ImageDecodeError("unreadable_image", f"not a decodable image ({type(err).__name__})", where) from err


def check_stored_image(data: bytes, ext: str, width: int, height: int) -> str | None:
    """Why ``data`` breaks the MedRegion image promise, or None when it keeps it.

    The promise: a JPEG (``ext`` ``jpg``/``jpeg``) or PNG (``png``) of 8-bit L or
    RGB pixels, without transparency or an EXIF orientation other than 1, of
    exactly ``width`` × ``height`` pixels. Reads the header only.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as err:  # noqa: BLE001
        return f"not a decodable image ({type(err).__name__})"
    with img:
        fmt = (img.format or "").upper()
        want = "PNG" if ext.lower() == "png" else "JPEG"
        if fmt != want:
            return f"{fmt or 'unknown'} data in a .{ext} member"
        png = _png_depth(data)
        if img.mode not in ("L", "RGB") or (png is not None and (png[0] != 8 or png[1] not in (0, 2))):
            depth = f", {png[0]}-bit" if png else ""
            return f"mode {img.mode}{depth} (the format stores 8-bit L or RGB: decode with regionmed.data.decode.decode_image)"
        if "transparency" in img.info:
            return "a transparency key (the format stores opaque L or RGB)"
        orientation = _orientation(img, header_only=True)
        if orientation != 1:
            return f"EXIF orientation {orientation} (the format stores upright pixels)"
        if img.size != (width, height):
            return f"image is {img.size[0]}x{img.size[1]}, record says {width}x{height}"
    return None
