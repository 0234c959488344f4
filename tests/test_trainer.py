
import pytest
import torch

import regionmed.task as task_mod
from conftest import tiny_run_config
from regionmed.apps.train.config import StageConfig
from regionmed.apps.train.metrics import read_metrics
from regionmed.apps.train.trainer import Trainer, TrainingError


def _losses_by_step(path):
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss.")} for r in read_metrics(path) if r["event"] == "step"}


def test_stages_switch_losses_and_trainable_modules(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "run"), steps=(2, 2))
    cfg.train.stages[0].trainable = ["projections", "logit_scale"]
    t = Trainer(cfg, progress=False)
    tower_before = t.model.image_tower.model.blocks[0].attn.qkv.weight.detach().clone()
    gate_before = t.model.roi_processor.global_gate.detach().clone()
    proj_before = t.model.projections["image"].weight.detach().clone()
    t.total_steps = 2  # run the first stage only
    t.fit()
    assert torch.equal(t.model.image_tower.model.blocks[0].attn.qkv.weight, tower_before)  # frozen
    assert not torch.equal(t.model.projections["image"].weight, proj_before)  # trained
    t2 = Trainer(cfg, resume=True, progress=False)
    t2.fit()
    assert not torch.equal(t2.model.image_tower.model.blocks[0].attn.qkv.weight, tower_before)
    assert not torch.equal(t2.model.roi_processor.global_gate, gate_before)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    stages = [(r["step"], r["stage"]) for r in records if r["event"] == "stage"]
    assert (0, "warmup") in stages and (2, "region") in stages
    steps = _losses_by_step(tmp_path / "run" / "metrics.jsonl")
    assert set(steps[0]) == {"loss.global", "loss.total"}
    assert set(steps[3]) == {"loss.global", "loss.summary", "loss.region", "loss.hard_negative", "loss.total"}
    step_records = [r for r in records if r["event"] == "step"]
    assert all(r["samples_per_s"] > 0 and r["lr"] > 0 for r in step_records)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000


def test_resume_mid_stage_continues_exactly(phantom_data, tmp_path, monkeypatch):
    def config(out):
        cfg = tiny_run_config(str(phantom_data), str(out), steps=(2, 4))
        cfg.train.checkpoint_every = 3
        # dropout on: resuming must also restore the RNG streams
        cfg.model.text.config_overrides.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
        return cfg

    Trainer(config(tmp_path / "full"), progress=False).fit()
    full = _losses_by_step(tmp_path / "full" / "metrics.jsonl")

    original = Trainer.train_step

    def crash_at_4(self, batch, plan):
        if self.step == 4:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, batch, plan)

    monkeypatch.setattr(Trainer, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(tmp_path / "cut"), progress=False).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    resumed = Trainer(config(tmp_path / "cut"), resume=True, progress=False)
    assert resumed.step == 3
    resumed.fit()
    cut = _losses_by_step(tmp_path / "cut" / "metrics.jsonl")  # the resumed run appends steps 3..5
    assert sorted(cut) == list(range(6))
    for step in (3, 4, 5):
        for key, value in full[step].items():
            assert abs(cut[step][key] - value) < 1e-6, (step, key, cut[step][key], value)


def test_nonfinite_losses_are_skipped_then_stop_the_run(phantom_data, tmp_path, monkeypatch):
    real = task_mod.compute_losses
    poisoned_steps = {1}

    def poisoned(inputs, weights):
        out = real(inputs, weights)
        if poisoned_steps and current["step"] in poisoned_steps:
            out["total"] = out["total"] * float("nan")
        return out

    current = {"step": 0}
    original_step = Trainer.train_step

    def tracking(self, batch, plan):
        current["step"] = self.step
        return original_step(self, batch, plan)

    monkeypatch.setattr(task_mod, "compute_losses", poisoned)
    monkeypatch.setattr(Trainer, "train_step", tracking)
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "a"), mode="none", steps=(3, 1))
    cfg.train.max_nonfinite = 2
    summary = Trainer(cfg, progress=False).fit()
    assert summary["counters"]["nonfinite_steps"] == 1
    events = [r["event"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    assert events.count("skip") == 1 and events.count("step") == 3

    poisoned_steps.update(range(100))
    cfg.train.output_dir = str(tmp_path / "b")
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        Trainer(cfg, progress=False).fit()


def test_epochs_resolve_to_steps(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "e"), mode="none")
    cfg.train.stages = [StageConfig(name="only", epochs=0.5, losses={"global": 1.0})]
    t = Trainer(cfg, progress=False)
    assert t.steps_per_epoch == 48 // 8 and t.total_steps == 3


def test_too_small_dataset_is_a_clear_error(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), str(tmp_path / "s"), mode="none", batch_size=64)
    with pytest.raises(TrainingError, match="fewer than one batch of 64"):
        Trainer(cfg, progress=False)


def test_cli_train_reports_missing_data(tmp_path, capsys):
    from regionmed.apps.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stages:\n    - {name: a, steps: 1}\n")
    assert main(["train", "--config", str(cfg), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_boxes_and_long_texts_are_reported_when_training(tmp_path, caplog):
    """A box outside the image and one of zero area are dropped, a partial one clipped,
    an over-long report truncated: training goes on and says so (log + metrics)."""
    import io

    import numpy as np
    from PIL import Image

    from regionmed.data.shards import MedRegionWriter, write_manifest

    def png():
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    with MedRegionWriter(tmp_path / "data", "train") as w:
        for i in range(8):
            boxes = [[10, 10, 30, 30], [100, 100, 120, 120], [5, 5, 5, 40], [50, 50, 80, 70]] if i == 0 else [[10, 10, 30, 30]]
            w.write({"schema_version": 1, "id": f"x{i}", "split": "train", "width": 64, "height": 64, "summary": f"s{i}",
                     "report": "word " * (200 if i == 1 else 3) + str(i),
                     "regions": [{"box": b, "caption": f"c{i}{j}", "negatives": [{"text": f"n{i}{j}", "rule": "laterality"}]}
                                 for j, b in enumerate(boxes)]}, png())
    write_manifest(tmp_path / "data", {"train": w.summary()})
    cfg = tiny_run_config(str(tmp_path / "data"), str(tmp_path / "run"), steps=(1, 1), batch_size=8)
    with caplog.at_level("WARNING"):
        summary = Trainer(cfg, progress=False).fit()
    assert summary["data"]["boxes_dropped_outside"] == 1 and summary["data"]["boxes_dropped_zero_area"] == 1
    assert summary["data"]["boxes_clipped"] == 1
    assert summary["counters"]["text_truncated"] == 1
    text = caplog.text
    assert "1 box(es) reached past the image and were clipped" in text
    assert "2 box(es) dropped: 1 outside the image, 1 of zero area" in text
    assert "1 distinct text(s) were longer than model.text.context_length = 32 tokens" in text
    data_event = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "data"][0]
    assert data_event["boxes_dropped_outside"] == 1
