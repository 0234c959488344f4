"""The GPU check: what a GPU machine must show before regionmed trains on a cluster (issue 20).

    python scripts/gpu_check.py [--out gpu_check.json] [--batch 64] [--steps 10]
    python scripts/gpu_check.py --dry-run          # the same checks on the CPU, tiny sizes (CI runs it)

One run, one table (also written as JSON to ``--out``). Each row is a check with its figures
and a verdict (``ok``, ``FAIL`` or ``skipped`` with the reason):

1. ``device``: PyTorch, CUDA, the GPUs and whether they do bf16.
2. ``nccl``: a one-process nccl group (TCP store on 127.0.0.1): init, all-reduce, destroy
   (dry run: gloo).
3. ``bf16 vs fp32``: one training step's loss and gradients (the global, summary, region and
   hard-negative terms, ROI mode ``align``, the demo recipe's resnet18 @ 128 px from random
   weights + the offline MiniLM, dropout off) in fp32 and under bf16 autocast on the same batch: the loss's relative difference (ok below 2 %) and the
   cosine between the two gradients, all parameters as one vector (ok above 0.99).
4. ``SyncBatchNorm``: the trainer's conversion (:func:`regionmed.distributed.prepare_batchnorm`)
   of the resnet18 tower for 2 processes, and a train-mode forward with it inside the nccl
   group (dry run: the conversion by PyTorch's own function; no forward: no CPU SyncBatchNorm).
5. ``throughput``: BiomedCLIP's shapes (ViT-B/16 @ 224 + a BERT-base-shaped text tower, 12
   layers of width 768, context 256; random weights), global-only, bf16 autocast: samples/s and
   peak GPU memory over ``--steps`` steps after two warm-up steps, batch ``--batch``.
6. ``full method``: the same model in ROI mode ``crop`` with 4 ROIs per image and the region
   and hard-negative terms: samples/s and its step time against (5) (the project's goal on CPU
   is at most 1.5x; here it is a figure).
7. ``DDP equality`` (two or more GPUs): ``regionmed train`` of the tiny model on phantoms,
   one process against torchrun with two (nccl), through two stages: the per-step losses
   agree within 1e-3 relative (GPU kernels are not bit-reproducible). Skipped with one GPU,
   and in the dry run (``tests/test_ddp_train.py`` checks it on CPU/gloo at 1e-5).

Exit status 0 when no check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
EVERY_TERM = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def check(self, name: str):
        row = {"check": name, "verdict": "ok", "figures": {}, "detail": ""}
        t = time.perf_counter()
        try:
            yield row
        except Skip as why:
            row["verdict"], row["detail"] = "skipped", str(why)
        except Exception as err:  # noqa: BLE001 - a failed check is a row, the others still run
            row["verdict"], row["detail"] = "FAIL", f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc()[-3000:]
        row["seconds"] = round(time.perf_counter() - t, 2)
        self.rows.append(row)
        print(f"[{row['verdict']}] {name} {row['figures']} {row['detail']}", file=sys.stderr, flush=True)


class Skip(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(name: str, dry: bool, **overrides):
    from regionmed.model.clip import RegionMedCLIP
    from regionmed.model.registry import model_config

    if dry:
        name = "tiny-vit-minilm"
    cfg = model_config(name, overrides)
    torch.manual_seed(0)
    return RegionMedCLIP(cfg)


def _batch(b: int, k: int, image_size: int, roi_size: int, crops: bool):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_step import make_batch

    batch = make_batch(b, k, image_size, roi_size)
    if not crops:
        batch.roi_crops = None
    return batch


def _task(model, losses: dict, use_rois: bool):
    from regionmed.task import TrainingTask

    task = TrainingTask(model, 3, 3)
    task.set_stage(losses, use_rois=use_rois)
    return task


def _grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


BF16_MODEL = ("resnet18-minilm", {"roi": {"mode": "align", "grid_context": False}})
THROUGHPUT_MODEL = "vit-b16-biomedbert"


def _no_dropout(model) -> None:
    """Dropout off (BatchNorm stays in train mode): the two passes must differ in precision only."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or "Dropout" in type(m).__name__:
            m.eval()


def check_bf16(device: torch.device, dry: bool) -> dict:
    model = _model(BF16_MODEL[0], dry, **BF16_MODEL[1]).to(device).train()
    _no_dropout(model)
    cfg = model.cfg
    batch = _batch(2 if dry else 16, 2 if dry else 4, cfg.image.image_size, cfg.image.image_size // 2, False).to(device)
    task = _task(model, EVERY_TERM, True)
    out = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            terms = task(batch)
        terms["total"].backward()
        out[precision] = (float(terms["total"]), _grad_vector(model))
    (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
    rel = abs(l16 - l32) / max(abs(l32), 1e-8)
    cos = float(torch.nn.functional.cosine_similarity(g32.double(), g16.double(), dim=0))
    figures = {"loss_fp32": round(l32, 5), "loss_bf16": round(l16, 5), "loss_rel_diff": round(rel, 5), "grad_cosine": round(cos, 5)}
    if not (rel <= 0.02 and cos >= 0.99):
        raise AssertionError(f"bf16 departs from fp32: {figures}")
    return figures


def check_syncbn(device: torch.device, dry: bool, group_ready: bool) -> dict:
    from regionmed.distributed import prepare_batchnorm
    from regionmed.model.clip import RegionMedCLIP
    from regionmed.model.registry import model_config

    torch.manual_seed(0)
    model = RegionMedCLIP(model_config("resnet18-minilm", {"image": {"pretrained": None}})).to(device)
    before = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.image_tower.modules())
    if device.type == "cuda":
        note = prepare_batchnorm(model, 2, device)
    else:
        note = None
        model.image_tower = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.image_tower)
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.image_tower.modules())
    figures = {"batchnorm_layers": before, "converted": synced}
    if synced != before or note:
        raise AssertionError(f"{synced} of {before} BatchNorm layers converted ({note or ''})")
    if device.type == "cuda" and group_ready:
        x = torch.randn(4, 3, model.cfg.image.image_size, model.cfg.image.image_size, device=device)
        model.train()
        pooled, _ = model.image_tower(x)
        figures["forward"] = f"ok {tuple(pooled.shape)}"
    else:
        figures["forward"] = "not run (no CPU SyncBatchNorm)" if device.type != "cuda" else "not run (no process group)"
    return figures


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (MiB, Linux)


def timed_steps(device: torch.device, dry: bool, batch_size: int, steps: int, full: bool) -> dict:
    from regionmed.optim import GuardedStep

    roi = {"mode": "crop", "max_rois": 4} if full else {"mode": "none"}
    overrides = {"roi": roi} if dry else {"roi": roi, "text": {"name": "minilm", "pretrained": False,
                                                               "config_overrides": BERT_BASE, "context_length": 256}}
    model = _model(THROUGHPUT_MODEL, dry, **overrides).to(device).train()
    cfg = model.cfg
    batch = _batch(batch_size, 4, cfg.image.image_size, cfg.roi.roi_size, full).to(device)
    task = _task(model, EVERY_TERM if full else {"global": 1.0, "summary": 0.5}, full)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    guard = GuardedStep("bf16" if device.type == "cuda" else "fp32", 1.0, 5)

    def step():
        with guard.autocast(device):
            terms = task(batch)
        if guard.step(terms, opt, model.parameters()) is None:
            raise RuntimeError(guard.last_skip)

    for _ in range(2):
        step()
    _peak_reset(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / steps
    return {"model": f"{cfg.image.name} @ {cfg.image.image_size} + text {cfg.text.name} "
                     f"({'BERT-base shape' if not dry else 'tiny'})", "batch": batch_size, "rois_per_image": 4 if full else 0,
            "step_s": round(dt, 4), "samples_per_s": round(batch_size / dt, 1), "peak_mib": round(_peak_mib(device), 1),
            "precision": guard.precision}


def check_ddp_equality(dry: bool) -> dict:
    n = torch.cuda.device_count()
    if dry:
        raise Skip("dry run: tests/test_ddp_train.py checks the same on CPU/gloo")
    if n < 2:
        raise Skip(f"{n} GPU(s): needs two")
    import yaml

    from regionmed.apps.train.config import RunConfig, StageConfig
    from regionmed.apps.train.metrics import read_metrics
    from regionmed.config import to_dict
    from regionmed.model.registry import model_config

    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="0,1")
        subprocess.run([sys.executable, "-m", "regionmed", "synth", "--out", str(tmp / "data"), "--train", "64", "--test", "8",
                        "--image-size", "64"], check=True, env=env, capture_output=True)
        cfg = RunConfig(seed=0, model=model_config("tiny-vit-minilm", {"roi": {"mode": "crop"}}))
        cfg.data.train, cfg.train.batch_size, cfg.train.tensorboard = str(tmp / "data"), 8, False
        cfg.train.stages = [StageConfig(name="global", steps=3, lr=1e-3, losses={"global": 1.0}),
                            StageConfig(name="region", steps=3, lr=1e-3, use_rois=True, losses=dict(EVERY_TERM))]
        (tmp / "run.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        common = ["-m", "regionmed", "train", "--config", str(tmp / "run.yaml"), "--no-progress"]
        one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp / "one")], env=env, capture_output=True, text=True)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
                              "--output-dir", str(tmp / "two")], env=env, capture_output=True, text=True)
        for name, proc in (("one process", one), ("two processes", two)):
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed: {proc.stderr[-1500:]}")
        steps = {run: {r["step"]: r for r in read_metrics(tmp / run / "metrics.jsonl") if r["event"] == "step"}
                 for run in ("one", "two")}
    worst = 0.0
    for step, row in steps["one"].items():
        for key in (k for k in row if k.startswith("loss.")):
            a, b = row[key], steps["two"][step][key]
            worst = max(worst, abs(a - b) / max(1.0, abs(a)))
    figures = {"steps": len(steps["one"]), "max_rel_loss_diff": worst}
    if worst > 1e-3:
        raise AssertionError(f"two processes depart from one: {figures}")
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the JSON table (default gpu_check.json)")
    ap.add_argument("--batch", type=int, default=64, help="batch of the throughput checks (default 64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps of the throughput checks (default 10)")
    ap.add_argument("--dry-run", action="store_true", help="every check on the CPU at tiny sizes (gloo for nccl)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry:
        args.batch, args.steps = 2, 1
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda:0")
    checks = Checks()
    with checks.check("device") as row:
        row["figures"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                          "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not dry else [],
                          "bf16": bool(torch.cuda.is_bf16_supported()) if not dry else None, "dry_run": dry}
    group_ready = False
    with checks.check("nccl" if not dry else "nccl (dry run: gloo)") as row:
        import torch.distributed as dist

        backend = "gloo" if dry else "nccl"
        t = time.perf_counter()
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                **({"device_id": device} if not dry else {}))
        ones = torch.ones(4, device=device)
        dist.all_reduce(ones)
        group_ready = True
        row["figures"] = {"backend": dist.get_backend(), "init_s": round(time.perf_counter() - t, 3),
                          "all_reduce": float(ones.sum())}
        if float(ones.sum()) != 4.0:
            raise AssertionError("all-reduce over one process changed the tensor")
    with checks.check("bf16 vs fp32") as row:
        row["figures"] = check_bf16(device, dry)
    with checks.check("SyncBatchNorm") as row:
        row["figures"] = check_syncbn(device, dry, group_ready)
    with checks.check("throughput (BiomedCLIP shapes, global-only)") as row:
        row["figures"] = timed_steps(device, dry, args.batch, args.steps, full=False)
    base = row["figures"].get("step_s")
    with checks.check("full method (crop, 4 ROIs)") as row:
        row["figures"] = timed_steps(device, dry, args.batch, args.steps, full=True)
        if base:
            row["figures"]["x_global_only"] = round(row["figures"]["step_s"] / base, 2)
    if group_ready:
        import torch.distributed as dist

        dist.destroy_process_group()
    with checks.check("DDP equality (2 GPUs, nccl)") as row:
        row["figures"] = check_ddp_equality(dry)

    print(f"\nregionmed GPU check{' (DRY RUN on the CPU: figures meaningless)' if dry else ''}:")
    print("| check | verdict | figures | seconds |")
    print("|---|---|---|---|")
    for r in checks.rows:
        figures = ", ".join(f"{k} {v}" for k, v in r["figures"].items())
        print(f"| {r['check']} | {r['verdict']}{': ' + r['detail'] if r['detail'] else ''} | {figures} | {r['seconds']} |")
    Path(args.out).write_text(json.dumps({"dry_run": dry, "rows": checks.rows}, indent=1, default=str))
    print(f"written: {args.out}")
    return 1 if any(r["verdict"] == "FAIL" for r in checks.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
