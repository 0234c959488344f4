"""Shards that changed after they were indexed: edited, re-packed, truncated or deleted.

Each case changes one shard of a written dataset; the next command either names the
changed shard and `regionmed index-shards DIR` (the reader, the trainer's loader, the
streaming reader), or, after index-shards, reads the new bytes with statistics that
describe them. Datasets written before shard identities existed keep loading, with one
warning naming index-shards."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionmed.data.loader import RegionSampleDataset
from regionmed.data.shards import (
    DatasetError,
    MedRegionDataset,
    MedRegionWriter,
    StaleShardError,
    index_dataset,
    read_manifest,
    write_manifest,
)
from regionmed.data.stream import SHARD_FAILURE, MedRegionStream, StreamSource
from regionmed.data.transforms import Preprocessor
from test_reader_index import write_dataset

ROOT = Path(__file__).resolve().parents[1]
PRE = Preprocessor(image_size=32, roi_size=16, max_rois=2)
SHARD = "train-000001.tar"  # the shard each case changes (samples 4..7)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _pack(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _edit_report(name: str, data: bytes) -> bytes:
    if name == "train-5.json":
        record = json.loads(data)
        record["report"] = "an edited report, longer than the one indexed"
        return json.dumps(record).encode()
    return data


def edit(path: Path) -> None:
    """Re-pack with one report changed, the same samples."""
    _pack(path, [(n, _edit_report(n, d)) for n, d in _members(path)])


def repack(path: Path) -> None:
    """The same members, re-packed by another tar writer (GNU format, images first)."""
    _pack(path, sorted(_members(path), key=lambda m: (m[0].split(".")[0], not m[0].endswith(".png"))), tarfile.GNU_FORMAT)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncate_at_a_sample(path: Path) -> None:
    """Cut right after the members of the shard's second sample: a valid tar, shorter."""
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isfile()]
    end = members[3].offset_data + -(-members[3].size // 512) * 512
    path.write_bytes(path.read_bytes()[:end])


def delete(path: Path) -> None:
    path.unlink()


# case -> (change, what the error names, samples after index-shards, or None when index-shards cannot accept it)
CASES = {
    "edit": (edit, r"changed since they were indexed", 8),
    "repack": (repack, r"changed since they were indexed", 8),
    "truncate": (truncate, r"bytes, manifest.json records \d+ \(truncated\?\)", 6),
    "truncate_at_a_sample": (truncate_at_a_sample, r"truncated\?", 6),
    "delete": (delete, r"are missing: train-000001.tar", None),
}


@pytest.mark.parametrize("case", CASES)
def test_a_changed_shard_is_named_at_open_and_index_shards_describes_the_new_bytes(tmp_path, case, capsys):
    change, message, after = CASES[case]
    root = write_dataset(tmp_path / "d", 8, max_count=4)  # two shards of 4
    before = [MedRegionDataset(root, "train").record(i) for i in range(8)]
    change(root / SHARD)
    for open_split in (lambda: MedRegionDataset(root, "train"),
                       lambda: RegionSampleDataset(str(root), "train", PRE, on_bad="substitute")):
        with pytest.raises(DatasetError, match=message) as err:
            open_split()
        text = str(err.value)
        assert SHARD in text and "train-000000.tar" not in text
        assert case == "delete" or (isinstance(err.value, StaleShardError) and f"regionmed index-shards {root}" in text)
    # the command line says the same, one line, exit 2
    result = subprocess.run([sys.executable, "-m", "regionmed", "stats", str(root), "--no-plot"], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and SHARD in result.stderr and "Traceback" not in result.stderr
    if after is None:
        with pytest.raises(DatasetError, match=SHARD):
            index_dataset(root)
        return
    done = index_dataset(root)
    assert done["train"]["samples"] == after and (done["train"]["changes"] or case == "edit")
    ds = MedRegionDataset(root, "train")
    records = [ds.record(i) for i in range(len(ds))]
    assert len(records) == after and records[:4] == before[:4]
    if case == "edit":
        assert records[5]["report"] == "an edited report, longer than the one indexed"
        assert [r for i, r in enumerate(records) if i != 5] == [r for i, r in enumerate(before) if i != 5]
    elif case == "repack":
        assert records == before
    else:
        assert records == before[:after]
    # the statistics describe the new bytes: the same as one pass over the records
    data = RegionSampleDataset(str(root), "train", PRE)
    assert data.manifest_counts() == data.audit() and data.audit()["samples"] == after
    entry = read_manifest(root)["splits"]["train"]
    assert entry["samples"] == after and sum(s["samples"] for s in entry["shards"]) == after


def _big_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (160, 160), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_same_size_edit_inside_a_large_shard_is_caught_when_the_record_is_read(tmp_path):
    """A change of the same length in the middle of a shard leaves its size, head and tail as
    recorded: the record's CRC-32 in the index catches it, and the loader stops on it."""
    root = tmp_path / "d"
    with MedRegionWriter(root, "train", max_count=8) as w:
        for i in range(8):
            w.write({"schema_version": 1, "id": f"s{i}", "split": "train", "width": 160, "height": 160,
                     "summary": f"summary {i}", "report": f"report number {i}", "regions": [], "negatives": []},
                    _big_png(i), "png")
    write_manifest(root, {"train": w.summary()})
    shard = root / "train-000000.tar"
    raw = shard.read_bytes()
    at = raw.index(b"report number 4")
    assert 64 * 1024 < at < len(raw) - 64 * 1024  # outside the head and tail the identity hashes
    shard.write_bytes(raw[:at] + b"report NUMBER 4" + raw[at + 15:])
    ds = MedRegionDataset(root, "train")  # size, head and tail as recorded
    assert ds.record(3)["report"] == "report number 3"
    with pytest.raises(StaleShardError, match=r"train-000000.tar:s4: the record differs from the one indexed .*"
                                              r"regionmed index-shards"):
        ds.record(4)
    data = RegionSampleDataset(str(root), "train", PRE, on_bad="substitute")
    with pytest.raises(StaleShardError):
        data[4]
    index_dataset(root)
    assert MedRegionDataset(root, "train").record(4)["report"] == "report NUMBER 4"


def test_a_member_moved_after_the_split_was_opened_is_named_not_read_as_another(tmp_path):
    root = write_dataset(tmp_path / "d", 8, max_count=4)
    ds = MedRegionDataset(root, "train")
    repack(root / SHARD)  # after the open check
    with pytest.raises(StaleShardError, match=rf"{SHARD}:train-\d: the index places member .* re-packed or edited"):
        [ds.record(i) for i in range(4, 8)]
    assert ds.record(0)["id"] == "train-0"


def test_statistics_of_other_bytes_are_not_used(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", 8, max_count=4)
    old_stats = read_manifest(root)["splits"]["train"]["stats"]
    edit(root / SHARD)
    index_dataset(root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["splits"]["train"]["stats"] = old_stats  # e.g. a manifest restored from a copy
    (root / "manifest.json").write_text(json.dumps(manifest))
    data = RegionSampleDataset(str(root), "train", PRE)
    with caplog.at_level(logging.WARNING, logger="regionmed.data.shards"):
        assert data.manifest_counts() is None
    assert "computed over other shard bytes" in caplog.text and f"regionmed index-shards {root}" in caplog.text
    source = StreamSource.from_dataset("d", str(root), "train")
    assert source.stats is None


def test_a_dataset_without_shard_identities_loads_with_one_warning_and_index_shards_adds_them(tmp_path, caplog):
    root = write_dataset(tmp_path / "d", 8, max_count=4)
    manifest = json.loads((root / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["size"], shard["head_tail_sha256"]
    del manifest["splits"]["train"]["stats"]["shards_sha256"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="regionmed.data.shards"):
        a, b = MedRegionDataset(root, "train"), MedRegionDataset(root, "train")
    warned = [r.getMessage() for r in caplog.records if "no size or digest" in r.getMessage()]
    assert len(warned) == 1 and f"regionmed index-shards {root}" in warned[0]
    assert a.record(7) == b.record(7) and RegionSampleDataset(str(root), "train", PRE).manifest_counts()
    index_dataset(root)
    entry = read_manifest(root)["splits"]["train"]
    assert all(s["size"] == (root / s["name"]).stat().st_size for s in entry["shards"])
    assert entry["stats"]["shards_sha256"]
    truncate(root / SHARD)
    with pytest.raises(StaleShardError, match=SHARD):
        MedRegionDataset(root, "train")


@pytest.mark.parametrize("change", [truncate_at_a_sample, repack])
def test_the_streaming_reader_names_a_shard_that_differs_from_its_manifest(tmp_path, change):
    root = write_dataset(tmp_path / "d", 8, max_count=4)
    ids = {MedRegionDataset(root, "train").record(i)["id"] for i in range(8)}
    change(root / SHARD)
    # a local folder is checked up front, as the indexed reader does
    with pytest.raises(StaleShardError, match=SHARD):
        StreamSource.from_dataset("local", str(root), "train")
    # a URL is compared once each shard has been read: size and sample count
    source = StreamSource.from_dataset("piped", f"pipe:cat {root}", "train")
    stream = MedRegionStream([source], PRE, 2, shuffle_buffer=0)
    batches = [batch for _, batch in zip(range(4), stream)]  # one pass: 8 samples
    failures = [(w, why) for batch in batches for index, w, why in batch.bad_samples if index == SHARD_FAILURE]
    if change is truncate_at_a_sample:
        assert len(failures) == 1 and failures[0][0].endswith(SHARD)
        assert "changed since it was indexed" in failures[0][1] and "2 samples, the manifest lists 4" in failures[0][1]
        assert "bytes, the manifest records" in failures[0][1]
    else:  # the same samples in another layout (of another size): read, and the shard named
        assert len(failures) == 1 and failures[0][0].endswith(SHARD) and "bytes, the manifest records" in failures[0][1]
        assert "samples, the manifest lists" not in failures[0][1]
        assert {i for b in batches for i in b.ids} == ids
