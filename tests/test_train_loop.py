"""The trainer's loop features: gradient accumulation (train.accum_freq) and validation in the
loop (validation.every), end to end with real shards, one process and two (torchrun, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import tiny_run_config
from regionmed.apps.train.config import validate_run_config
from regionmed.apps.train.metrics import read_metrics
from regionmed.apps.train.trainer import train
from regionmed.config import ConfigError, to_dict
from regionmed.model.config import DenseConfig


def events(out: Path, kind: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["event"] == kind}


def assert_same_losses(a: dict[int, dict], b: dict[int, dict], tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        keys = {k for k in a[step] if k.startswith("loss.")}
        assert keys == {k for k in b[step] if k.startswith("loss.")}
        for k in keys:
            assert abs(a[step][k] - b[step][k]) <= tol * max(1.0, abs(a[step][k])), (step, k, a[step][k], b[step][k])


def with_grounding(cfg):
    """A grid head and the grounding term in the last stage (beside the region terms)."""
    cfg.model.dense = DenseConfig(head="conv", width=8, layers=1)
    cfg.train.stages[-1].losses = {**cfg.train.stages[-1].losses, "grounding": 1.0}
    return cfg


def run(phantom_data, out: Path, batch_size: int, accum: int = 1, val_every: int = 0) -> dict:
    cfg = with_grounding(tiny_run_config(str(phantom_data), str(out), steps=(2, 2), batch_size=batch_size))
    cfg.train.accum_freq = accum
    cfg.validation.every = val_every
    cfg.validation.split = "test"
    cfg.validation.max_samples = 16
    return train(cfg, progress=False)


def test_accumulation_trains_as_the_large_batch(phantom_data, tmp_path):
    """accum_freq 2 x batch 8 takes the same 16 samples per step as batch 16, and gives the
    same losses at every step (so the same updates), through both stages."""
    run(phantom_data, tmp_path / "large", batch_size=16)
    run(phantom_data, tmp_path / "accum", batch_size=8, accum=2)
    large, accum = events(tmp_path / "large", "step"), events(tmp_path / "accum", "step")
    assert "loss.region" in large[3] and "loss.grounding" in large[3]
    assert_same_losses(large, accum)
    data = next(r for r in read_metrics(tmp_path / "accum" / "metrics.jsonl") if r["event"] == "data")
    assert data["samples_per_step"] == 16


def test_validation_logs_records_and_changes_nothing_else(phantom_data, tmp_path):
    plain = run(phantom_data, tmp_path / "plain", batch_size=8)
    validated = run(phantom_data, tmp_path / "val", batch_size=8, val_every=2)
    val = events(tmp_path / "val", "val")
    assert sorted(val) == [1, 3]  # after steps 1 and 3 (every 2, and the last)
    assert "region_i2t_R@1" not in val[1] and "region_i2t_R@1" in val[3]  # stage 2 uses ROIs
    for record in val.values():
        assert record["samples"] == 16 and 0 <= record["i2t_R@1"] <= 1 and record["loss.total"] > 0
    assert validated["validation"]["loss.total"] == val[3]["loss.total"]
    # Validation restores every random state: the training run is the same as without it.
    assert_same_losses(events(tmp_path / "plain", "step"), events(tmp_path / "val", "step"), tol=0)
    a = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "val" / "model" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    assert plain["steps"] == validated["steps"] == 4
    assert (tmp_path / "val" / "loss_curve.png").stat().st_size > 0


def test_a_missing_validation_split_is_an_error_before_step_0(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "out"), steps=(1, 1))
    cfg.validation.every = 1
    cfg.validation.split = "val"  # phantoms have train and test only
    with pytest.raises(ConfigError, match="validation.split 'val'"):
        train(cfg, progress=False)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    cfg.validation.every = -2
    with pytest.raises(ConfigError, match="validation.every"):
        validate_run_config(cfg)


def test_two_processes_with_accumulation_equal_one_process_without(phantom_data, tmp_path):
    """torchrun, 2 ranks x accum_freq 2 x micro-batch 2 = one process with batch 8: DDP's
    no_sync passes and the gathered local loss compose with the recomputed micro-batches."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", REGIONMED_THREADS="1", HF_HUB_OFFLINE="1")
    outs = {}
    for name, batch, accum, launcher in (("single", 8, 1, []),
                                         ("ddp", 4, 2, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        cfg = with_grounding(tiny_run_config(str(phantom_data), str(tmp_path / name), steps=(2, 2), batch_size=batch))
        cfg.train.accum_freq = accum
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(to_dict(cfg)))
        args = [sys.executable, *launcher, *(["-m", "regionmed"] if not launcher else ["-m", "regionmed"]),
                "train", "--config", str(config), "--no-progress"]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        outs[name] = tmp_path / name
    assert "loss.grounding" in events(outs["single"], "step")[3]
    assert_same_losses(events(outs["single"], "step"), events(outs["ddp"], "step"))
    a = load_file(str(outs["single"] / "model" / "model.safetensors"))
    b = load_file(str(outs["ddp"] / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_loss_curves_are_smoothed_within_stages_only():
    from regionmed.apps.train.metrics import stage_curves

    steps = [{"step": i, "loss.total": 2.0} for i in range(3)] + [{"step": i, "loss.total": 8.0} for i in range(3, 13)]
    curves = stage_curves(steps, "loss.total", [(0, 3), (3, float("inf"))], smooth=5)
    assert len(curves) == 2
    (x0, y0), (x1, y1) = curves
    assert list(x0) == [0, 1, 2] and set(y0) == {2.0}  # a short stage is drawn, unsmoothed
    assert list(x1) == list(range(7, 13)) and set(y1) == {8.0}  # no window mixes the two stages


def test_config_refuses_what_the_readers_cannot_do(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "out"))
    cfg.data.reader, cfg.data.audit = "streaming", "always"
    with pytest.raises(ConfigError, match="data.audit is 'always', which the streaming reader cannot do"):
        validate_run_config(cfg)
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "out"))
    cfg.validation.every, cfg.validation.data = 5, "http://127.0.0.1:8000/ds"
    with pytest.raises(ConfigError, match="validation.data .* not a URL"):
        validate_run_config(cfg)
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "out"))
    cfg.data.max_bad_shards = -1
    with pytest.raises(ConfigError, match="data.max_bad_shards"):
        validate_run_config(cfg)


def test_validation_loss_batch_defaults_to_the_rows_of_one_training_loss(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "out"), steps=(1, 1), batch_size=4)
    cfg.train.accum_freq = 2
    cfg.validation.every, cfg.validation.split, cfg.validation.max_samples = 2, "test", 16
    train(cfg, progress=False)
    val = events(tmp_path / "out", "val")
    assert [r["loss_batch"] for r in val.values()] == [8]


def test_a_lost_shard_stops_a_streaming_run_unless_allowed(phantom_data, tmp_path):
    """A shard that cannot be read loses an unknown number of samples: counted apart from bad
    samples, against data.max_bad_shards (0 by default), after a checkpoint."""
    from regionmed.apps.train.trainer import TrainingError

    shard = sorted(Path(phantom_data).glob("train-*.tar"))[0]
    missing = tmp_path / "gone-000001.tar"
    cfg = tiny_run_config("", str(tmp_path / "strict"), steps=(4, 3), batch_size=8)  # 56 > the 48 samples of the shard
    cfg.data.reader, cfg.data.urls, cfg.data.shuffle_buffer = "streaming", [str(missing), str(shard)], 0
    with pytest.raises(TrainingError, match=r"1 shard\(s\) .* more than data.max_bad_shards = 0"):
        train(cfg, progress=False)
    assert (tmp_path / "strict" / "checkpoints").is_dir()
    cfg.train.output_dir, cfg.data.max_bad_shards = str(tmp_path / "lenient"), 1
    summary = train(cfg, progress=False)
    assert summary["counters"]["bad_shards"] == 1 and summary["steps"] == 7
