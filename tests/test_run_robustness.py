"""Issue 10, kinds 9-14: configuration values, a corrupt sample mid-run, evaluation with
one bad sample, damaged model folders, resume bookkeeping, and a run that cannot learn
what it was asked. Small datasets written here (real tar shards in tmp_path), a small
model (2-layer, 64-wide text tower) so that each training run takes seconds."""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import tiny_model_mapping
from regionmed.apps.train.checkpoint import (
    CheckpointError,
    clean_stale_temporaries,
    find_checkpoint,
    save_model_folder,
)
from regionmed.apps.train.config import RunConfig, StageConfig, load_run_config
from regionmed.apps.train.metrics import read_metrics, truncate_metrics
from regionmed.apps.train.trainer import Trainer, TrainingError
from regionmed.config import ConfigError, from_dict, to_dict
from regionmed.data.loader import RegionSampleDataset, StepBatchSampler, collate
from regionmed.data.shards import SampleError, write_manifest
from regionmed.data.transforms import Preprocessor
from regionmed.model.clip import RegionMedCLIP, load
from regionmed.model.config import ModelConfig
from regionmed.model.towers import WeightsError, read_state_dict, text_position_limit
from regionmed.optim import GuardedStep, NonFiniteWeightsError

SMALL_MODEL = tiny_model_mapping(embed_dim=32, text={"config_overrides": {"hidden_size": 64, "num_attention_heads": 2,
                                                                            "intermediate_size": 128}})

LONG = "word " * 60  # longer than context_length = 32 tokens


# --------------------------------------------------------------------------- helpers
def _png(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_split(root: Path, split: str, n: int, *, bad_image: dict[int, bytes] | None = None,
                bad_json: set[int] = frozenset(), regions: bool = False, long_reports: set[int] = frozenset(),
                negatives: bool = False) -> Path:
    """A MedRegion split written member by member (so that members can be broken)."""
    root.mkdir(parents=True, exist_ok=True)
    bad_image = bad_image or {}
    n_regions = 0
    with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
        for i in range(n):
            rec = {"schema_version": 1, "id": f"{split}{i}", "split": split, "width": 32, "height": 32,
                   "summary": f"finding {i % 3}", "report": (LONG if i in long_reports else "") + f"report {i}",
                   "regions": [], "negatives": [{"text": f"not report {i}", "rule": "laterality"}] if negatives else []}
            if regions:
                rec["regions"] = [{"box": [4, 4, 20, 20], "caption": f"lesion {i}",
                                   "negatives": [{"text": f"no lesion {i}", "rule": "laterality"}] if negatives else []}]
                n_regions += 1
            members = {f"{split}{i}.png": bad_image.get(i, _png(i)),
                       f"{split}{i}.json": b'{"schema_version": 1, "id": ' if i in bad_json else json.dumps(rec).encode()}
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = root / "manifest.json"
    splits = json.loads(manifest.read_text())["splits"] if manifest.is_file() else {}
    splits[split] = {"shards": [{"name": f"{split}-000000.tar", "samples": n}], "samples": n, "regions": n_regions}
    write_manifest(root, splits)
    return root


def small_config(data: Path, out: Path, steps=(2, 4), batch_size: int = 4, mode: str = "none") -> RunConfig:
    model = copy.deepcopy(SMALL_MODEL)
    model["roi"]["mode"] = mode
    cfg = RunConfig(seed=0, model=from_dict(ModelConfig, model))
    cfg.data.train = str(data)
    cfg.train.batch_size = batch_size
    cfg.train.output_dir = str(out)
    cfg.train.tensorboard = False
    cfg.train.checkpoint_every = 2
    cfg.train.stages = [StageConfig(name="warmup", steps=steps[0], lr=1e-3, losses={"global": 1.0}),
                        StageConfig(name="joint", steps=steps[1], lr=1e-3, losses={"global": 1.0, "summary": 0.5})]
    return cfg


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"]


def _losses(out: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss.")} for r in _steps(out)}


# ------------------------------------------------------------ the shared training data
N, BATCH, SEED = 16, 4, 0
BAD = b"this member is not an image"


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    """16 samples, 4 per step: epoch 0 is steps 0-3, epoch 1 steps 4-7. One member is not an
    image; it is met in epoch 0 and again at step 4 or 5 (after the checkpoint of step 4).
    Three reports are too long; all are met in epoch 0, none in steps 4-5."""
    sampler = StepBatchSampler(N, BATCH, SEED, 8)
    after = set(sampler.global_indices(4)) | set(sampler.global_indices(5))
    bad = sorted(after)[0]
    long = set(sorted(set(range(N)) - after - {bad, (bad + 1) % N})[:3])
    root = write_split(tmp_path_factory.mktemp("run_data"), "train", N, bad_image={bad: BAD}, long_reports=long)
    return root, bad, long


@pytest.fixture(scope="module")
def reference_run(run_data, tmp_path_factory):
    """An uninterrupted run: 6 steps, checkpoints at 2, 4 and 6 (the last two kept)."""
    root, _, _ = run_data
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = Trainer(small_config(root, out), progress=False).fit()
    return out, summary


# ====================================================================== kind 9: config values
BASE = "train:\n  stages:\n    - name: a\n      steps: 3\n"


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, field", [
    ("train:\n  stages:\n    - {name: a, steps: 3, lr: .inf}\n", r"train\.stages\[0\]\.lr"),  # the example
    ("train:\n  stages:\n    - {name: a, steps: 3, lr: .nan}\n", r"train\.stages\[0\]\.lr"),
    ("train:\n  stages:\n    - {name: a, steps: 3, weight_decay: -.inf}\n", r"train\.stages\[0\]\.weight_decay"),
    ("train:\n  stages:\n    - {name: a, steps: 3, epochs: null, losses: {global: .nan}}\n", r"train\.stages\[0\]\.losses\.global"),
    ("train:\n  stages:\n    - {name: a, steps: 3, lr_scale: {text_tower: .inf}}\n", r"train\.stages\[0\]\.lr_scale\.text_tower"),
    ("train:\n  grad_clip: .inf\n  stages:\n    - {name: a, steps: 3}\n", r"train\.grad_clip"),
    ("train:\n  eps: .nan\n  stages:\n    - {name: a, steps: 3}\n", r"train\.eps"),
    ("train:\n  betas: [0.9, .nan]\n  stages:\n    - {name: a, steps: 3}\n", r"train\.betas\[1\]"),
    ("model:\n  logit_scale_init: .inf\n" + BASE, r"model\.logit_scale_init"),
    ("model:\n  image:\n    mean: [.nan, 0.5, 0.5]\n" + BASE, r"model\.image\.mean\[0\]"),
    ("model:\n  image:\n    kwargs: {drop_rate: .inf}\n" + BASE, r"model\.image\.kwargs\.drop_rate"),
    ("model:\n  roi:\n    gate_init: -.inf\n" + BASE, r"model\.roi\.gate_init"),
])
def test_nonfinite_numbers_are_config_errors_naming_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=field) as err:
        load_run_config(path)
    assert str(path) in str(err.value) and "finite" in str(err.value)


@pytest.mark.parametrize("text, field", [
    ("train:\n  log_every: 0\n" + BASE[7:], r"train\.log_every must be >= 1"),  # the example
    ("train:\n  stages:\n    - {name: a, steps: 3, trainable: []}\n", r"train\.stages\[0\]\.trainable is empty"),  # the issue's
    ("train:\n  stages:\n    - {name: a, steps: 3, trainable: [roi_processor]}\n", r"train\.stages\[0\]\.trainable.*nothing to train"),
    ("train:\n  stages:\n    - {name: a, steps: 3, losses: {global: 0}}\n", r"train\.stages\[0\]\.losses.*at least one weight"),
    ("train:\n  stages:\n    - {name: a, steps: 3, weight_decay: -0.1}\n", r"train\.stages\[0\]\.weight_decay must be >= 0"),
    ("train:\n  stages:\n    - {name: '', steps: 3}\n", r"train\.stages\[0\]\.name is empty"),
    ("train:\n  stages:\n    - {name: a, steps: 3, warmup_steps: -1}\n", r"train\.stages\[0\]\.warmup_steps"),
    ("train:\n  checkpoint_every: -1\n" + BASE[7:], r"train\.checkpoint_every"),
    ("train:\n  keep_checkpoints: -1\n" + BASE[7:], r"train\.keep_checkpoints"),
    ("train:\n  max_nonfinite: 0\n" + BASE[7:], r"train\.max_nonfinite"),
    ("train:\n  eps: 0\n" + BASE[7:], r"train\.eps must be > 0"),
    ("train:\n  betas: [0.9]\n" + BASE[7:], r"train\.betas"),
    ("train:\n  betas: [1.0, 0.9]\n" + BASE[7:], r"train\.betas"),
    ("train:\n  output_dir: ''\n" + BASE[7:], r"train\.output_dir is empty"),
    ("seed: -1\n" + BASE, r"seed is -1"),
    ("data:\n  split: training\n" + BASE, r"data\.split is 'training'"),
    ("data:\n  num_workers: -2\n" + BASE, r"data\.num_workers"),
    ("data:\n  max_bad_samples: -1\n" + BASE, r"data\.max_bad_samples"),
    ("model:\n  image:\n    name: ''\n" + BASE, r"model\.image\.name is empty"),
    ("model:\n  logit_scale_init: 50\n" + BASE, r"model\.logit_scale_init"),
    ("model:\n  roi:\n    max_rois: 0\ntrain:\n  stages:\n    - {name: a, steps: 3, use_rois: true}\n", r"model\.roi\.max_rois is 0"),
])
def test_out_of_range_fields_are_config_errors_naming_file_and_field(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=field) as err:
        load_run_config(path)
    assert str(path) in str(err.value)


def test_trainer_validates_a_config_built_in_code(tmp_path):
    cfg = small_config(tmp_path / "nodata", tmp_path / "out")
    cfg.train.stages[0].lr = math.inf
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.lr is inf"):
        Trainer(cfg, progress=False)
    cfg.train.stages[0].lr = 1e-3
    cfg.data.train = ""
    with pytest.raises(ConfigError, match="data.train is empty"):
        Trainer(cfg, progress=False)


def test_cli_train_with_inf_lr_exits_2_naming_file_and_field(tmp_path, capsys):
    from regionmed.apps.cli import main

    path = _write(tmp_path, "train:\n  stages:\n    - {name: a, steps: 2, lr: .inf}\n")
    assert main(["train", "--config", str(path), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "train.stages[0].lr" in err and "Traceback" not in err


def test_context_length_above_the_text_position_limit_fails_when_the_model_is_built():
    cfg = copy.deepcopy(SMALL_MODEL)
    cfg["text"]["context_length"] = 1024  # the example: a 512-position encoder
    with pytest.raises(ConfigError, match=r"context_length is 1024.*at most 512 tokens"):
        RegionMedCLIP(from_dict(ModelConfig, cfg))
    cfg["text"]["context_length"] = 512  # the limit itself is fine
    assert RegionMedCLIP(from_dict(ModelConfig, cfg)).text_tower.max_length == 512


def test_text_position_limit_of_encoder_kinds():
    from transformers import BertConfig, RobertaConfig

    assert text_position_limit(BertConfig(max_position_embeddings=512)) == 512
    # RoBERTa's positions start after the padding index: 514 positions take 512 tokens.
    assert text_position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512

    class NoPositions:  # relative positions: the tokenizer's limit, if it states a real one
        pass

    class Tok:
        model_max_length = 256

    assert text_position_limit(NoPositions(), Tok()) == 256
    Tok.model_max_length = int(1e30)  # transformers' "not set"
    assert text_position_limit(NoPositions(), Tok()) is None


@pytest.mark.parametrize("change, match", [
    ({"roi": {"num_heads": 5}}, r"num_heads is 5.*divide the image tower's width 192"),
    ({"image": {"name": "vit_nonexistent_model"}}, r"model\.image\.name.*not a timm model"),
    ({"text": {"config_overrides": {"hidden_size": 65}}}, r"model\.text\.config_overrides"),
    ({"image": {"image_size": 100}}, r"model\.image\.image_size is 100.*multiples of its patch size 16"),
    ({"roi": {"roi_size": 20}}, r"model\.roi\.roi_size is 20.*multiples of its patch size 16"),
])
def test_model_fields_that_depend_on_the_towers_fail_at_build(change, match):
    cfg = copy.deepcopy(SMALL_MODEL)
    for part, values in change.items():
        target = cfg[part]
        for key, value in values.items():
            if isinstance(value, dict):
                target[key].update(value)
            else:
                target[key] = value
    with pytest.raises(ConfigError, match=match):
        RegionMedCLIP(from_dict(ModelConfig, cfg))


def test_guarded_step_refuses_weights_made_nonfinite_by_a_finite_gradient():
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=math.inf)
    guard = GuardedStep(grad_clip=1.0)
    loss = layer(torch.ones(1, 3)).sum()
    with pytest.raises(NonFiniteWeightsError, match=r"step 7: the optimizer step wrote NaN/inf into 2 of 2"):
        guard.step({"total": loss}, opt, layer.parameters(), where="step 7")
    ok = torch.nn.Linear(3, 2)
    out = GuardedStep().step({"total": ok(torch.ones(1, 3)).sum()}, torch.optim.SGD(ok.parameters(), lr=0.1), ok.parameters())
    assert out is not None and all(torch.isfinite(p).all() for p in ok.parameters())


@pytest.mark.parametrize("how", ["lr beyond float32", "a step writing NaN"])
def test_run_whose_weights_become_nonfinite_fails_and_saves_nothing(run_data, tmp_path, monkeypatch, how):
    """A learning rate that is finite as a number but overflows the float32 step, or an
    optimizer step that writes NaN from finite gradients: the run stops with an error (never
    exit 0), and no checkpoint and no model folder are written."""
    root, _, _ = run_data
    out = tmp_path / "run"
    cfg = small_config(root, out)
    if how == "lr beyond float32":
        cfg.train.stages[0].lr = 1e39
        match = r"step 0: the optimizer step overflowed float32 with learning rate\(s\) \[1e\+39\]"
    else:
        real_step = torch.optim.AdamW.step

        def poisoned(self, *args, **kwargs):
            out = real_step(self, *args, **kwargs)
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
        match = r"step 0: the optimizer step wrote NaN/inf into 1 of \d+ trained weight tensors"
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(TrainingError, match=match):
        trainer.fit()
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    assert read_metrics(out / "metrics.jsonl")[-1]["event"] == "stopped"
    if how == "a step writing NaN":
        with pytest.raises(TrainingError, match="hold NaN or inf.*checkpoint not written"):  # the save-side check, on its own
            trainer._checkpoint(trainer.plans[0])
        assert not (out / "checkpoints").exists()


# ======================================================== kind 10: a corrupt sample mid-run
def test_bad_sample_policies_name_shard_and_key(run_data):
    root, bad, _ = run_data
    pre = Preprocessor(image_size=32, roi_size=16, max_rois=2)
    where = f"{root / 'train-000000.tar'}:train{bad}"
    with pytest.raises(SampleError) as err:
        RegionSampleDataset(str(root), "train", pre)[bad]
    assert err.value.where == where and "cannot be decoded" in str(err.value)
    sub = RegionSampleDataset(str(root), "train", pre, on_bad="substitute")[bad]
    assert sub["id"] == f"train{(bad + 1) % N}" and [b[:2] for b in sub["bad"]] == [(bad, where)]
    drop = RegionSampleDataset(str(root), "train", pre, on_bad="drop")
    batch = collate([drop[bad - 1], drop[bad], drop[(bad + 1) % N]])
    assert len(batch) == 2 and batch.ids == [f"train{bad - 1}", f"train{(bad + 1) % N}"]
    assert [b[1] for b in batch.bad_samples] == [where]
    assert len(collate([drop[bad]])) == 0  # a batch of bad samples only is empty, not an error


def test_truncated_image_and_broken_record_are_sample_errors(tmp_path):
    root = write_split(tmp_path / "d", "train", 4, bad_image={1: _png(1)[:60]}, bad_json={2})
    ds = RegionSampleDataset(str(root), "train", Preprocessor(image_size=32, roi_size=16, max_rois=2))
    for i, what in ((1, "cannot be decoded"), (2, "not valid JSON")):
        with pytest.raises(SampleError, match=what) as err:
            ds[i]
        assert err.value.where.endswith(f"train-000000.tar:train{i}")
    counts = ds.audit()  # the one pass over the records counts the broken one and names it
    assert counts["records_unreadable"] == 1 and counts["samples"] == 3
    assert [w.rsplit(":", 1)[1] for w, _ in ds.unreadable_records] == ["train2"]


def test_corrupt_member_mid_run_is_named_skipped_and_counted(run_data, reference_run, caplog):
    """The issue's example: a shard member that is not an image, met mid-run. The run
    finishes; the sample is named (shard and key), skipped each time it is met, counted once."""
    root, bad, _ = run_data
    out, summary = reference_run
    assert summary["steps"] == 6 and (out / "model" / "model.safetensors").is_file()
    assert summary["counters"]["bad_samples"] == 1  # distinct
    assert summary["counters"]["bad_samples_skipped"] == 2  # met in epoch 0 and at step 4 or 5
    events = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "bad_samples"]
    assert [e["samples"] for e in events] == [[f"{root / 'train-000000.tar'}:train{bad}"]] * 2
    # every step ran on a full batch of readable samples
    assert sorted(_losses(out)) == list(range(6)) and all(math.isfinite(v) for r in _losses(out).values() for v in r.values())


def test_bad_sample_limit_stops_cleanly_and_the_resumed_run_is_exact(run_data, reference_run, tmp_path):
    root, bad, _ = run_data
    ref_out, ref_summary = reference_run
    out = tmp_path / "run"
    cfg = small_config(root, out)
    cfg.data.max_bad_samples = 0
    with pytest.raises(TrainingError, match=rf"1 distinct sample\(s\) .* cannot be read, more than data.max_bad_samples = 0 "
                                            rf"\(e\.g\. .*train-000000\.tar:train{bad}: image member"):
        Trainer(cfg, progress=False).fit()
    hit = next(s for s in range(4) if bad in StepBatchSampler(N, BATCH, SEED, 8).global_indices(s))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{hit:08d}"
    assert not (out / "model").exists()
    cfg.data.max_bad_samples = 5  # not a trajectory change: resuming with it is allowed
    summary = Trainer(cfg, resume=True, progress=False).fit()
    # the counters equal those of the uninterrupted run with the larger limit
    assert summary["counters"] == ref_summary["counters"]
    ref, got = _losses(ref_out), _losses(out)
    assert sorted(got) == list(range(6))
    for step in range(6):
        for key, value in ref[step].items():
            assert abs(got[step][key] - value) < 1e-6, (step, key)


# ===================================================================== kind 13: resume bookkeeping
def test_kill_and_resume_keeps_each_step_once_and_counters_continue(run_data, reference_run, tmp_path, monkeypatch):
    root, _, long = run_data
    ref_out, ref_summary = reference_run
    out = tmp_path / "run"
    original = Trainer.train_step

    def killed_at_5(self, batch, plan):
        if self.step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, plan)

    monkeypatch.setattr(Trainer, "train_step", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        Trainer(small_config(root, out), progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert 4 in {r["step"] for r in _steps(out)}  # step 4 was logged after the checkpoint of step 4
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "step", "step": 5, "loss.to')  # a line torn by the kill
    # what killed writes leave behind
    (out / "checkpoints" / ".tmp_step_00000006_4242" / "model").mkdir(parents=True)
    (out / ".model.tmp-4242").mkdir()
    trainer = Trainer(small_config(root, out), resume=True, progress=False)
    assert trainer.step == 4
    summary = trainer.fit()
    steps = [r["step"] for r in _steps(out)]
    assert steps == list(range(6))  # each step once, in order
    stages = [(r["step"], r["stage"]) for r in read_metrics(out / "metrics.jsonl") if r["event"] == "stage"]
    assert stages == [(0, "warmup"), (2, "joint")]  # a mid-stage resume does not log its stage again
    ref = _losses(ref_out)
    for step, terms in _losses(out).items():
        for key, value in terms.items():
            assert abs(ref[step][key] - value) < 1e-6, (step, key)
    # counters continue: 3 long reports, all met before the checkpoint, none after it
    assert summary["counters"]["text_truncated"] == ref_summary["counters"]["text_truncated"] == len(long)
    assert summary["counters"]["bad_samples_skipped"] == ref_summary["counters"]["bad_samples_skipped"] == 2
    assert not list((out / "checkpoints").glob(".tmp_*")) and not list(out.glob(".model.*"))
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("field, value, named", [
    ("batch_size", 8, "train.batch_size: 4 -> 8"),
    ("seed", 1, "seed: 0 -> 1"),
    ("lr", 5e-4, "train.stages[1].lr: 0.001 -> 0.0005"),
    ("precision", "bf16", "train.precision"),
    ("stages", None, "train.stages[2]"),
])
def test_resume_with_a_trajectory_change_is_refused(run_data, reference_run, field, value, named):
    root, _, _ = run_data
    ref_out, _ = reference_run
    cfg = small_config(root, ref_out)
    if field == "batch_size":
        cfg.train.batch_size = value
    elif field == "seed":
        cfg.seed = value
    elif field == "lr":
        cfg.train.stages[1].lr = value
    elif field == "precision":
        cfg.train.precision = value
    else:
        cfg.train.stages.append(StageConfig(name="extra", steps=2))
    with pytest.raises(CheckpointError, match="--allow-config-changes") as err:
        Trainer(cfg, resume=True, progress=False)
    assert named in str(err.value) and "trajectory" in str(err.value)


def test_resume_accepts_neutral_changes_and_explicit_overrides(run_data, reference_run, tmp_path):
    root, _, _ = run_data
    ref_out, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    cfg = small_config(root, out)
    cfg.train.log_every, cfg.train.keep_checkpoints, cfg.data.num_workers = 3, 5, 0  # neutral
    assert Trainer(cfg, resume=True, progress=False).step == 6
    cfg.train.stages[1].lr = 5e-4
    trainer = Trainer(cfg, resume=True, progress=False, allow_config_changes=True)
    assert trainer.config_changes == [("train.stages[1].lr", 0.001, 0.0005)]
    assert any("resumed with a changed config" in n for n in trainer.notes)


def test_resume_refuses_other_data(run_data, reference_run, tmp_path):
    root, _, _ = run_data
    ref_out, _ = reference_run
    other = tmp_path / "other"
    shutil.copytree(root, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = "renamed.tar"
    (other / "train-000000.tar").rename(other / "renamed.tar")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"data: .*other shards or counts"):
        Trainer(small_config(other, ref_out), resume=True, progress=False)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(run_data, reference_run):
    root, _, _ = run_data
    ref_out, _ = reference_run
    with pytest.raises(TrainingError, match="already holds the checkpoints of a run.*--resume"):
        Trainer(small_config(root, ref_out), progress=False)


def test_resume_falls_back_to_the_newest_complete_checkpoint(reference_run, tmp_path, caplog):
    ref_out, _ = reference_run
    ck = tmp_path / "checkpoints"
    shutil.copytree(ref_out / "checkpoints", ck)
    assert (ck / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert find_checkpoint(tmp_path) == ck / "step_00000006"
    # a truncated model file in the latest checkpoint
    weights = ck / "step_00000006" / "model" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path) == ck / "step_00000004"
    assert "step_00000006/model/model.safetensors cannot be read" in caplog.text
    with pytest.raises(CheckpointError, match="incomplete or damaged"):  # named explicitly: no fallback
        find_checkpoint(ck / "step_00000006")
    # `latest` names a folder that is gone (the example)
    shutil.rmtree(ck / "step_00000006")
    assert find_checkpoint(tmp_path) == ck / "step_00000004"
    (ck / "latest").write_text("../../etc\n")
    assert find_checkpoint(tmp_path) == ck / "step_00000004"
    (ck / "step_00000004" / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint.*optimizer.safetensors is missing"):
        find_checkpoint(tmp_path)


def test_stale_temporaries_are_cleaned_and_the_model_folder_is_replaced_atomically(tmp_path):
    class Fake:
        def __init__(self, text, fail=False):
            self.text, self.fail = text, fail

        def save_pretrained(self, directory):
            directory.mkdir(parents=True)
            (directory / "config.json").write_text(self.text)
            if self.fail:
                raise OSError("disk full")

    dest = tmp_path / "model"
    save_model_folder(Fake("v1"), dest)
    with pytest.raises(OSError):
        save_model_folder(Fake("v2", fail=True), dest)  # killed midway: the complete old folder stays
    assert (dest / "config.json").read_text() == "v1"
    assert [p.name for p in tmp_path.glob(".model.tmp-*")]  # its temporary is left ...
    (tmp_path / "checkpoints" / ".tmp_step_00000002_1").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".latest.tmp").write_text("x")
    removed = clean_stale_temporaries(tmp_path / "checkpoints", tmp_path)  # ... until the next run starts
    assert len(removed) == 3 and not list(tmp_path.glob(".model.*")) and not list((tmp_path / "checkpoints").iterdir())
    save_model_folder(Fake("v3"), dest)
    assert (dest / "config.json").read_text() == "v3" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "model"]


def test_truncate_metrics_keeps_steps_before_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"event": "data", "step": 0}, {"event": "step", "step": 0}, {"event": "step", "step": 1},
            {"event": "stage", "step": 2}, {"event": "step", "step": 2}, {"event": "end", "steps": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "st')
    (tmp_path / "bad.jsonl").write_text("{x\n{}\n")
    with pytest.raises(ValueError, match="line 1"):  # a broken line in the middle is an error, not skipped
        read_metrics(tmp_path / "bad.jsonl")
    assert [r["event"] for r in read_metrics(path)] == [r["event"] for r in rows]  # a torn last line is ignored
    assert truncate_metrics(path, 2) == 4
    assert read_metrics(path) == rows[:3]
    assert truncate_metrics(path, 2) == 0


def test_tokenizer_truncation_count_survives_a_cache_clear_and_a_restore():
    from transformers import AutoTokenizer

    from regionmed.model.towers import TextTokenizer, resolve_text_model

    hf = AutoTokenizer.from_pretrained(resolve_text_model("minilm"))
    tok = TextTokenizer(hf, context_length=8, cache_size=2)
    tok.ids([LONG + "a", "short", LONG + "b"])
    tok.ids([LONG + "a", "x", "y"])  # the cache was cleared: "a" must not count twice
    assert tok.truncated == 2
    other = TextTokenizer(hf, context_length=8)
    other.restore_truncated(tok.truncated_digests())
    other.ids([LONG + "b", LONG + "c"])
    assert other.truncated == 3 and all(len(d) == 16 for d in other.truncated_digests())


# ================================================================ kind 12: model folders
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "m"
    RegionMedCLIP(from_dict(ModelConfig, copy.deepcopy(SMALL_MODEL))).save_pretrained(folder)
    return folder


def _damaged(model_dir: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if damage == "truncated weights":  # the example
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "weights not safetensors":
        weights.write_bytes(b"PK\x03\x04 a zip file" * 20)
    elif damage == "no weights":
        weights.unlink()
    elif damage == "no config":
        config.unlink()
    elif damage == "config not JSON":
        config.write_text("{model: ")
    elif damage == "config without model":
        config.write_text('{"regionmed_version": "0"}')
    elif damage == "config bad field":
        data = json.loads(config.read_text())
        data["model"]["embed_dim"] = "big"
        config.write_text(json.dumps(data))
    elif damage == "config out of range":
        data = json.loads(config.read_text())
        data["model"]["logit_scale_max"] = -1
        config.write_text(json.dumps(data))
    elif damage == "no text folder":
        shutil.rmtree(folder / "text")
    elif damage == "weights of another config":
        tensors = load_file(str(weights))
        tensors["projections.image.weight"] = tensors["projections.image.weight"][:16]
        save_file(tensors, str(weights))
    elif damage == "weights missing a tensor":
        tensors = load_file(str(weights))
        del tensors["logit_scale"]
        save_file(tensors, str(weights))
    elif damage == "nan weights":
        tensors = load_file(str(weights))
        tensors["logit_scale"] = torch.tensor(float("nan"))
        save_file(tensors, str(weights))
    elif damage == "no folder":
        shutil.rmtree(folder)
    return folder


@pytest.mark.parametrize("damage, names, match", [
    ("truncated weights", "model.safetensors", "cannot be read"),
    ("empty weights", "model.safetensors", "cannot be read"),
    ("weights not safetensors", "model.safetensors", "cannot be read"),
    ("no weights", "model.safetensors", "is missing"),
    ("no config", "config.json", "is missing"),
    ("config not JSON", "config.json", "not valid JSON"),
    ("config without model", "config.json", "no 'model' mapping"),
    ("config bad field", "config.json", r"model\.embed_dim must be an integer"),
    ("config out of range", "config.json", r"model\.logit_scale_max must be > 0"),
    ("no text folder", "text", "is missing"),
    ("weights of another config", "model.safetensors", r"does not fit the model config: size mismatch for projections\.image\.weight"),
    ("weights missing a tensor", "model.safetensors", r"does not fit the model config: missing \['logit_scale'\]"),
    ("nan weights", "model.safetensors", r"1 weight tensor\(s\) hold NaN or inf.*logit_scale"),
    ("no folder", "m", "does not exist"),
])
def test_damaged_model_folders_are_weights_errors_naming_the_file(model_dir, tmp_path, damage, names, match):
    folder = _damaged(model_dir, tmp_path, damage)
    with pytest.raises(WeightsError, match=match) as err:
        load(folder)
    assert str(folder / names if names != "m" else folder) in str(err.value)


def test_eval_cli_reports_a_damaged_model_folder_without_traceback(model_dir, tmp_path, capsys):
    from regionmed.apps.cli import main

    folder = _damaged(model_dir, tmp_path, "truncated weights")
    (tmp_path / "data").mkdir()
    assert main(["eval", str(folder), "--tasks", "retrieval", "--medregion", str(tmp_path / "data"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err


def test_truncated_pretrained_image_weights_are_a_weights_error(tmp_path):
    path = tmp_path / "trunk.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match=rf"{path}.*cannot be read"):
        read_state_dict(path)
    pth = tmp_path / "trunk.pth"
    pth.write_bytes(b"garbage" * 10)
    with pytest.raises(WeightsError, match=rf"{pth}.*cannot be read"):
        read_state_dict(pth)


# ====================================================== kind 11: evaluation with one bad sample
def test_eval_retrieval_skips_an_unreadable_sample_and_counts_it(model_dir, tmp_path):
    """The issue's example: `regionmed eval --tasks retrieval` on a MedRegion split with one
    unreadable image (and here also one broken record): both are skipped and counted in the
    report's problems, the other samples are evaluated, the task is not dropped."""
    from regionmed.apps.cli import main

    data = write_split(tmp_path / "data", "test", 6, bad_image={2: BAD}, bad_json={4}, regions=True)
    out = tmp_path / "eval"
    assert main(["eval", str(model_dir), "--tasks", "retrieval", "--medregion", str(data), "--out", str(out),
                 "--batch-size", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    retrieval = results["tasks"]["retrieval"]
    assert retrieval["n_images"] == 4 and retrieval["n_skipped"] == 2
    assert "R@1" in json.dumps(retrieval) or retrieval["reports"]
    messages = results["problems"]["messages"]
    assert results["problems"]["per_task"] == {"retrieval": 2}
    assert any("test-000000.tar:test2" in m and "cannot be decoded" in m for m in messages)
    assert any("test-000000.tar:test4" in m and "not valid JSON" in m for m in messages)
    assert not any("task failed" in m for m in messages)


def test_eval_retrieval_on_a_split_with_no_readable_sample_is_one_clear_problem(model_dir, tmp_path):
    from regionmed.apps.evaluate.context import EvalData, EvalOptions
    from regionmed.apps.evaluate.run import evaluate

    data = write_split(tmp_path / "data", "test", 2, bad_image={0: BAD, 1: BAD})
    model = load(model_dir)
    results = evaluate(model, EvalOptions(tasks=["retrieval"], data=EvalData(medregion=str(data)), n_boot=10), tmp_path / "eval")
    assert "retrieval" not in results["tasks"]
    assert any("no sample of split 'test' can be read" in m for m in results["problems"]["messages"])


def test_eval_cli_exits_nonzero_when_a_task_produced_nothing(model_dir, tmp_path, capsys):
    from regionmed.apps.cli import main

    data = write_split(tmp_path / "data", "test", 2, bad_image={0: BAD, 1: BAD})
    code = main(["eval", str(model_dir), "--tasks", "retrieval", "--medregion", str(data), "--out", str(tmp_path / "e"),
                 "--n-boot", "10"])
    assert code == 1 and "task(s) failed: retrieval" in capsys.readouterr().err
    assert (tmp_path / "e" / "report.md").is_file()  # the report (with its problems) is still written


# ========================================= kind 14: a run that cannot learn what it was asked
def _roi_config(data: Path, out: Path, stages: list[StageConfig]) -> RunConfig:
    cfg = small_config(data, out, mode="crop")
    cfg.train.stages = stages
    return cfg


def test_region_losses_on_data_without_regions_warn_at_start(tmp_path, caplog):
    data = write_split(tmp_path / "data", "train", 8, negatives=True)  # image negatives, no region at all
    out = tmp_path / "run"
    cfg = _roi_config(data, out, [StageConfig(name="region", steps=1, use_rois=True,
                                              losses={"global": 1.0, "region": 1.0, "hard_negative": 1.0})])
    with caplog.at_level(logging.WARNING):
        summary = Trainer(cfg, progress=False).fit()
    assert summary["steps"] == 1 and "region" not in summary["final_losses"]
    text = caplog.text
    assert "stage 'region' (steps 0-0): split 'train' of" in text
    assert "has no regions (usable boxes with captions), which loss 'region' needs: this term is absent from every step" in text
    assert "has no regions, so the 'hard_negative' loss gets no region negatives" in text
    warnings = [r["message"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "warning"]
    assert any("which loss 'region' needs" in w for w in warnings)


def test_a_stage_that_can_learn_nothing_from_the_data_is_an_error(tmp_path):
    data = write_split(tmp_path / "data", "train", 8)  # no regions, no negatives
    cfg = _roi_config(data, tmp_path / "run", [
        StageConfig(name="warmup", steps=1, losses={"global": 1.0}),
        StageConfig(name="regions only", steps=1, use_rois=True, losses={"region": 1.0, "hard_negative": 0.5}),
    ])
    trainer = Trainer(cfg, progress=False)
    with pytest.raises(TrainingError, match=r"stage 'regions only' can learn nothing: split 'train' of .* has no regions .*"
                                            r"which loss 'region' needs; it has no hard negatives .* which loss 'hard_negative' needs"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the first step
    # the counts come from the dataset's one pass over its records
    assert trainer.audit["samples"] == 8 and trainer.audit["regions"] == 0
    trainer.audit = Counter(samples=8, regions=8, region_negatives=0, image_negatives=0)
    warnings, errors = trainer._learnability()
    assert errors == [] and any("no hard negatives (none of its images or regions carries a negative text), which loss "
                                "'hard_negative' needs" in w for w in warnings)


def test_unreadable_records_beyond_the_limit_stop_the_run_at_start(tmp_path):
    data = write_split(tmp_path / "data", "train", 8, bad_json={1, 3}, regions=True)
    cfg = small_config(data, tmp_path / "run", mode="crop")
    cfg.data.max_bad_samples = 1
    with pytest.raises(TrainingError, match=r"2 record\(s\) of .* cannot be read, more than data.max_bad_samples = 1"):
        Trainer(cfg, progress=False).fit()


def test_config_round_trip_has_no_differences():
    from regionmed.apps.train.config import config_differences, trajectory_changes

    cfg = small_config(Path("d"), Path("o"))
    saved = json.loads(json.dumps(to_dict(cfg)))
    assert config_differences(saved, to_dict(cfg)) == []
    changed = copy.deepcopy(cfg)
    changed.train.output_dir, changed.train.stages[0].lr = "elsewhere", 0.5
    assert trajectory_changes(saved, to_dict(changed)) == [("train.stages[0].lr", 0.001, 0.5)]


def test_finite_weights_whose_last_steps_were_nonfinite_are_not_saved(run_data, tmp_path):
    """lr 1e30: step 0 leaves huge but finite weights, every later loss is NaN and skipped.
    The run ends its schedule before max_nonfinite, yet must not save those weights nor exit 0."""
    root, _, _ = run_data
    out = tmp_path / "run"
    cfg = small_config(root, out, steps=(2, 2))
    cfg.train.checkpoint_every = 0
    for st in cfg.train.stages:
        st.lr = 1e30
    with pytest.raises(TrainingError, match=r"non-finite losses, so these weights compute non-finite values"):
        Trainer(cfg, progress=False).fit()
    assert not (out / "model").exists()


def test_evaluation_refuses_non_finite_embeddings(model_dir):
    """A model whose weights are finite but compute NaN gives no metric (a failed task), not numbers."""
    from regionmed.finite import NonFiniteEmbeddingError

    model = load(model_dir)
    with torch.no_grad():
        model.projections["image"].weight.fill_(3e38)
    from regionmed.data.loader import ImageBatch

    size = model.cfg.image.image_size
    batch = ImageBatch(torch.randn(2, 3, size, size), torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), None)
    with pytest.raises(NonFiniteEmbeddingError, match="non-finite image embeddings"):
        model.encode_batch(batch, use_rois=False)


def test_damaged_tokenizer_files_are_weights_errors(model_dir, tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        folder = tmp_path / name / "m"
        shutil.copytree(model_dir, folder)
        (folder / "text" / name).write_text('{"truncated": ', encoding="utf-8")
        with pytest.raises(WeightsError, match=str(folder / "text")):
            load(folder)
