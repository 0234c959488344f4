"""Locked towers and their feature cache (issue 17, item 2): cached training equals training
through the locked towers; the key never reuses stale features; the cache is bounded,
resumable after a kill, and keeps the readers' bad-sample rules."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from regionmed.apps.train.config import StageConfig, validate_run_config
from regionmed.apps.train.metrics import read_metrics
from regionmed.apps.train.trainer import Trainer
from regionmed.config import ConfigError
from regionmed.data.shards import SampleError
from regionmed.features import FeatureCacheError, ImageFeatureCache, TextFeatureCache, prune


def _locked_config(data, out, cache: bool, cache_dir, dtype="float32"):
    cfg = tiny_run_config(str(data), str(out), mode="crop", steps=(2, 3), batch_size=8)
    cfg.model.dense.head = "conv"
    cfg.train.lock.image = True
    cfg.train.lock.text = True
    cfg.train.lock.cache = cache
    cfg.train.lock.cache_dir = str(cache_dir)
    cfg.train.lock.cache_dtype = dtype
    cfg.train.stages = [
        StageConfig(name="warmup", steps=2, lr=1e-3, losses={"global": 1.0}),
        StageConfig(name="region", steps=3, lr=1e-3, use_rois=True,
                    losses={"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0, "grounding": 1.0}),
    ]
    return cfg


def _losses(out):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss.")}
            for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"}


def test_cached_training_equals_training_through_the_locked_towers(phantom_data, tmp_path):
    cache_dir = tmp_path / "cache"
    plain = Trainer(_locked_config(phantom_data, tmp_path / "plain", False, cache_dir), progress=False)
    plain.fit()
    cached = Trainer(_locked_config(phantom_data, tmp_path / "cached", True, cache_dir), progress=False)
    assert cached.data.features is not None and cached.task.text_cache is not None
    cached.fit()
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == list(range(5))
    assert "loss.grounding" in a[4]
    for step in a:
        assert a[step].keys() == b[step].keys()
        for k in a[step]:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-5, abs=1e-6), (step, k)
    # the locked towers did not move; what is on top did
    for name in ("image_tower", "text_tower"):
        for p, q in zip(getattr(plain.model, name).parameters(), getattr(cached.model, name).parameters()):
            torch.testing.assert_close(p, q)
    folders = sorted(p.name for p in cache_dir.iterdir() if p.is_dir())
    assert [f.split("-")[0] for f in folders] == ["image", "text"]
    # a second run with the same model, data and preprocessing reuses the cache
    again = Trainer(_locked_config(phantom_data, tmp_path / "again", True, cache_dir), progress=False)
    assert any("reusing" in n for n in again.notes)
    assert sorted(p.name for p in cache_dir.iterdir() if p.is_dir()) == folders


def test_another_preprocessing_or_changed_data_gets_another_cache(phantom_data, tmp_path):
    cache_dir = tmp_path / "cache"
    first = Trainer(_locked_config(phantom_data, tmp_path / "a", True, cache_dir), progress=False)
    cfg = _locked_config(phantom_data, tmp_path / "b", True, cache_dir)
    cfg.model.image.image_size = 48
    second = Trainer(cfg, progress=False)
    assert first.data.features.folder != second.data.features.folder
    shard = first.data.data.shard_paths[0]
    shard.touch()  # rewritten bytes change the shard's modification time
    third = Trainer(_locked_config(phantom_data, tmp_path / "c", True, cache_dir), progress=False)
    assert third.data.features.folder not in (first.data.features.folder, second.data.features.folder)


def _fake_rows(rows, bad=()):
    feats = [None if r in bad else {"pooled": torch.full((4,), float(r)), "grid": torch.full((4, 2, 2), float(r)),
                                    "crops": torch.full((r % 3, 4), float(r))} for r in rows]
    return feats, [(r, f"shard-0.tar:{r:04d}", "image member .png cannot be decoded") for r in rows if r in bad]


def test_a_killed_build_resumes_with_the_missing_chunks_only(tmp_path):
    calls = []

    def encode(rows):
        calls.append(list(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while computing the second chunk
        return _fake_rows(rows, bad={5})

    cache = ImageFeatureCache(tmp_path, {"k": 1}, n=10, chunk_rows=4)
    with pytest.raises(KeyboardInterrupt):
        cache.build(encode)
    assert cache.chunk_path(0).is_file() and not cache.chunk_path(1).is_file() and not cache.is_complete()
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".chunk")]  # no half-written chunk
    calls.clear()
    cache.build(lambda rows: (calls.append(list(rows)), _fake_rows(rows, bad={5}))[1])
    cache.finish()
    assert calls == [[4, 5, 6, 7], [8, 9]] and cache.is_complete()
    row = cache.row(7)
    assert row["pooled"].tolist() == [7.0] * 4 and row["crops"].shape == (1, 4)
    with pytest.raises(SampleError, match="cannot be decoded"):
        cache.row(5)  # the reader's bad-sample rules see the same error as without the cache


def test_the_cache_stays_within_its_bound(tmp_path):
    old = ImageFeatureCache(tmp_path, {"k": "old"}, n=4, chunk_rows=4)
    old.build(_fake_rows)
    old.finish()
    tiny = ImageFeatureCache(tmp_path, {"k": "new"}, n=4, chunk_rows=4, max_bytes=10)
    with pytest.raises(FeatureCacheError, match="cache_max_gb"):
        tiny.build(_fake_rows)
    # room for the new one only if the least recently used other cache goes
    size = sum(p.stat().st_size for p in old.folder.rglob("*") if p.is_file())
    assert prune(tmp_path, tmp_path / "image-new", need=size, max_bytes=size + 10) == [old.folder]
    assert not old.folder.exists()


def test_text_cache_encodes_each_text_once_and_unknown_texts_on_demand(tmp_path):
    seen = []

    def encode(texts):
        seen.extend(texts)
        return torch.stack([torch.full((3,), float(len(t))) for t in texts])

    cache = TextFeatureCache(tmp_path, {"tower": 1}, ["a", "bb", "a"], dtype="float32")
    cache.build(encode)
    assert seen == ["a", "bb"]
    out = cache.lookup(["bb", "ccc", "a", "ccc"], encode)
    assert out[:, 0].tolist() == [2.0, 3.0, 1.0, 3.0] and seen == ["a", "bb", "ccc"]
    TextFeatureCache(tmp_path, {"tower": 1}, ["bb", "a"], dtype="float32").build(encode)  # same texts: read back
    assert seen == ["a", "bb", "ccc"]


def test_a_stage_that_trains_a_locked_tower_is_refused(phantom_data, tmp_path):
    cfg = _locked_config(phantom_data, tmp_path / "x", True, tmp_path / "cache")
    cfg.train.stages[0].trainable = ["image_tower", "projections"]
    with pytest.raises(ConfigError, match=r"train.stages\[0\].trainable names image_tower, which train.lock locks"):
        validate_run_config(cfg)


def test_module_digest_reads_every_buffer_and_sees_a_change():
    """BatchNorm's num_batches_tracked is a 0-dim int64 buffer: the digest reads it (it crashed on
    0-dim tensors) and any change of a parameter or buffer changes the digest."""
    from regionmed.features import module_digest

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    before = module_digest(net)
    assert before == module_digest(net)
    net[1].num_batches_tracked += 1
    after = module_digest(net)
    assert after != before
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-3
    assert module_digest(net) != after
