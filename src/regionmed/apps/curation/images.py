"""The builder's image loading (decoding by :func:`regionmed.data.decode.decode_image`, DICOM by
:mod:`.dicom`), encoding for shards, and image hashes (SHA-256, the 256-bit perceptual hash)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from regionmed.apps.curation.dicom import read_dicom
from regionmed.apps.curation.items import ItemReject
from regionmed.data.decode import ImageDecodeError, decode_image, record_meta
from regionmed.data.dicom import is_dicom

DEFAULT_MAX_PIXELS = 40_000_000
PHASH_SIZE = 64  # images are reduced to 64 x 64 gray for the perceptual hash
PHASH_BLOCK = 16  # ... and hashed on their 16 x 16 lowest DCT frequencies
PHASH_BITS = PHASH_BLOCK * PHASH_BLOCK  # 256
PHASH_HEX = PHASH_BITS // 4  # hex digits of a record's "phash"
# Hamming distance (of PHASH_BITS) within which two images are near duplicates (kept in one
# split). Measured on the 509 covid_cxr films (benchmarks/bench_near_dup.py): films of distinct
# patients lie >= 60 bits apart (0 of 126,892 such pairs linked at 32), a JPEG-q70, half-size,
# contrast x1.2 or gamma 0.8 copy of a film <= 24 bits from it (all 509 linked at 32).
NEAR_DUP_THRESHOLD = 32


@dataclass
class LoadedImage:
    """A decoded input image, ready to store.

    ``image``: 8-bit mode "L" or "RGB", displayed upright (EXIF orientation applied),
    resized when ``max_side`` asked for it. ``data``/``ext``: the bytes to store — the
    original file only when they hold exactly ``image`` (an upright 8-bit L/RGB JPEG or
    PNG, not resized), else a PNG of ``image``. ``meta``: what goes into the record's
    ``meta``: allow-listed DICOM attributes and the ``decode_*`` entries of
    :func:`regionmed.data.decode.record_meta` (orientation applied, mode conversion and
    its intensity mapping). ``source_size``: (w, h) of the displayed image before any
    resize — the geometry a source's boxes are drawn on. ``patient_key``: a hashed
    patient key read from the file (DICOM PatientID), never the identifier itself.
    """

    image: Image.Image
    data: bytes
    ext: str  # "jpg" or "png"
    meta: dict[str, Any] = field(default_factory=dict)
    pixel_spacing: tuple[float, float] | None = None  # (row mm, column mm)
    source_size: tuple[int, int] = (0, 0)
    patient_key: str | None = None


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

    Non-DICOM inputs are decoded by :func:`regionmed.data.decode.decode_image` (the one
    decoder: EXIF orientation applied, 8-bit L/RGB with the stated mappings); DICOM by
    :func:`regionmed.apps.curation.dicom.read_dicom`. The original bytes are stored
    only when they already hold the returned pixels; anything else is stored as PNG.
    """
    raw = read_bytes(path, data)
    if is_dicom(raw, path):
        dcm = read_dicom(raw, max_pixels=max_pixels, **(dicom_options or {}))
        img = Image.fromarray(dcm.array)
        return _finish(img, None, dcm.meta, dcm.spacing, max_side, dcm.patient_key)
    try:
        img, info = decode_image(raw, max_pixels=max_pixels)
    except ImageDecodeError as err:
        raise ItemReject(err.reason, err.detail) from err
    return _finish(img, raw if info["as_is"] else None, record_meta(info), None, max_side, None, info["format"])


def _finish(img, raw, meta, spacing, max_side, patient_key, fmt=None) -> LoadedImage:
    source_size = img.size
    resized = False
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new, Image.BICUBIC)
        if spacing:
            spacing = (spacing[0] / scale, spacing[1] / scale)
        resized = True
    if raw is not None and not resized:
        return LoadedImage(img, raw, "jpg" if fmt == "JPEG" else "png", meta, spacing, source_size, patient_key)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return LoadedImage(img, buf.getvalue(), "png", meta, spacing, source_size, patient_key)


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


def phash(img: Image.Image, size: int = PHASH_SIZE, bits: int = PHASH_BLOCK) -> int:
    """DCT perceptual hash: the ``bits`` × ``bits`` lowest DCT frequencies of the image reduced
    to ``size`` × ``size`` gray, each above the median of those coefficients (DC excluded) or
    not. The default is a 256-bit hash (64 × 64, 16 × 16 block): chest films of distinct
    patients lie >= 60 bits apart while re-encoded, resized or tone-shifted copies of one
    film lie <= 24 apart (``benchmarks/bench_near_dup.py``); the 64-bit version of the same
    hash (32 × 32, 8 × 8) cannot separate them (distinct patients from 4 bits, copies up to 8)."""
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
    """:func:`phash` as :data:`PHASH_HEX` hex digits (zero-padded): the record's ``phash``."""
    return f"{phash(img):0{PHASH_HEX}x}"


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
