"""The trainer under torchrun (2 real processes, gloo) equals single-process training.

On phantoms, and on a MedRegion build of the real public data in ../shared/data
(SLAKE boxes, the chest radiographs' lung boxes, VQA-RAD images without any box):
ragged negative counts per region and per image, images without regions, through
all four stages of the progressive schedule.
"""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from safetensors.torch import load_file

from conftest import tiny_run_config
from conftest_build import data_dir, public_build  # noqa: F401
from regionmed.apps.train.config import StageConfig
from regionmed.apps.train.metrics import read_metrics
from regionmed.config import to_dict
from regionmed.model.config import DenseConfig

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", REGIONMED_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _single_and_two_processes(cfg, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    common = ["-m", "regionmed", "train", "--config", str(config), "--no-progress"]
    _run([sys.executable, *common, "--output-dir", str(tmp_path / "single")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
          "--output-dir", str(tmp_path / "ddp")], tmp_path)

    def steps(run):
        return {r["step"]: r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["event"] == "step"}

    return steps("single"), steps("ddp")


def _assert_equal_runs(single, ddp, tmp_path):
    assert sorted(single) == sorted(ddp)
    for step in single:
        keys = {k for k in single[step] if k.startswith("loss.")}
        assert keys == {k for k in ddp[step] if k.startswith("loss.")}, step
        for key in keys:
            # 1e-5, relative to the loss once it is above 1 (float32 sums in another order,
            # compounded over the steps of a run)
            a, b = single[step][key], ddp[step][key]
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, key, a, b)
    a = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


def test_two_process_training_matches_single_process(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), "unused", steps=(2, 2), batch_size=8)
    single, ddp = _single_and_two_processes(cfg, tmp_path)
    assert sorted(single) == [0, 1, 2, 3]
    assert "loss.region" in single[3] and "loss.hard_negative" in single[3]
    _assert_equal_runs(single, ddp, tmp_path)
    assert ddp[0]["samples_per_s_per_rank"] < ddp[0]["samples_per_s"]


def test_two_processes_on_real_data_through_every_stage(public_build, tmp_path):  # noqa: F811
    """The case that crashed (`trailing shapes differ between ranks`): real negative reports
    are ragged (0–3 per image) and some images have no region. This subset's regions all
    carry 3 negatives, so 4 slots per region are configured: padded slots there too."""
    out, _, _ = public_build
    from regionmed.data.shards import MedRegionDataset

    records = [MedRegionDataset(out, "train").record(i) for i in range(len(MedRegionDataset(out, "train")))]
    per_region = Counter(len(r.get("negatives", [])) for rec in records for r in rec["regions"])
    per_image = Counter(len(rec.get("negatives", [])) for rec in records)
    assert sum(1 for rec in records if not rec["regions"]) >= 8, "the data must hold images without regions"
    assert per_region and max(per_region) <= 3, per_region
    assert len(per_image) >= 2, per_image  # ragged negatives per image

    cfg = tiny_run_config(str(out), "unused", batch_size=8)
    cfg.data.max_negatives = 4
    cfg.data.max_image_negatives = 3
    cfg.model.dense = DenseConfig(head="conv", width=8, layers=1)  # the grid head the grounding term trains
    # The four stages of the method (configs/demo.yaml), short, with the grounding term from "region" on.
    cfg.train.stages = [
        StageConfig(name="warmup", steps=1, lr=1e-3, trainable=["image_tower", "projections", "logit_scale"],
                    losses={"global": 1.0}),
        StageConfig(name="refine", steps=1, lr=1e-3, lr_scale={"text_tower": 0.1}, losses={"global": 1.0, "summary": 0.5}),
        StageConfig(name="region", steps=4, lr=1e-3, use_rois=True,
                    losses={"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0, "grounding": 1.0}),
        StageConfig(name="joint", steps=1, lr=5e-4, use_rois=True,
                    losses={"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0, "grounding": 0.5}),
        # A stage whose only term never reaches the fused embedding: parameters of the ROI
        # processor get no gradient (DDP must accept it, as one process does).
        StageConfig(name="region_only", steps=1, lr=5e-4, use_rois=True, losses={"region": 1.0}),
    ]
    single, ddp = _single_and_two_processes(cfg, tmp_path)
    assert sorted(single) == list(range(8))
    assert {single[s]["stage"] for s in single} == {"warmup", "refine", "region", "joint", "region_only"}
    assert all("loss.region" in single[s] and "loss.hard_negative" in single[s] for s in (2, 3, 4, 5, 6))
    assert all("loss.grounding" in single[s] for s in (2, 3, 4, 5, 6))  # real boxes and labels reach the term
    _assert_equal_runs(single, ddp, tmp_path)
