"""The GPU check script (scripts/gpu_check.py): its dry run on the CPU, as CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_the_dry_run_passes_every_check_and_writes_the_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["device", "nccl (dry run: gloo)", "bf16 vs fp32", "SyncBatchNorm",
                          "throughput (BiomedCLIP shapes, global-only)", "full method (crop, 4 ROIs)",
                          "DDP equality (2 GPUs, nccl)"]
    assert all(r["verdict"] == "ok" for name, r in rows.items() if not name.startswith("DDP"))
    assert rows["DDP equality (2 GPUs, nccl)"]["verdict"] == "skipped"
    bf16 = rows["bf16 vs fp32"]["figures"]
    assert bf16["loss_rel_diff"] <= 0.02 and 0.99 <= bf16["grad_cosine"] <= 1.0 + 1e-9
    assert rows["SyncBatchNorm"]["figures"]["converted"] == rows["SyncBatchNorm"]["figures"]["batchnorm_layers"] > 0
    assert rows["full method (crop, 4 ROIs)"]["figures"]["x_global_only"] > 0
    assert "| check | verdict | figures | seconds |" in proc.stdout  # the one printed table


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_asks_for_the_dry_run(capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert gpu_check.main(["--out", "unused.json"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_the_models_of_a_real_run_are_valid_configs():
    """The dry run swaps in the tiny model; the models a GPU run builds must at least be valid."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from regionmed.model.registry import model_config

    name, overrides = gpu_check.BF16_MODEL
    assert model_config(name, overrides).roi.mode == "align"
    for roi in ({"mode": "none"}, {"mode": "crop", "max_rois": 4}):
        cfg = model_config(gpu_check.THROUGHPUT_MODEL, {"roi": roi, "text": {"name": "minilm", "pretrained": False,
                                                                           "config_overrides": gpu_check.BERT_BASE,
                                                                           "context_length": 256}})
        assert cfg.image.image_size == 224 and cfg.text.config_overrides["hidden_size"] == 768
