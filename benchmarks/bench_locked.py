"""Optimizer steps per CPU-minute: the locked-tower recipe (cpu_grounding.yaml) against the
trainable-tower recipe (cpu_pretrained.yaml), on the same MedRegion dataset.

    python benchmarks/bench_locked.py --data DIR [--steps 30] [--skip 5] [--out runs/bench_locked] [--batch 32]
    python benchmarks/bench_locked.py --smoke

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): a phantom
MedRegion dataset of 8 images (128 px) written to a temporary folder, which also holds
the runs and the cache and is removed at the end; 2 steps of batch 4, none skipped; the
locked run builds its cache itself (no separate timed build run).

Each recipe trains ``--steps`` steps of one stage with the full method's losses (global,
summary, region, hard negatives; the locked recipe adds its grounding term), batch 32, one
torch thread, through ``regionmed train`` as a subprocess (the recipes' own settings
otherwise). The figure is the median of the trainer's per-step process CPU time
(``step_cpu_s`` in ``metrics.jsonl``; the first ``--skip`` steps left out), so a shared
machine slows both alike. The locked recipe's feature cache is built first, in a fresh cache
folder, and its build time is printed separately: it is paid once per model, data and
preprocessing, and amortised over every run that reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "regionmed" / "configs"
FULL = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}


def _train(config: Path, data: str, out: Path, steps: int, losses: dict, extra: list[str], batch: int = 32) -> float:
    stage = {"name": "bench", "steps": steps, "lr": 5.0e-4, "use_rois": True, "losses": losses}
    args = [sys.executable, "-m", "regionmed", "train", "--config", str(config), "--no-progress",
            "--set", f"data.train={data}", "--set", f"train.output_dir={out}", "--set", f"train.stages=[{json.dumps(stage)}]",
            "--set", "train.checkpoint_every=0", "--set", "validation.every=0", "--set", f"train.batch_size={batch}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def _median_cpu(out: Path, skip: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("event") == "step"][skip:]
    return statistics.median(r["step_cpu_s"] for r in steps), statistics.median(r["step_time_s"] for r in steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a MedRegion dataset (its train split is used; required unless --smoke)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the median (warm-up)")
    p.add_argument("--out", default="runs/bench_locked")
    p.add_argument("--cache", help="an existing feature cache folder of this data to reuse (its build is then not timed)")
    p.add_argument("--batch", type=int, default=32, help="batch size of both recipes (default 32)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run for CI: tiny sizes, figures meaningless (8 phantom images in a temporary "
                        "folder, --steps 2 --skip 0 --batch 4)")
    args = p.parse_args(argv)
    if args.smoke:
        return smoke(args)
    if not args.data:
        p.error("--data is required (or --smoke)")
    return run(args)


def smoke(args) -> int:
    from regionmed.apps.curation.phantoms import PhantomConfig, write_phantom_dataset

    args.steps, args.skip, args.batch = 2, 0, 4
    with tempfile.TemporaryDirectory(prefix="bench_locked_") as tmp:
        args.data = str(Path(tmp) / "data")
        write_phantom_dataset(args.data, n_train=8, n_test=0, seed=0, config=PhantomConfig(image_size=128), progress=False)
        # a fresh cache folder given as --cache: the locked run builds it itself (no separate, timed build run)
        args.out, args.cache = str(Path(tmp) / "runs"), str(Path(tmp) / "cache")
        return run(args)


def run(args) -> int:
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    build_s = None
    if not args.cache:
        if cache.exists():
            sys.exit(f"{cache} exists: give a fresh --out so that the cache build is timed")
        # the locked recipe: the first run builds the cache (timed as a whole), the second reads it
        build_s = _train(CONFIGS / "cpu_grounding.yaml", args.data, out / "locked_build", 1, {**FULL, "grounding": 1.0},
                         ["--set", f"train.lock.cache_dir={cache}"], args.batch)
    _train(CONFIGS / "cpu_grounding.yaml", args.data, out / "locked", args.steps, {**FULL, "grounding": 1.0},
           ["--set", f"train.lock.cache_dir={cache}"], args.batch)
    _train(CONFIGS / "cpu_pretrained.yaml", args.data, out / "trainable", args.steps, FULL, [], args.batch)
    locked_cpu, locked_wall = _median_cpu(out / "locked", args.skip)
    base_cpu, base_wall = _median_cpu(out / "trainable", args.skip)
    print(f"{'recipe':<44} {'CPU s/step':>10} {'wall s/step':>11} {'steps/CPU-min':>14}")
    print(f"{'cpu_pretrained.yaml (towers train, 128 px)':<44} {base_cpu:>10.3f} {base_wall:>11.3f} {60 / base_cpu:>14.1f}")
    print(f"{'cpu_grounding.yaml (locked + cache, 256 px)':<44} {locked_cpu:>10.3f} {locked_wall:>11.3f} {60 / locked_cpu:>14.1f}")
    print(f"ratio (locked / trainable steps per CPU-minute): {base_cpu / locked_cpu:.2f}x")
    if build_s is not None:
        print(f"feature cache build (once per model, data and preprocessing; includes one step): {build_s:.0f} s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
