import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from regionmed.data.loader import RegionSampleDataset, StepBatchSampler, collate
from regionmed.data.schema import RecordError, sanitize_box, sanitize_regions, validate_record
from regionmed.data.shards import DatasetError, MedRegionDataset, MedRegionWriter, write_manifest
from regionmed.data.transforms import Preprocessor


def _record(i, regions=(), split="train", w=100, h=80):
    return {"schema_version": 1, "id": f"s{i}", "split": split, "width": w, "height": h, "summary": "s", "report": f"r{i}",
            "regions": [dict(box=list(b), caption=f"c{j}") for j, b in enumerate(regions)]}


def _png(w=100, h=80, value=0):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(tmp_path, records):
    with MedRegionWriter(tmp_path, "train", max_count=2) as w:
        for r in records:
            w.write(r, _png(r["width"], r["height"]))
    write_manifest(tmp_path, {"train": w.summary()})
    return tmp_path


def test_roundtrip_across_several_shards(tmp_path):
    root = _dataset(tmp_path, [_record(i, [(1, 2, 30, 40)]) for i in range(5)])
    ds = MedRegionDataset(root, "train")
    assert len(ds) == 5 and len(ds.shard_paths) == 3
    image, record = ds[4]
    assert record["id"] == "s4" and image.size == (100, 80)


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        MedRegionDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="manifest.json is missing"):
        MedRegionDataset(tmp_path)


def test_empty_shard_is_an_error_naming_it(tmp_path):
    root = _dataset(tmp_path, [_record(0)])
    with tarfile.open(root / "train-000009.tar", "w"):
        pass
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append({"name": "train-000009.tar", "samples": 0})
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"train-000009\.tar is empty"):
        MedRegionDataset(root)


def test_manifest_count_mismatch(tmp_path):
    root = _dataset(tmp_path, [_record(0), _record(1)])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["samples"] = 7
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="lists 7 samples, shards hold 2"):
        MedRegionDataset(root)


@pytest.mark.parametrize(
    "record, match",
    [
        ({"schema_version": 2}, "schema_version"),
        (dict(_record(0), split="holdout"), "split"),
        (dict(_record(0), width=0), "width"),
        (dict(_record(0), regions=[{"box": [1, 2, 3], "caption": "x"}]), r"regions\[0\]\.box"),
        (dict(_record(0), regions=[{"box": [1, 2, 3, 4]}]), r"regions\[0\]\.caption"),
    ],
)
def test_bad_records_name_the_field(record, match):
    with pytest.raises(RecordError, match=match):
        validate_record(record)


def test_boxes_are_clipped_or_dropped_and_counted():
    record = _record(0, [(10, 10, 20, 20), (-5, 70, 30, 95), (150, 10, 160, 20), (10, 10, 10, 40), (5, 5, float("nan"), 9)])
    regions, stats = sanitize_regions(record)
    assert [r["box"] for r in regions] == [[10, 10, 20, 20], [0, 70, 30, 80]]
    assert (stats.kept, stats.clipped, stats.dropped_outside, stats.dropped_zero_area, stats.dropped_invalid) == (2, 1, 1, 1, 1)
    assert sanitize_box([0, 0, 100, 80], 100, 80) == ((0, 0, 100, 80), "kept")


def test_training_dataset_audits_bad_boxes(tmp_path):
    root = _dataset(tmp_path, [_record(0, [(10, 10, 20, 20), (200, 0, 300, 10)]), _record(1, [(90, 70, 120, 95)])])
    ds = RegionSampleDataset(str(root), "train", Preprocessor(image_size=32, roi_size=16, max_rois=4))
    audit = ds.audit()
    assert audit["boxes_dropped_outside"] == 1 and audit["boxes_clipped"] == 1 and audit["boxes_kept"] == 2
    sample = ds[0]
    assert sample["boxes"].shape == (1, 4) and len(sample["captions"]) == 1


def test_sampler_is_deterministic_and_ranks_partition_the_global_batch():
    one = StepBatchSampler(50, 8, seed=3, total_steps=12)
    assert list(one) == list(StepBatchSampler(50, 8, seed=3, total_steps=12))
    ranks = [list(StepBatchSampler(50, 8, seed=3, total_steps=12, rank=r, world=2)) for r in range(2)]
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch
    resumed = list(StepBatchSampler(50, 8, seed=3, total_steps=12, start_step=7))
    assert resumed == list(one)[7:]
    epoch0 = [i for b in list(one)[:6] for i in b]
    assert len(set(epoch0)) == 48  # one epoch (6 steps of 8 from 50) never repeats a sample


def test_sampler_rejects_too_small_dataset():
    with pytest.raises(DatasetError, match="fewer than one batch"):
        StepBatchSampler(5, 8, seed=0, total_steps=1)


def test_collate_pads_rois(tmp_path):
    root = _dataset(tmp_path, [_record(0, [(10, 10, 20, 20), (30, 30, 60, 60)]), _record(1)])
    ds = RegionSampleDataset(str(root), "train", Preprocessor(image_size=32, roi_size=16))
    batch = collate([ds[0], ds[1]])
    assert batch.boxes.shape == (2, 2, 4) and batch.roi_mask.tolist() == [[True, True], [False, False]]
    assert batch.roi_crops.shape == (2, 3, 16, 16) and batch.captions == ["c0", "c1"]
