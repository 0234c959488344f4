"""The streaming reader: shards from a local HTTP server trained on by two real
processes (torchrun, gloo), resume at shard granularity, pipe: URLs, bad samples
named and counted, config errors naming the field."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import http_server, tiny_run_config
from regionmed.apps.train.config import SourceConfig, validate_run_config
from regionmed.apps.train.metrics import read_metrics
from regionmed.config import ConfigError, to_dict
from regionmed.data.shards import MedRegionDataset
from regionmed.data.stream import RESUME_PASS, RESUME_RESAMPLED, RESUME_SHARD, MedRegionStream, StreamSource, make_stream_loader
from regionmed.data.transforms import Preprocessor

ROOT = Path(__file__).resolve().parents[1]
PRE = Preprocessor(image_size=32, roi_size=16, max_rois=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """32 phantoms in 8 shards of 4."""
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    out = tmp_path_factory.mktemp("sharded")
    write_phantom_dataset(out, n_train=32, n_test=0, seed=1, config=PhantomConfig(image_size=64), shard_max_count=4,
                          progress=False)
    return out


@pytest.fixture
def http_root(sharded):
    with http_server(sharded) as url:
        yield url


def _shard_of(root: Path) -> dict[str, int]:
    """id -> shard position in the manifest."""
    ds = MedRegionDataset(root, "train")
    return {ds.record(i)["id"]: int(ds.index.shard[i]) for i in range(len(ds))}


def test_two_processes_train_from_shards_served_over_http(sharded, http_root, tmp_path):
    cfg = tiny_run_config("", str(tmp_path / "run"), steps=(2, 2), batch_size=8)
    cfg.data.reader = "streaming"
    # the same shards twice: over HTTP and from the local folder, mixed 1 : 3
    cfg.data.sources = [SourceConfig(name="phantoms", path=http_root), SourceConfig(name="local", path=str(sharded), weight=3)]
    cfg.data.shuffle_buffer = 8
    cfg.train.checkpoint_every = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", REGIONMED_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "regionmed", "train", "--config", str(tmp_path / "run.yaml"), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    data = next(r for r in rows if r["event"] == "data")
    assert data["reader"] == "streaming" and data["resume_guarantee"] == "shard" and data["counts_from"] == "manifest"
    assert data["samples"] == 64 and data["sources"]["phantoms"]["where"] == http_root
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3] and all(r["loss.total"] == r["loss.total"] for r in steps)
    # per-source counts summed over both ranks
    assert sum(steps[-1]["source_samples"].values()) == 32 and steps[-1]["source_samples"]["local"] > 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["reader"] == "streaming" and state["stream"]["slots"] == 2 and set(state["stream"]["done"]) == {"0", "1"}
    assert all(len(v) == 2 for v in state["stream"]["done"].values())  # shards done per source, per slot


def _ids(batches) -> list[str]:
    return [i for b in batches for i in b.ids]


def test_a_resumed_stream_skips_no_shard_and_repeats_only_unfinished_ones(sharded, caplog):
    source = StreamSource.from_dataset("p", str(sharded), "train")
    shard_of = _shard_of(sharded)
    kw = dict(seed=3, shuffle_buffer=6, use_rois=True)
    first = MedRegionStream([source], PRE, 4, **kw)
    assert first.resume_guarantee == RESUME_SHARD  # what a resume of this new run will keep
    assert MedRegionStream([source], PRE, 4, resampled=True, **kw).resume_guarantee == RESUME_RESAMPLED
    it = iter(make_stream_loader(first))
    before = [next(it) for _ in range(3)]  # 12 samples
    done = before[-1].stream_state["0"][0]
    assert 0 < done < 8
    resumed = MedRegionStream([source], PRE, 4, resume={"slots": 1, "step": 3, "done": {"0": [done]}}, **kw)
    assert resumed.resume_guarantee == RESUME_SHARD
    # the slot's shard order of pass 0: which shards were complete at the checkpoint
    from regionmed.data.stream import slot_shards

    order = [shard for _, (_, _, shard) in zip(range(8), slot_shards(8, 3, 0, 0, 1, False))]
    finished, pending = set(order[:done]), set(order[done:])
    assert {shard_of[i] for i in _ids(before)} >= finished  # a finished shard was delivered
    seen, after = set(_ids(before)), []
    for _, batch in zip(range(100), make_stream_loader(resumed)):
        after += batch.ids
        if seen | set(after) == set(shard_of):
            break
    # every sample of pass 0 was delivered, before or after the resume: no shard skipped
    assert seen | set(after) == set(shard_of)
    n_pending = 4 * len(pending)
    # no sample of a finished shard until every pending sample was read (at most the buffer's worth earlier)
    early = after[: n_pending - kw["shuffle_buffer"]]
    assert len(early) >= 4 and not {shard_of[i] for i in early} & finished
    # another number of reading slots: restart at the start of the earliest unfinished pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with caplog.at_level(logging.WARNING, logger="regionmed.data.stream"):
        other = MedRegionStream([source], PRE, 4, resume={"slots": 2, "step": 3, "done": {"0": [1], "1": [2]}}, **kw)
    assert other.resume_guarantee == RESUME_PASS and other.initial_state() == {"0": [0]}
    warned = [r.getMessage() for r in caplog.records if "'pass'" in r.getMessage()]
    assert len(warned) == 1 and "2 reading slot(s) with 1 (world size 1 x data.num_workers 1)" in warned[0]


def test_a_shuffle_buffer_larger_than_a_slots_pass_is_capped_with_a_warning(sharded, caplog):
    source = StreamSource.from_dataset("p", str(sharded), "train")  # 32 samples
    with caplog.at_level(logging.WARNING, logger="regionmed.data.stream"):
        stream = MedRegionStream([source], PRE, 4, seed=1, shuffle_buffer=1000)
    assert stream.shuffle_buffer == 32
    warned = [r.getMessage() for r in caplog.records if "data.shuffle_buffer" in r.getMessage()]
    assert len(warned) == 1 and "1000" in warned[0] and "32" in warned[0]

    class Counting(MedRegionStream):
        def _shard_samples(self, url, bad, expected=(None, None)):
            opened.append(url)
            yield from super()._shard_samples(url, bad, expected)

    # the first batch comes after one pass of the 8 shards and the next shard (an uncapped buffer of 1000
    # would read ~31 passes first and hold ~31 copies of each sample)
    for buffer, most in ((1000, 9), (8, 3)):
        opened = []
        first = next(iter(Counting([source], PRE, 4, seed=1, shuffle_buffer=buffer)))
        assert 1 <= len(opened) <= most and len(set(first.ids)) == 4
    # two slots read 16 each per pass; a buffer within that, or sources without counts, are left as they are
    assert MedRegionStream([source], PRE, 4, world=2, shuffle_buffer=1000).shuffle_buffer == 16
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regionmed.data.stream"):
        assert MedRegionStream([source], PRE, 4, shuffle_buffer=8).shuffle_buffer == 8
        urls = StreamSource.from_urls("u", [f"{sharded}/train-{{000000..000007}}.tar"])
        assert MedRegionStream([urls], PRE, 4, shuffle_buffer=1000).shuffle_buffer == 1000
    assert not caplog.records


def test_shards_through_pipe_urls_and_a_bad_sample_named_and_counted(sharded, tmp_path):
    # a copy of shard 0 whose second image does not decode
    bad = tmp_path / "bad.tar"
    with tarfile.open(sharded / "train-000000.tar") as src, tarfile.open(bad, "w") as dst:
        pngs = 0
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".png"):
                pngs += 1
                if pngs == 2:
                    data, broken = b"not a png", member.name.split(".")[0]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    urls = [f"pipe:cat {bad}", f"pipe:cat {sharded}/train-{{000001..000003}}.tar"]
    source = StreamSource.from_urls("piped", urls)
    assert len(source.urls) == 4 and source.samples is None
    batches = list(b for _, b in zip(range(3), make_stream_loader(MedRegionStream([source], PRE, 5, shuffle_buffer=0))))
    assert sum(len(b) for b in batches) == 15
    named = [w for b in batches for _, w, _ in b.bad_samples]
    assert named == [f"pipe:cat {bad}:{broken}"]
    assert broken not in _ids(batches) and all(b.sources == ["piped"] * len(b) for b in batches)


def test_trainer_streams_resumes_at_shard_granularity_and_records_it(sharded, tmp_path):
    from regionmed.apps.train.trainer import Trainer

    cfg = tiny_run_config("", str(tmp_path / "run"), mode="none", steps=(2, 2), batch_size=4)
    cfg.data.reader, cfg.data.urls, cfg.data.shuffle_buffer = "streaming", [f"{sharded}/train-{{000000..000007}}.tar"], 4
    cfg.train.checkpoint_every = 2
    trainer = Trainer(cfg, progress=False)
    assert trainer.counts_from == "none" and trainer.n_samples is None
    trainer.total_steps = 2  # stop after the first checkpoint, as an interrupted run would
    trainer.fit()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["reader"] == "streaming" and state["stream"]["slots"] == 1 and state["stream"]["step"] == 2
    resumed = Trainer(cfg, resume=True, progress=False)
    summary = resumed.fit()
    assert summary["steps"] == 4 and resumed.resume_guarantee == RESUME_SHARD
    data = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "data"]
    # a new run records the guarantee its resume will have
    assert [d["resume_guarantee"] for d in data] == ["shard", "shard"]
    # with ROIs the start-of-run checks need counts, which bare URLs do not give: said so, without an index-shards hint
    cfg.model.roi.mode, cfg.train.output_dir = "crop", str(tmp_path / "run-rois")
    notes = [n for n in Trainer(cfg, progress=False).notes if "build-time statistics" in n]
    assert notes == ["urls: shard URLs without a manifest: no build-time statistics, the start-of-run data checks are skipped"]
    cfg.model.roi.mode = "none"
    # stages in epochs need the sample count, which bare URLs do not give
    cfg.train.stages[0].steps, cfg.train.stages[0].epochs, cfg.train.output_dir = None, 1.0, str(tmp_path / "run2")
    with pytest.raises(ConfigError, match=r"train.stages\[0\].epochs needs the number of samples"):
        Trainer(cfg, progress=False)


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c.data, "urls", ["a.tar"]), r"data.urls needs data.reader: streaming"),
    (lambda c: c.data.sources.append(SourceConfig(path="d", weight=0)), r"data.sources\[0\].weight is 0: must be > 0"),
    (lambda c: c.data.sources.append(SourceConfig(path="http://h/d")), r"data.sources\[0\].path is the URL"),
    (lambda c: c.data.sources.append(SourceConfig(path="d", urls=["x"])), r"data.sources\[0\] needs exactly one of"),
    (lambda c: setattr(c.train, "accum_freq", 0), r"train.accum_freq is 0: must be >= 1"),
    (lambda c: setattr(c.data, "max_open_files", 0), r"data.max_open_files must be >= 1"),
])
def test_data_config_errors_name_the_field(change, match):
    cfg = tiny_run_config("", "out")
    change(cfg)
    with pytest.raises(ConfigError, match=match):
        validate_run_config(cfg, "run.yaml")
