"""Dataset mixing: per-source sample counts follow the weights (within a binomial
bound), for the indexed reader's deterministic sampler and the streaming reader's
weighted draws; the trainer logs the counts per source; the indexed mix is exact
under resumption and independent of the world size."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_run_config
from regionmed.apps.train.config import SourceConfig
from regionmed.apps.train.metrics import read_metrics
from regionmed.data.loader import MixedStepBatchSampler, mixed_counts
from regionmed.data.stream import MedRegionStream, StreamSource, make_stream_loader
from regionmed.data.transforms import Preprocessor


def within_binomial(count: int, n: int, p: float, z: float = 4.0) -> bool:
    """``count`` of ``n`` draws is within ``z`` standard deviations of a Binomial(n, p) mean."""
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    roots = []
    for seed, n in ((1, 24), (2, 8)):
        out = tmp_path_factory.mktemp(f"mix{seed}")
        write_phantom_dataset(out, n_train=n, n_test=0, seed=seed, config=PhantomConfig(image_size=64), shard_max_count=4,
                              progress=False)
        roots.append(out)
    return roots


def test_the_indexed_mix_follows_the_weights_and_is_exact_and_world_size_independent():
    sizes, weights, batch, steps = [30, 10, 5], [1.0, 3.0, 0.5], 8, 60
    sampler = MixedStepBatchSampler(sizes, weights, batch, seed=4, total_steps=steps)
    drawn = [i for b in sampler for i in b]
    per_source = [sum(lo <= i < lo + n for i in drawn) for lo, n in zip([0, 30, 40], sizes)]
    n = len(drawn)
    for count, w in zip(per_source, weights):
        assert within_binomial(count, n, w / sum(weights)), (per_source, weights)
    assert per_source == mixed_counts(weights, n)  # the largest-remainder shares of the draws so far
    # a source small against its weight is upsampled: every one of its samples drawn, several times
    assert sum(30 <= i < 40 for i in drawn) > 10 and set(range(30, 40)) <= set(drawn)
    # two ranks together take the same global batches; a resumed sampler continues exactly
    ranks = [list(MixedStepBatchSampler(sizes, weights, batch, 4, steps, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == list(MixedStepBatchSampler(sizes, weights, batch, 4, steps))
    assert list(MixedStepBatchSampler(sizes, weights, batch, 4, steps, start_step=37)) == list(sampler)[37:]


def test_the_streaming_mix_follows_the_weights(two_datasets):
    pre = Preprocessor(image_size=32, roi_size=16, max_rois=3)
    sources = [StreamSource.from_dataset("big", str(two_datasets[0]), "train", 1.0),
               StreamSource.from_dataset("small", str(two_datasets[1]), "train", 3.0)]
    stream = MedRegionStream(sources, pre, 8, seed=5, shuffle_buffer=4)
    tags = [s for _, b in zip(range(25), make_stream_loader(stream)) for s in b.sources]
    assert len(tags) == 200
    assert within_binomial(tags.count("small"), 200, 0.75) and tags.count("big") + tags.count("small") == 200


def test_mixed_training_logs_per_source_counts_that_follow_the_weights(two_datasets, tmp_path):
    from regionmed.apps.train.trainer import Trainer

    cfg = tiny_run_config("", str(tmp_path / "run"), steps=(3, 3), batch_size=8)
    cfg.data.sources = [SourceConfig(name="big", path=str(two_datasets[0]), weight=1.0),
                        SourceConfig(name="small", path=str(two_datasets[1]), weight=3.0)]
    summary = Trainer(cfg, progress=False).fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    data = next(r for r in rows if r["event"] == "data")
    assert data["samples"] == 32 and data["sources"]["small"]["weight"] == 3.0 and data["counts_from"] == "manifest"
    last = [r for r in rows if r["event"] == "step"][-1]
    counts = last["source_samples"]
    assert counts["big"] + counts["small"] == 6 * 8 == summary["counters"]["source.big"] + summary["counters"]["source.small"]
    assert within_binomial(counts["small"], 48, 0.75)
