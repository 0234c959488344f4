"""Two real processes (torchrun, gloo, CPU): DDP with the local loss equals single-process training.

One launch of tests/ddp_worker.py serves all tests here (start-up dominates).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from regionmed.distributed import (
    all_reduce_sum,
    gather_tensor,
    gather_with_grad,
    get_rank,
    get_world_size,
    init_distributed,
    is_dist,
)

WORKER = Path(__file__).with_name("ddp_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TOL = 1e-5


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", REGIONMED_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run",  # the same as the `torchrun` script
        "--standalone", "--nproc_per_node", "2", str(WORKER), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert "error" not in r, f"rank {r['rank']} failed:\n{r['error']}"
    return results


def test_world_of_two_on_cpu(worker_results):
    for rank, r in enumerate(worker_results):
        assert (r["rank"], r["world_size"], r["device"]) == (rank, 2, "cpu")


def test_gather_with_grad_sums_gradients_over_ranks(worker_results):
    for r in worker_results:
        g = r["gather"]
        assert g["shape"] == [4, 2, 2]
        assert g["value_err"] == 0.0
        assert g["grad_err"] < TOL  # the slice's gradient from every rank's loss, summed
        assert g["ids_equal"] and g["mask_equal"]
        assert g["sum"] == 3.0


def test_ddp_local_loss_equals_single_process(worker_results):
    for rank, r in enumerate(worker_results):
        res = r["losses"]
        assert res["local_rois"] == (6, 1)[rank]
        assert res["terms"] == sorted([*r["loss_names"], "total"])  # every term active, grounding included
        assert res["weights_err"] == 0.0  # DDP broadcast rank 0's weights at wrap
        assert res["loss_err"] < TOL, (res["loss"], res["ref_loss"])
        assert res["grad_err"] < TOL
        assert res["grad_norm"] > 1e-3  # the comparison is not between zeros
    losses = [r["losses"]["loss"]["total"] for r in worker_results]
    assert losses[0] == pytest.approx(losses[1], abs=TOL)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert not is_dist() and get_rank() == 0 and get_world_size() == 1
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x and gather_tensor(x) is x and all_reduce_sum(x) is x
