"""The library's grounding overlay (regionmed.eval.overlay.render_overlay), used by the
``ground`` command, the web demo and the evaluation's overlay PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from infer_helpers import slake_image
from regionmed.errors import RegionmedError
from regionmed.eval.overlay import colormap, render_overlay


def _flat(w: int = 120, h: int = 60, value: int = 100) -> Image.Image:
    return Image.fromarray(np.full((h, w), value, np.uint8), "L")


def test_only_pixels_at_or_above_the_threshold_are_coloured():
    image = _flat()
    heat = np.zeros((60, 120), np.float32)
    heat[10:30, 20:50] = 0.9
    heat[40:50, 80:100] = 0.3
    heat[5, 5] = 0.5  # exactly at the threshold: coloured
    out = np.asarray(render_overlay(image, heat, threshold=0.5, opacity=0.6), dtype=np.int16)
    assert out.shape == (60, 120, 3)
    coloured = np.abs(out - 100).max(-1) > 0
    assert np.array_equal(coloured, heat >= 0.5)
    # the colour is the blend of the image and the colour map at the given opacity
    expected = np.rint(100 * 0.4 + colormap(np.array([[0.9]], np.float32))[0, 0].astype(np.float32) * 0.6)
    assert np.abs(out[15, 25] - expected).max() <= 1


def test_opacity_zero_gives_the_image_back():
    image = Image.open(slake_image(1)).convert("RGB")
    heat = np.random.default_rng(0).random((image.height, image.width)).astype(np.float32)
    out = render_overlay(image, heat, threshold=0.0, opacity=0.0, max_side=max(image.size))
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_box_peak_and_reference_boxes_are_drawn():
    image = _flat()
    out = np.asarray(render_overlay(image, None, box=[60, 10, 110, 50], peak=(30, 30), color=(255, 0, 0),
                                    peak_color=(255, 255, 255), reference_boxes=[[2, 2, 20, 20]],
                                    reference_color=(0, 255, 0)))
    assert tuple(out[30, 60]) == (255, 0, 0) and tuple(out[10, 85]) == (255, 0, 0)  # box edges
    assert tuple(out[30, 85]) == (100, 100, 100)  # inside the box: the image
    assert tuple(out[30, 30]) == (255, 255, 255) and tuple(out[30, 34]) == (255, 255, 255)  # the cross at the peak
    assert tuple(out[26, 34]) == (100, 100, 100)  # ... a cross, not a square
    assert tuple(out[10, 2]) == (0, 255, 0)  # the reference box


def test_scaling_gray_and_errors():
    small = render_overlay(Image.new("L", (2000, 1000)), np.zeros((1000, 2000), np.float32), max_side=500)
    assert small.size == (500, 250) and small.mode == "RGB"
    colour = Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (200, 50, 10)]), "RGB")
    grey = np.asarray(render_overlay(colour, None, gray=True))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    with pytest.raises(RegionmedError, match="heatmap of shape"):
        render_overlay(_flat(), np.zeros((120, 60), np.float32))
    with pytest.raises(ValueError):
        render_overlay(_flat(), np.zeros((60, 121), np.float32))
