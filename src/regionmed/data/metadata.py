"""Pixels only: the images regionmed writes, stores or serves carry no metadata.

Exports from clinical systems put patient names and IDs into image metadata: PNG text
chunks (``tEXt``, ``zTXt``, ``iTXt``), EXIF (JPEG ``APP1``, PNG ``eXIf``, TIFF tags), XMP,
IPTC (JPEG ``APP13``), JPEG comments (``COM``), ICC profiles (their description is free
text). regionmed keeps none of it, in three places:

* **decoding**: :func:`regionmed.data.decode.decode_image` (and so
  :func:`regionmed.inference.load_image`, which the commands and ``regionmed serve`` use)
  returns images whose ``info`` is empty (:func:`strip_info`), so no writer downstream —
  regionmed's own or Gradio's, which copies a PNG's text from ``info`` — has anything to copy;
* **encoding**: every PNG regionmed writes from pixels (overlays, previews) goes through
  :func:`save_png` / :func:`png_bytes` (mode, size and pixels; nothing else);
* **stored bytes**: encoded bytes kept as they are (a MedRegion shard stores a source JPEG or
  PNG unchanged when it holds exactly the decoded pixels: ``decode_image``'s ``as_is``) are
  only kept when they carry no metadata (:func:`has_metadata`); :func:`strip_metadata`
  removes it losslessly (same pixels, same compressed data).

What :func:`strip_metadata` keeps (everything else goes): in a JPEG the frame, scan, table and
restart segments, a JFIF ``APP0`` header (without its thumbnail) and an Adobe ``APP14``
(its colour-transform flag changes how the pixels decode); in a PNG the critical chunks
(``IHDR``, ``PLTE``, ``IDAT``, ``IEND``) and the numeric ancillary chunks ``tRNS``,
``gAMA``, ``cHRM``, ``sRGB``, ``sBIT``, ``pHYs``, ``bKGD``. Bytes after the end of the image
(after ``EOI`` / ``IEND``) are dropped too. Sources: ITU-T T.81 (JPEG markers, B.1.1),
JFIF 1.02, the PNG specification (W3C, 3rd ed., chunk types).
"""

from __future__ import annotations

import io
import os
import struct

from PIL import Image

from regionmed.errors import RegionmedError

__all__ = ["MetadataError", "has_metadata", "pixels_only", "png_bytes", "save_png", "strip_info", "strip_metadata"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEPT = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"bKGD"})
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..7: markers without a length


class MetadataError(RegionmedError, ValueError):
    """Bytes :func:`strip_metadata` cannot parse (a damaged JPEG or PNG, or another format)."""


def strip_info(image: Image.Image) -> Image.Image:
    """``image`` itself, its metadata dropped in place (``info``, the EXIF cache): for an
    image the caller owns (a decoder's fresh result)."""
    image.info = {}
    if hasattr(image, "_exif"):
        image._exif = None
    return image


def pixels_only(image: Image.Image) -> Image.Image:
    """``image`` without metadata: itself when it carries none, else a copy with an empty
    ``info`` (the caller's image is not changed)."""
    if not image.info and getattr(image, "_exif", None) is None:
        return image
    return strip_info(image.copy())


def png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    """``image`` encoded as PNG with its pixels only (no text, EXIF or ICC chunk), whatever
    its ``info`` holds (the caller's image is not changed)."""
    buf = io.BytesIO()
    pixels_only(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, compress_level: int = 6) -> None:
    """Write ``image`` to ``path`` as a PNG with its pixels only (:func:`png_bytes`)."""
    with open(path, "wb") as fh:
        fh.write(png_bytes(image, compress_level))


def _strip_png(raw: bytes) -> bytes:
    out = [PNG_SIGNATURE]
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(raw):
            raise MetadataError("PNG ends before its IEND chunk")
        length, kind = struct.unpack(">I4s", raw[pos: pos + 8])
        end = pos + 12 + length
        if end > len(raw):
            raise MetadataError(f"PNG chunk {kind!r} runs past the end of the data")
        if kind in PNG_KEPT:
            out.append(raw[pos:end])
        pos = end
        if kind == b"IEND":
            return b"".join(out)


def _jfif_header(payload: bytes) -> bytes | None:
    """A JFIF APP0 segment without its thumbnail; None for another APP0 (e.g. JFXX)."""
    if not payload.startswith(b"JFIF\x00") or len(payload) < 14:
        return None
    body = payload[:12] + b"\x00\x00"  # version, units, densities; no thumbnail
    return b"\xff\xe0" + struct.pack(">H", len(body) + 2) + body


def _strip_jpeg(raw: bytes) -> bytes:
    out = [b"\xff\xd8"]
    pos, n = 2, len(raw)
    while True:
        if pos >= n or raw[pos] != 0xFF:
            raise MetadataError(f"JPEG: no marker at byte {pos}")
        while pos < n and raw[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise MetadataError("JPEG ends inside a marker")
        marker = raw[pos]
        pos += 1
        if marker == 0xD9:  # EOI: whatever follows is dropped
            out.append(b"\xff\xd9")
            return b"".join(out)
        if marker in _STANDALONE:
            out.append(bytes((0xFF, marker)))
            continue
        if pos + 2 > n:
            raise MetadataError("JPEG ends inside a segment length")
        length = struct.unpack(">H", raw[pos: pos + 2])[0]
        end = pos + length
        if length < 2 or end > n:
            raise MetadataError(f"JPEG segment 0x{marker:02X} runs past the end of the data")
        segment = raw[pos - 2: end]
        payload = raw[pos + 2: end]
        if marker == 0xE0:
            jfif = _jfif_header(payload)
            if jfif is not None:
                out.append(jfif)
        elif marker == 0xEE and payload.startswith(b"Adobe"):
            out.append(segment)
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            pass  # APPn (EXIF, XMP, ICC, IPTC, ...) and comments
        else:
            out.append(segment)
        pos = end
        if marker == 0xDA:  # entropy-coded data up to the next marker that is not a stuffed 0xFF or a restart
            start = pos
            while True:
                pos = raw.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    raise MetadataError("JPEG ends inside its scan data (no EOI)")
                following = raw[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                    continue
                break  # a marker (possibly after fill bytes 0xFF)
            out.append(raw[start:pos])


def strip_metadata(raw: bytes) -> bytes:
    """The JPEG or PNG ``raw`` without its metadata (see the module docstring): the same
    pixels from the same compressed data. A JPEG's EXIF orientation goes with its EXIF
    block, so use it on upright images (``decode_image``'s ``as_is`` guarantees that).
    Raises :class:`MetadataError` for another format or damaged data."""
    raw = bytes(raw)
    if raw.startswith(PNG_SIGNATURE):
        return _strip_png(raw)
    if raw.startswith(b"\xff\xd8"):
        return _strip_jpeg(raw)
    raise MetadataError("not a JPEG or PNG")


def has_metadata(raw: bytes) -> bool:
    """True when the JPEG or PNG ``raw`` carries anything :func:`strip_metadata` removes
    (also when it cannot be parsed: such bytes are not stored as they are)."""
    try:
        return strip_metadata(raw) != bytes(raw)
    except MetadataError:
        return True
