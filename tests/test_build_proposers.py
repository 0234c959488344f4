"""ROI proposers: annotation, unsupervised (recall on SLAKE), detector error paths."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest_build import data_dir  # noqa: F401
from regionmed.apps.curation.items import RawBox, RawItem
from regionmed.apps.curation.proposers import ProposerConfig, ProposerError, box_iou, make_proposer, proposal_recall
from regionmed.apps.curation.sources import get_source


def slake_pairs(root, limit):
    for item in get_source("slake", root / "slake", limit=limit):
        if item.boxes:
            yield Image.open(item.image_path), [b.box for b in item.boxes]


def test_annotation_proposer_scales_given_boxes():
    item = RawItem(id="x", source="t", boxes=[RawBox("Nodule", [10, 20, 30, 40])])
    p = make_proposer(ProposerConfig(name="annotation"))
    assert p.propose(item, Image.new("L", (50, 50)), scale=0.5) == [("Nodule", [5, 10, 15, 20], "annotation")]


def test_unsupervised_proposer_boxes_inside_image_and_some_recall(data_dir):  # noqa: F811
    p = make_proposer(ProposerConfig(name="unsupervised", max_proposals=8))
    img, gts = next(slake_pairs(data_dir, 5))
    boxes = [b for _, b, src in p.propose(None, img)]
    assert 1 <= len(boxes) <= 8
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= img.width and 0 <= y0 < y1 <= img.height
    rec = proposal_recall(slake_pairs(data_dir, 12), p)
    assert rec["gt_boxes"] >= 20
    assert rec["recall@0.3"] >= rec["recall@0.5"] > 0.1  # far from perfect, far from nothing


def test_fallback_is_used_only_without_annotations(data_dir):  # noqa: F811
    p = make_proposer(ProposerConfig(name="annotation", fallback="unsupervised"))
    img = Image.open(next(iter(get_source("slake", data_dir / "slake", limit=1))).image_path)
    with_boxes = RawItem(id="a", source="t", boxes=[RawBox("Liver", [1, 2, 30, 40])])
    assert [s for _, _, s in p.propose(with_boxes, img)] == ["annotation"]
    assert {s for _, _, s in p.propose(RawItem(id="b", source="t"), img)} == {"unsupervised"}


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("backend", ["yolo", "sam", "medsam"])
def test_detector_missing_checkpoint_is_a_clear_error(backend, tmp_path):
    with pytest.raises(ProposerError, match="checkpoint"):
        make_proposer(ProposerConfig(name="detector", backend=backend))
    missing = tmp_path / "nope.pt"
    with pytest.raises(ProposerError, match=f"checkpoint {missing} not found"):
        make_proposer(ProposerConfig(name="detector", backend=backend, checkpoint=str(missing)))


@pytest.mark.parametrize("backend,package", [("yolo", "ultralytics"), ("sam", "segment-anything")])
def test_detector_missing_package_is_a_clear_error(backend, package, tmp_path, monkeypatch):
    import builtins

    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"\0")
    real_import = builtins.__import__
    module = {"ultralytics": "ultralytics", "segment-anything": "segment_anything"}[package]

    def fake_import(name, *a, **kw):  # behave as if the package were not installed
        if name.split(".")[0] == module:
            raise ImportError(f"No module named {module!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    import importlib

    real_im = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: fake_import(n) if n.split(".")[0] == module else real_im(n, *a))
    with pytest.raises(ProposerError, match=f"needs the '{package}' package.*pip install {package}"):
        make_proposer(ProposerConfig(name="detector", backend=backend, checkpoint=str(ckpt)))


def test_unknown_names_are_errors():
    with pytest.raises(ProposerError, match="unknown proposer"):
        make_proposer(ProposerConfig(name="magic"))
    with pytest.raises(ProposerError, match="unknown detector backend"):
        make_proposer(ProposerConfig(name="detector", backend="rcnn", checkpoint=__file__))
