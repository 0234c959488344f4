"""The trainer under torchrun (2 real processes, gloo) equals single-process training."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from conftest import tiny_run_config
from regionmed.apps.train.metrics import read_metrics
from regionmed.config import to_dict

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_process_training_matches_single_process(phantom_data, tmp_path):
    cfg = tiny_run_config(str(phantom_data), "unused", steps=(2, 2), batch_size=8)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    common = ["-m", "regionmed", "train", "--config", str(config), "--no-progress"]
    _run([sys.executable, *common, "--output-dir", str(tmp_path / "single")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
          "--output-dir", str(tmp_path / "ddp")], tmp_path)

    def losses(run):
        return {r["step"]: r for r in read_metrics(tmp_path / run / "metrics.jsonl") if r["event"] == "step"}

    single, ddp = losses("single"), losses("ddp")
    assert sorted(single) == sorted(ddp) == [0, 1, 2, 3]
    assert "loss.region" in single[3] and "loss.hard_negative" in single[3]
    for step in single:
        for key in (k for k in single[step] if k.startswith("loss.")):
            assert abs(single[step][key] - ddp[step][key]) < 1e-5, (step, key, single[step][key], ddp[step][key])
    assert ddp[0]["samples_per_s_per_rank"] < ddp[0]["samples_per_s"]
    a = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst
