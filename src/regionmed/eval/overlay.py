"""Grounding overlays: a phrase's heatmap, box and peak drawn over its image.

One renderer for every application that shows a grounding (the ``regionmed ground``
command, the web demo, the evaluation's overlay PNGs): numpy and Pillow, plus
matplotlib's colour-map tables (no plotting).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from regionmed.errors import RegionmedError

__all__ = ["OverlayError", "colormap", "display_scale", "render_overlay"]

DEFAULT_COLOR = (230, 159, 0)  # orange of the Okabe & Ito (2008) colour-blind-safe set


class OverlayError(RegionmedError, ValueError):
    """Overlay inputs that do not fit together (a heatmap not of the image's size)."""


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def display_scale(width: int, height: int, max_side: int) -> float:
    """The factor (<= 1) that brings the long side of a ``width`` x ``height`` image to at most ``max_side``."""
    return min(1.0, max_side / max(width, height))


@lru_cache(maxsize=8)
def _lut(name: str) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colormap(values: np.ndarray, name: str = "inferno") -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 colours through matplotlib's colour map
    ``name`` (default ``inferno``: perceptually uniform, readable in grey scale), as a
    256-entry table (values rounded to 1/255)."""
    return _lut(name)[np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)]


def render_overlay(
    image: Image.Image,
    heatmap: np.ndarray | None,
    *,
    box: Sequence[float] | None = None,
    peak: Sequence[float] | None = None,
    label: str | None = None,
    threshold: float = 0.5,
    opacity: float = 0.5,
    color: tuple[int, int, int] = DEFAULT_COLOR,
    max_side: int = 1024,
    cmap: str = "inferno",
    gray: bool = False,
    peak_color: tuple[int, int, int] | None = None,
    reference_boxes: Sequence[Sequence[float]] = (),
    reference_color: tuple[int, int, int] = (0, 255, 0),
) -> Image.Image:
    """Draw one phrase's heatmap, box and peak over ``image``.

    ``image``: the decoded image (any PIL mode; ``gray=True`` shows it in grey levels).
    ``heatmap``: (H, W) float in [0, 1] at the image's size or at the result's size
    (``None``: no heatmap;
    NaN counts as 0, values outside [0, 1] are clipped); pixels whose value is
    ``>= threshold`` are coloured by the colour map ``cmap`` (:func:`colormap`) and
    alpha-blended with weight ``opacity`` in [0, 1] (below the threshold, and
    everywhere with ``opacity`` 0, the image shows unchanged). ``box``:
    ``[x0, y0, x1, y1]`` and ``peak``: ``(x, y)``, in the image's pixels, drawn in
    ``color`` (the peak as a cross, in ``peak_color`` if given); ``label``: a caption
    drawn above the box (inside it when there is no room above).
    ``reference_boxes``: further boxes (e.g. annotated ones) drawn in ``reference_color``
    under the box. The result is RGB, scaled so that its long side is at most
    ``max_side`` pixels (the image's aspect kept; bilinear). The image is scaled before
    anything else is done, so memory follows the result's size, not the image's.

    Raises :class:`OverlayError` when the heatmap's shape is neither the image's (H, W)
    nor the result's.
    """
    w, h = image.size
    s = display_scale(w, h, max_side)
    dw, dh = max(1, round(w * s)), max(1, round(h * s))
    if heatmap is not None and tuple(np.shape(heatmap)) not in ((h, w), (dh, dw)):
        raise OverlayError(f"heatmap of shape {tuple(np.shape(heatmap))} for an image of {w}x{h} (expected ({h}, {w})"
                           f"{f' or the overlay size ({dh}, {dw})' if (dw, dh) != (w, h) else ''})")
    base = image if image.mode in ("L", "RGB") else image.convert("RGB")
    if (dw, dh) != (w, h):
        base = base.resize((dw, dh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    base = base.convert("L").convert("RGB") if gray else base.convert("RGB")
    out = np.asarray(base, dtype=np.float32)
    if heatmap is not None and opacity > 0:
        heat = np.asarray(heatmap, dtype=np.float32)
        if heat.shape != (dh, dw):
            heat = np.asarray(Image.fromarray(heat, "F").resize((dw, dh), Image.Resampling.BILINEAR))
        heat = np.nan_to_num(np.clip(heat, 0.0, 1.0))
        alpha = (heat >= threshold).astype(np.float32)[..., None] * float(np.clip(opacity, 0.0, 1.0))
        out = out * (1.0 - alpha) + colormap(heat, cmap).astype(np.float32) * alpha
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(result)
    line = max(2, round(max(dw, dh) / 250))
    for ref in reference_boxes:
        draw.rectangle([float(v) * s for v in ref], outline=reference_color, width=line)
    if box is not None:
        x0, y0, x1, y1 = (float(v) * s for v in box)
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=line)
        if label:
            font = _font(max(12, round(max(dw, dh) / 40)))
            tx, ty = x0, y0 - line
            left, t, r, b = draw.textbbox((tx, ty), label, font=font, anchor="ld")
            if t < 0:  # no room above the box: inside it
                tx, ty = x0 + line, y0 + line + (b - t)
                left, t, r, b = draw.textbbox((tx, ty), label, font=font, anchor="ld")
            draw.rectangle([left - 2, t - 2, r + 2, b + 2], fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color, font=font, anchor="ld")
    if peak is not None:
        px, py = float(peak[0]) * s, float(peak[1]) * s
        r = 3 * line
        draw.line([px - r, py, px + r, py], fill=peak_color or color, width=line)
        draw.line([px, py - r, px, py + r], fill=peak_color or color, width=line)
    return result
