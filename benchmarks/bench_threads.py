"""Threads that fit the machine: a train step alone, and beside another one-thread job (issue 20).

    OMP_NUM_THREADS= python benchmarks/bench_threads.py [--steps 8] [--batch 32] [--smoke]

The step: the demo recipe's global-only train step (``benchmarks/bench_step.py``'s batch and
model: resnet18 @ 128 px + MiniLM, batch ``--batch``), run in a fresh process that times
``--steps`` steps after one warm-up step (wall clock, median). Each policy is timed twice:

* *alone*: nothing else of this benchmark runs;
* *beside*: another process runs the same step in a loop with one torch thread, started
  before the timed process and stopped after it (the "other one-thread job").

Policies: ``auto`` (regionmed.threads.set_threads: the cores less the busy ones at start, what
every regionmed command now does) and ``torch default`` (PyTorch's own choice: every core,
what regionmed did before). The goal: ``auto`` beside the other job at most 2x its time alone.
``OMP_NUM_THREADS`` and ``REGIONMED_THREADS`` are cleared for the timed processes (they would
override both policies). A shared machine biases both policies alike; run it quiet.

``--smoke``: a seconds-long run for CI (the tests' tiny model, batch 2, 1 step, the
``auto`` policy only): figures meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    import torch

    from bench_step import CONFIG, make_batch
    from regionmed.apps.train.config import load_run_config
    from regionmed.apps.train.trainer import build_optimizer
    from regionmed.model.clip import RegionMedCLIP
    from regionmed.optim import GuardedStep
    from regionmed.task import TrainingTask
    from regionmed.threads import set_threads

    if args.policy == "auto":
        set_threads()
    elif args.policy.isdigit():
        torch.set_num_threads(int(args.policy))
    cfg = load_run_config(CONFIG)
    if args.tiny:  # the smoke setting: the tests' tiny model
        from regionmed.model.registry import model_config

        cfg.model = model_config("tiny-vit-minilm")
    cfg.model.roi.mode, cfg.model.roi.grid_context = "none", False
    size = cfg.model.image.image_size
    torch.manual_seed(0)
    model = RegionMedCLIP(cfg.model).train()
    task = TrainingTask(model, 3, 3)
    task.set_stage({"global": 1.0, "summary": 0.5}, use_rois=False)
    opt, guard = build_optimizer(model, cfg), GuardedStep("fp32", 1.0, 5)
    batch = make_batch(args.batch, 1, size, size // 2)

    def step() -> float:
        t = time.perf_counter()
        guard.step(task(batch), opt, model.parameters())
        return time.perf_counter() - t

    step()  # warm-up
    if args.forever:
        print("ready", flush=True)
        while True:
            step()
    times = [step() for _ in range(args.steps)]
    print(json.dumps({"threads": torch.get_num_threads(), "median_s": statistics.median(times)}), flush=True)
    return 0


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REGIONMED_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def timed(policy: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", "--policy", policy, "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--tiny"] if args.smoke else []
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"timed step ({policy}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def beside(policy: str, args) -> dict:
    other = subprocess.Popen([sys.executable, __file__, "--_worker", "--policy", "1", "--forever", "--batch", str(args.batch),
                              *(["--tiny"] if args.smoke else [])],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if other.stdout.readline().strip() != "ready":  # the other job is stepping
            raise RuntimeError("the other one-thread job did not start")
        return timed(policy, args)
    finally:
        other.kill()
        other.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per process (median)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="seconds-long run for CI: tiny sizes, figures meaningless")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        return worker(args)
    if args.smoke:
        args.steps, args.batch = 1, 2
    rows = []
    policies = (("auto", "auto (regionmed.threads)"), ("default", "torch default"))
    for policy, name in policies[:1] if args.smoke else policies:
        alone = timed(policy, args)
        near = beside(policy, args)
        rows.append((name, alone, near))
        print(f"{name}: alone {alone}, beside {near}", file=sys.stderr, flush=True)
    print(f"\nGlobal-only train step (demo recipe, batch {args.batch}), median of {args.steps} steps, wall clock; "
          f"{os.cpu_count()} cores; beside = with another one-thread job running the same step:")
    print("| policy | threads alone | step alone (s) | threads beside | step beside (s) | beside / alone | goal |")
    print("|---|---|---|---|---|---|---|")
    for name, alone, near in rows:
        ratio = near["median_s"] / alone["median_s"]
        goal = f"≤ 2× ({'met' if ratio <= 2 else 'NOT met'})" if name.startswith("auto") else ""
        print(f"| {name} | {alone['threads']} | {alone['median_s']:.3f} | {near['threads']} | {near['median_s']:.3f} | "
              f"{ratio:.2f} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
