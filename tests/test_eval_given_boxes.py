"""Evaluation with given boxes says which boxes it could not use (none is dropped silently)."""

from __future__ import annotations

import torch
from PIL import Image

from conftest import tiny_model_config
from conftest_build import data_dir  # noqa: F401
from regionmed.eval.images import ImageRef, embed_images
from regionmed.model.clip import RegionMedCLIP


def test_unusable_and_surplus_boxes_are_reported(data_dir):  # noqa: F811
    path = next((data_dir / "covid_cxr" / "images").iterdir())
    image = Image.open(path).convert("RGB")
    w, h = image.size
    torch.manual_seed(0)
    model = RegionMedCLIP(tiny_model_config())  # max_rois = 3
    inside = [[0, 0, w / 4, h / 4], [w / 2, h / 2, w, h], [10, 10, 60, 90], [w / 3, 0, w / 2, h / 3]]
    refs = [
        ImageRef("clean", image=image, boxes=inside[:2]),
        ImageRef("outside", image=image, boxes=[*inside[:2], [w + 5, 0, w + 50, 40]]),
        ImageRef("surplus", image=image, boxes=inside),
    ]
    emb = embed_images(model, refs, rois="given")
    notes = dict(emb.box_problems)
    assert set(notes) == {"outside", "surplus"}
    assert "1 of its 3 boxes lie outside" in notes["outside"]
    assert "1 box(es) beyond the model's max_rois = 3" in notes["surplus"]
    assert len(emb.boxes["surplus"]) == 3 and len(emb.boxes["outside"]) == 2 and len(emb.boxes["clean"]) == 2
