import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from regionmed.config import ConfigError
from regionmed.data.transforms import BoxError, Preprocessor, to_rgb


def _image_with_square(w, h, box):
    arr = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    return Image.fromarray(arr)


def test_letterboxed_box_covers_the_same_pixels():
    box = (30, 10, 50, 40)
    pre = Preprocessor(image_size=64, roi_mode="align", mean=(0, 0, 0), std=(1, 1, 1))
    out = pre(_image_with_square(200, 100, box), [box])
    img = out["image"][0]  # values in [0, 1]
    x0, y0, x1, y1 = (out["boxes"][0] * 64).tolist()
    inside = img[int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1]  # edges are resampled
    assert inside.numel() > 0 and inside.min() > 0.9
    assert img.sum() <= (x1 - x0 + 2) * (y1 - y0 + 2)  # nothing bright outside the mapped box
    # the 2:1 image is centred vertically: padding rows above and below are black
    assert img[:14].sum() == 0 and img[-14:].sum() == 0


def test_crop_matches_its_box_at_full_resolution():
    box = (100, 120, 140, 160)  # a 40 px square in an 800 x 600 image
    pre = Preprocessor(image_size=64, roi_size=32, context_margin=0.25, mean=(0, 0, 0), std=(1, 1, 1))
    out = pre(_image_with_square(800, 600, box), [box])
    crop = out["crops"][0, 0]
    # margin 0.25 per side: the 40 px box fills the central 40/60 of the crop
    assert crop.shape == (32, 32)
    centre = crop[8:24, 8:24]
    assert centre.min() > 0.9
    assert crop[:3].max() < 0.1 and crop[-3:].max() < 0.1
    assert pre.crop_box(box, 800, 600) == (90, 110, 150, 170)


def test_crop_is_clipped_at_the_image_border():
    pre = Preprocessor(image_size=64, roi_size=16)
    # margin 0.15: a 13 px window centred on (5, 5) loses its part left of and above the image
    assert pre.crop_box((0, 0, 10, 10), 50, 50) == (0, 0, 12, 12)


def test_sixteen_bit_images_are_scaled():
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    rgb = to_rgb(Image.fromarray(arr))
    values = np.asarray(rgb)
    assert rgb.mode == "RGB" and values.min() == 0 and values.max() == 255


def test_prepare_sanitises_and_limits_boxes():
    pre = Preprocessor(image_size=32, roi_size=16, max_rois=2)
    image = Image.new("L", (100, 100))
    boxes = [(10, 10, 30, 30), (500, 500, 600, 600), (0, 0, 5, 5), (50, 50, 60, 60)]
    inputs = pre.prepare(image, boxes, on_invalid="drop")  # the training-time rule
    assert inputs["boxes"].shape == (1, 2, 4) and inputs["roi_crops"].shape == (2, 3, 16, 16)
    assert torch.all(inputs["roi_mask"])
    with pytest.raises(BoxError, match=r"box #1 .*outside the image"):  # the default: no silent shift of ROI rows
        pre.prepare(image, boxes)
    kept = pre.prepare(image, [(10, 10, 30, 30), (0, 0, 5, 5), (50, 50, 160, 60)])  # all kept, beyond max_rois, clipped
    assert kept["boxes"].shape == (1, 3, 4) and float(kept["boxes"][0, 2, 2]) == pytest.approx((100 * 32 / 100) / 32)


def test_preprocessor_is_frozen_and_varied_with_replace():
    pre = Preprocessor(image_size=64, mean=[0, 0, 0], std=[1, 1, 1])
    assert pre.mean == (0.0, 0.0, 0.0) and isinstance(pre.std, tuple)  # lists become tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.roi_mode = "none"
    variant = dataclasses.replace(pre, roi_mode="none")
    assert variant.roi_mode == "none" and pre.roi_mode == "crop"
    assert hash(pre) == hash(Preprocessor(image_size=64, mean=(0, 0, 0), std=(1, 1, 1)))


def test_preprocessor_dict_round_trip_is_strict(tmp_path):
    pre = Preprocessor(image_size=96, roi_mode="align", context_margin=0.3)
    data = pre.to_dict()
    assert data["mean"] == [0.5, 0.5, 0.5]  # the JSON form
    assert Preprocessor.from_dict(json.loads(json.dumps(data))) == pre
    (tmp_path / "preprocess.json").write_text(json.dumps(data))
    assert Preprocessor.from_folder(tmp_path) == pre
    bad = {
        "image_size": ({**data, "image_size": "96"}, "must be an integer"),
        "mean": ({**data, "mean": [0.5, 0.5]}, "3 numbers"),
        "roi_mode": ({**data, "roi_mode": "boxes"}, "one of"),
        "max_rois": ({k: v for k, v in data.items() if k != "max_rois"}, "missing"),
        "colour": ({**data, "colour": True}, "unknown field"),
    }
    for field, (broken, why) in bad.items():
        (tmp_path / "preprocess.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=f"preprocess.json: .*{field}.*") as err:
            Preprocessor.from_folder(tmp_path)
        assert why in str(err.value)
    (tmp_path / "preprocess.json").unlink()
    with pytest.raises(ConfigError, match="preprocess.json is missing"):
        Preprocessor.from_folder(tmp_path)
