"""Image decoding with integrity checks, encoding for shards, and image hashes."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from regionmed.errors import RegionmedError

DEFAULT_MAX_PIXELS = 40_000_000


class ItemReject(RegionmedError):
    """An input that cannot go into the dataset; ``reason`` is a key of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class LoadedImage:
    image: Image.Image  # decoded, mode "L" or "RGB", full resolution
    data: bytes  # encoded bytes to store
    ext: str  # "jpg" or "png"
    meta: dict[str, Any] = field(default_factory=dict)  # allow-listed attributes (DICOM)
    pixel_spacing: tuple[float, float] | None = None  # (row mm, column mm)


def is_dicom(raw: bytes, path: str | None = None) -> bool:
    if len(raw) >= 132 and raw[128:132] == b"DICM":
        return True
    return bool(path) and str(path).lower().endswith((".dcm", ".dicom"))


def read_bytes(path: str | None, data: bytes | None) -> bytes:
    if data is not None:
        return data
    if not path:
        raise ItemReject("unreadable_image", "no image path")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ItemReject("unreadable_image", f"cannot read file ({err.strerror or type(err).__name__})") from err
    if not raw:
        raise ItemReject("unreadable_image", "empty file")
    return raw


def load_image(
    path: str | None = None,
    data: bytes | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    dicom_options: dict | None = None,
) -> LoadedImage:
    """Decode and check an image (JPEG/PNG/... or DICOM); raise :class:`ItemReject`.

    Encoded JPEG/PNG inputs in mode L/RGB are stored as they are (no re-encoding)
    unless ``max_side`` asks for a resize; anything else is stored as PNG.
    """
    raw = read_bytes(path, data)
    if is_dicom(raw, path):
        from regionmed.apps.curation.dicom import decode_dicom

        array, meta, spacing = decode_dicom(raw, max_pixels=max_pixels, **(dicom_options or {}))
        img = Image.fromarray(array)
        return _finish(img, None, None, meta, spacing, max_side)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ItemReject("decompression_bomb", "declared size too large") from err
        except Exception as err:  # noqa: BLE001 - PIL raises many types
            raise ItemReject("unreadable_image", f"not a decodable image ({type(err).__name__})") from err
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ItemReject("unreadable_image", "zero-sized image")
        if w * h > max_pixels:
            raise ItemReject("decompression_bomb", f"{w}x{h} exceeds max_image_pixels={max_pixels}")
        fmt = (img.format or "").upper()
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ItemReject("decompression_bomb", "declared size too large") from err
        except Exception as err:  # noqa: BLE001
            msg = str(err)
            if "truncated" in msg.lower():
                raise ItemReject("truncated_image", "image data ends early") from err
            raise ItemReject("unreadable_image", f"decode failed ({type(err).__name__})") from err
    img = _to_l_or_rgb(img)
    return _finish(img, raw, fmt, {}, None, max_side)


def _to_l_or_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.round(scaled).astype(np.uint8), "L")
    if img.mode in ("LA", "1"):
        return img.convert("L")
    return img.convert("RGB")


def _finish(img, raw, fmt, meta, spacing, max_side) -> LoadedImage:
    resized = False
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new, Image.BICUBIC)
        if spacing:
            spacing = (spacing[0] / scale, spacing[1] / scale)
        resized = True
    if raw is not None and not resized and fmt in ("JPEG", "PNG"):
        return LoadedImage(img, raw, "jpg" if fmt == "JPEG" else "png", meta, spacing)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return LoadedImage(img, buf.getvalue(), "png", meta, spacing)


_DCT_CACHE: dict[int, np.ndarray] = {}


def _dct_matrix(n: int) -> np.ndarray:
    m = _DCT_CACHE.get(n)
    if m is None:
        k = np.arange(n)[:, None]
        i = np.arange(n)[None, :]
        m = np.cos(np.pi * (2 * i + 1) * k / (2 * n))
        m[0] *= 1 / np.sqrt(2)
        m *= np.sqrt(2 / n)
        _DCT_CACHE[n] = m
    return m


def phash(img: Image.Image, size: int = 32, bits: int = 8) -> int:
    """64-bit DCT perceptual hash: low-frequency DCT coefficients above their median."""
    small = img.convert("L").resize((size, size), Image.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(small, dtype=np.float64)
    d = _dct_matrix(size)
    coef = d @ arr @ d.T
    low = coef[:bits, :bits].ravel()
    med = np.median(low[1:])
    value = 0
    for b in low > med:
        value = (value << 1) | int(b)
    return value


def phash_hex(img: Image.Image) -> str:
    return f"{phash(img):016x}"


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
