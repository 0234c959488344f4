"""The indexed reader: the index the writer records at build time (numpy arrays in
<split>-index.npz) equals a walk of the tar headers, datasets without it still read
(with a warning) and get it from index_dataset, open files stay bounded under a small
RLIMIT_NOFILE, and the trainer takes its data counts from the manifest."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_run_config
from conftest_build import data_dir, public_config  # noqa: F401
from regionmed.data.loader import RegionSampleDataset
from regionmed.data.shards import (
    DatasetError,
    MedRegionDataset,
    MedRegionWriter,
    SplitIndex,
    read_manifest,
    write_manifest,
)
from regionmed.data.transforms import Preprocessor

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _record(i: int, split: str = "train") -> dict:
    boxes = [[2, 2, 10, 10], [20, 20, 30, 30], [-4, 0, 8, 8], [1, 1, 14, 9]][: i % 5]
    return {"schema_version": 1, "id": f"{split}-{i}" + ("x" * 120 if i == 3 else ""), "split": split, "width": 16,
            "height": 16, "summary": f"s{i}", "report": f"report {i}",
            "negatives": [{"text": f"not {i}", "rule": "laterality"}] * (i % 3),
            "regions": [{"box": b, "caption": f"c{i}{j}", "negatives": [{"text": f"n{j}", "rule": "laterality"}] * j}
                        for j, b in enumerate(boxes)]}


def write_dataset(root: Path, n: int, max_count: int, split: str = "train") -> Path:
    with MedRegionWriter(root, split, max_count=max_count) as w:
        for i in range(n):
            w.write(_record(i, split), _png(i))
    write_manifest(root, {split: w.summary()})
    return root


def _assert_same_index(a: SplitIndex, b: SplitIndex) -> None:
    assert a.shard_names == b.shard_names
    for name in SplitIndex.FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_builder_writes_the_index_and_statistics_that_a_header_walk_and_a_record_pass_give(data_dir, tmp_path):  # noqa: F811
    from regionmed.apps.curation.builder import build

    cfg = public_config(data_dir, tmp_path / "ds", limit=6)
    cfg.shards.max_count = 4  # several shards per split
    build(cfg, log=lambda s: None)
    manifest = read_manifest(tmp_path / "ds")
    for split, entry in manifest["splits"].items():
        assert entry["index"]["name"] == f"{split}-index.npz" and len(entry["index"]["sha256"]) == 64
        ds = MedRegionDataset(tmp_path / "ds", split)
        assert ds.indexed and len(ds) == entry["samples"]
        _assert_same_index(ds.index, SplitIndex.from_headers(ds.root, ds.index.shard_names))
        # the arrays hold no Python object per sample
        assert all(getattr(ds.index, f).dtype != object for f in SplitIndex.FIELDS)
        data = RegionSampleDataset(str(tmp_path / "ds"), split, Preprocessor(image_size=32, roi_size=16, max_rois=2))
        audit = data.audit()
        assert data.manifest_counts() == audit and audit["samples"] == entry["samples"]
        image, record = ds[len(ds) - 1]
        assert image.size == (record["width"], record["height"])


def test_the_written_index_equals_the_header_walk_with_long_keys_and_many_shards(tmp_path):
    root = write_dataset(tmp_path, 11, max_count=3)  # 4 shards; sample 3 has a key > 100 chars (GNU long name)
    ds = MedRegionDataset(root, "train")
    assert ds.indexed and len(ds.shard_paths) == 4
    _assert_same_index(ds.index, SplitIndex.from_headers(root, ds.index.shard_names))
    assert [ds.record(i)["id"] for i in range(11)] == [_record(i)["id"] for i in range(11)]
    pre = Preprocessor(image_size=32, roi_size=16, max_rois=2)
    for max_negatives, max_image_negatives in ((0, 0), (1, 1), (3, 2)):
        data = RegionSampleDataset(str(root), "train", pre, max_negatives, max_image_negatives=max_image_negatives)
        counts = data.manifest_counts()
        assert counts == data.audit()
        assert counts["rois_over_max"] > 0 and counts["boxes_clipped"] > 0
        assert (counts["region_negatives"] > 0) == (max_negatives > 0)


def test_a_dataset_without_index_warns_once_and_index_shards_adds_index_and_statistics(tmp_path, caplog):
    root = write_dataset(tmp_path, 7, max_count=2)
    written = read_manifest(root)["splits"]["train"]
    reference = MedRegionDataset(root, "train").index
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("index", "stats"):
        del manifest["splits"]["train"][key]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "train-index.npz").unlink()
    with caplog.at_level(logging.WARNING, logger="regionmed.data.shards"):
        a, b = MedRegionDataset(root, "train"), MedRegionDataset(root, "train")
    warnings = [r.getMessage() for r in caplog.records if "has no index file" in r.getMessage()]
    assert len(warnings) == 1 and f"regionmed index-shards {root}" in warnings[0]
    assert not a.indexed and a.record(6) == b.record(6)
    _assert_same_index(a.index, reference)

    result = subprocess.run([sys.executable, "-m", "regionmed", "index-shards", str(root)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    again = read_manifest(root)["splits"]["train"]
    assert again["stats"] == written["stats"] and again["index"]["sha256"] == written["index"]["sha256"]
    assert MedRegionDataset(root, "train").indexed


def test_an_index_that_does_not_match_its_digest_is_refused(tmp_path):
    root = write_dataset(tmp_path, 4, max_count=2)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["index"]["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"train-index\.npz: its SHA-256 differs .* regionmed index-shards"):
        MedRegionDataset(root, "train")



def test_a_shard_the_manifest_lists_but_that_was_deleted_is_refused_at_open(tmp_path):
    root = write_dataset(tmp_path, 6, max_count=2)  # 3 shards
    shards = sorted(p.name for p in root.glob("*.tar"))
    assert len(shards) == 3 and len(MedRegionDataset(root, "train")) == 6
    (root / shards[1]).unlink()
    with pytest.raises(DatasetError) as err:
        RegionSampleDataset(str(root), "train", Preprocessor(image_size=32), on_bad="substitute")
    msg = str(err.value)
    assert str(root) in msg and shards[1] in msg and "1 of the 3 shard(s)" in msg and "'train'" in msg
    assert shards[0] not in msg and shards[2] not in msg


BOUNDED = textwrap.dedent("""
    import random, resource, sys
    from regionmed.data.shards import MedRegionDataset
    root, max_open = sys.argv[1], int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    ds = MedRegionDataset(root, "train", max_open_files=max_open)
    order = list(range(len(ds))) * 2
    random.Random(0).shuffle(order)
    most = 0
    try:
        for i in order:
            ds[i]
            most = max(most, ds.open_files)
    except OSError as err:
        print("FAILED", err)
        sys.exit(3)
    print("OK", len(ds), most)
""")


def test_open_shard_files_stay_bounded_under_a_small_descriptor_limit(tmp_path):
    root = write_dataset(tmp_path, 120, max_count=1)  # 120 shards, RLIMIT_NOFILE 48
    run = lambda max_open: subprocess.run([sys.executable, "-c", BOUNDED, str(root), str(max_open)],  # noqa: E731
                                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    ok = run(8)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    _, n, most = ok.stdout.split()
    assert int(n) == 120 and int(most) == 8
    # the same reads with one descriptor per shard (the old reader) run out of descriptors
    unbounded = run(1000)
    assert unbounded.returncode == 3 and "Too many open files" in unbounded.stdout


def test_the_trainer_takes_its_data_counts_from_the_manifest(tmp_path, caplog):
    from regionmed.apps.train.trainer import Trainer

    root = write_dataset(tmp_path / "data", 16, max_count=4)
    cfg = tiny_run_config(str(root), str(tmp_path / "run"), steps=(1, 1), batch_size=8)
    trainer = Trainer(cfg, progress=False)
    assert trainer.counts_from == "manifest"
    reference = trainer.data.audit()
    assert trainer.audit == reference and trainer.audit["regions"] > 0 and trainer.audit["boxes_clipped"] > 0
    # without statistics in the manifest: said once, then one pass (indexed reader, data.audit auto)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["splits"]["train"]["stats"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    cfg.train.output_dir = str(tmp_path / "run2")
    trainer = Trainer(cfg, progress=False)
    assert trainer.counts_from == "manifest+audit" and trainer.audit == reference
    assert any(f"{root}/manifest.json has no build-time statistics for split 'train'" in n
               and f"'regionmed index-shards {root}'" in n for n in trainer.notes)
    cfg.data.audit, cfg.train.output_dir = "never", str(tmp_path / "run3")
    assert Trainer(cfg, progress=False).audit == {}


def test_a_step_takes_accum_freq_times_the_batch_from_either_reader(tmp_path):
    from regionmed.apps.train.trainer import Trainer

    root = write_dataset(tmp_path / "data", 24, max_count=4)
    for reader in ("indexed", "streaming"):
        cfg = tiny_run_config(str(root), str(tmp_path / reader), steps=(1, 1), batch_size=4)
        cfg.train.accum_freq, cfg.data.reader, cfg.data.shuffle_buffer = 3, reader, 4
        trainer = Trainer(cfg, progress=False)
        assert trainer.steps_per_epoch == 2  # 24 samples // (3 x 4)
        assert len(next(iter(trainer._loader()))) == 12
