"""Train-step time at the demo recipe: global-only vs ROI modes `align` and `crop`.

    python benchmarks/bench_step.py [--rounds 5] [--batch 32] [--rois 4] [--threads 1] [--clock cpu] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless):
one round, batch 2, K = 2, two variants (align with the same losses, crop with the full method).

K ROIs per image, ROI crops at half the image size, one process. Two comparisons,
both measured in the same run, modes interleaved round by round (the machine is
noisy), median step time reported:

* "same losses": every mode optimises global + summary; align/crop also run the
  ROI path (features + ROI processor). This isolates what the ROI path costs.
* "full method": align/crop add the region and hard-negative losses (region
  captions and 3 negatives per ROI go through the text tower too).

A step is the trainer's: :class:`regionmed.task.TrainingTask` (encode, lay out the
loss inputs, local loss) under the precision context, then
:class:`regionmed.optim.GuardedStep` (loss all-reduce — the identity in one
process —, backward, gradient clipping, AdamW update).

Against another revision
------------------------

    python benchmarks/bench_step.py --against 8b46c7e --clock cpu [--repeats 2] [--rounds 3]

checks ``REV`` out into a temporary ``git worktree`` under /tmp (removed at the
end) and runs, alternately (new, old, old, new, ...; ``--repeats`` runs of each),
this script and that revision's own ``benchmarks/bench_step.py`` as subprocesses
with ``PYTHONPATH=<tree>/src``, the same options, one torch thread
(``--threads 1``, ``OMP_NUM_THREADS=1``). Both print the table below; it is
parsed, and for every configuration (the global-only baseline, pooled over its
pairings, and each variant) the median over repeats of each side's median step
time is printed with the ratio new/old (and the range of the per-repeat ratios).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from regionmed.apps.curation.phantoms import generate_phantom  # noqa: E402
from regionmed.apps.train.config import load_run_config  # noqa: E402
from regionmed.apps.train.trainer import build_optimizer  # noqa: E402
from regionmed.data.loader import Batch  # noqa: E402
from regionmed.model.clip import RegionMedCLIP  # noqa: E402
from regionmed.optim import GuardedStep  # noqa: E402
from regionmed.task import TrainingTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
NEGATIVES = 3  # at most this many negatives per ROI and per image in the benchmark batch


def make_batch(b: int, k: int, image_size: int, roi_size: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    records = [generate_phantom(i, seed, "train")[1] for i in range(b)]
    captions, negatives = [], []
    for rec in records:
        regions = rec["regions"] or [{"caption": "no focal abnormality", "negatives": [{"text": "left upper zone nodule"}]}]
        for j in range(k):
            region = regions[j % len(regions)]
            captions.append(region["caption"])
            negatives.append([n["text"] for n in region.get("negatives", [])][:NEGATIVES])
    xy = torch.rand(b, k, 2, generator=g) * 0.6
    wh = torch.rand(b, k, 2, generator=g) * 0.3 + 0.05
    return Batch(
        images=torch.randn(b, 3, image_size, image_size, generator=g),
        boxes=torch.cat([xy, xy + wh], dim=-1),
        roi_mask=torch.ones(b, k, dtype=torch.bool),
        roi_crops=torch.randn(b * k, 3, roi_size, roi_size, generator=g),
        reports=[r["report"] for r in records],
        summaries=[r["summary"] for r in records],
        captions=captions,
        roi_negatives=negatives,
        image_negatives=[[n["text"] for n in r.get("negatives", [])][:NEGATIVES] for r in records],
        ids=[r["id"] for r in records],
    )


def _slots(lists: list[list[str]], configured: int) -> int:
    """Negative slots: the data config's, or more when the benchmark batch holds more."""
    return max(configured, max((len(x) for x in lists), default=0))


def measure(args) -> None:
    cfg = load_run_config(CONFIG)
    size = cfg.model.image.image_size
    roi_size = size // 2
    base = {"global": 1.0, "summary": 0.5}
    full = {**base, "region": 1.0, "hard_negative": 1.0}
    variants = {  # name: (roi mode, losses, use_rois)
        "global-only": ("none", base, False),
        "align, same losses": ("align", base, True),
        "crop, same losses": ("crop", base, True),
        "align, full method": ("align", full, True),
        "crop, full method": ("crop", full, True),
    }
    if args.only:
        variants = {n: v for n, v in variants.items() if n in args.only or n == "global-only"}
    batch = make_batch(args.batch, args.rois, size, roi_size)
    max_negatives = _slots(batch.roi_negatives, cfg.data.max_negatives)
    max_image_negatives = _slots(batch.image_negatives, cfg.data.max_image_negatives)

    grid_context = cfg.model.roi.grid_context  # the recipe's; a crop-mode setting only

    def build(mode: str, losses: dict[str, float], use_rois: bool):
        torch.manual_seed(0)
        cfg.model.roi.mode, cfg.model.roi.roi_size, cfg.model.roi.max_rois = mode, roi_size, args.rois
        cfg.model.roi.grid_context = grid_context and mode == "crop"
        model = RegionMedCLIP(cfg.model).train()
        task = TrainingTask(model, max_negatives, max_image_negatives)
        task.set_stage(losses, use_rois)
        guard = GuardedStep(cfg.train.precision, cfg.train.grad_clip, cfg.train.max_nonfinite)
        return task, build_optimizer(model, cfg), guard

    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def step(task: TrainingTask, opt, guard: GuardedStep) -> float:
        t = clock()
        with guard.autocast("cpu"):
            terms = task(batch)
        if guard.step(terms, opt, task.model.parameters()) is None:
            raise RuntimeError(guard.last_skip)
        return clock() - t

    # Each variant is paired with its own global-only baseline in a process holding just
    # those two models: with all five models in one process the ROI variants measured
    # 1.36x where the same pair alone measured 1.00x (allocator/cache effects, not the method).
    rows = []
    for name, (mode, losses, use_rois) in variants.items():
        if name == "global-only":
            continue
        baseline = build("none", base, False)
        variant = build(mode, losses, use_rois)
        step(*baseline), step(*variant)  # warm-up
        t_base, t_var = [], []
        for _ in range(args.rounds):
            t_base.append(step(*baseline))
            t_var.append(step(*variant))
        rows.append((name, statistics.median(t_base), statistics.median(t_var)))
        print(f"{name}: global-only {rows[-1][1]:.2f}s, variant {rows[-1][2]:.2f}s", file=sys.stderr)
        del baseline, variant
        gc.collect()
    print(f"\nTrain step, demo recipe ({cfg.model.image.name} @ {size} px + {cfg.model.text.name}), batch {args.batch}, "
          f"K = {args.rois} ROIs/image, ROI size {roi_size}, torch threads {torch.get_num_threads()}, {args.clock} clock, median of {args.rounds} "
          "(each variant interleaved with its own global-only baseline):")
    print("| variant | global-only step (s) | variant step (s) | × global-only | goal |")
    print("|---|---|---|---|---|")
    goals = {"align, same losses": 1.15, "crop, same losses": 2.0, "crop, full method": 1.5}
    for name, tb, tv in rows:
        goal = f"≤ {goals[name]:.2f}× ({'met' if tv / tb <= goals[name] else 'NOT met'})" if name in goals else ""
        print(f"| {name} | {tb:.3f} | {tv:.3f} | {tv / tb:.2f} | {goal} |")


# --------------------------------------------------------------------------------------
# --against REV
_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|")


def parse_table(text: str) -> dict[str, list[float]]:
    """{configuration: [seconds, ...]} from the printed table: the global-only column
    of every row pooled under "global-only", and each variant's own column."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m:
            out.setdefault("global-only", []).append(float(m.group(2)))
            out.setdefault(m.group(1), []).append(float(m.group(3)))
    if not out:
        raise RuntimeError(f"no timing table in the output:\n{text[-2000:]}")
    return out


def _run_side(script: Path, src: Path, argv: list[str], label: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script), *argv], env=env, cwd=str(script.parents[1]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} ({script}) failed with exit code {proc.returncode}:\n{proc.stderr[-4000:]}")
    table = {name: statistics.median(v) for name, v in parse_table(proc.stdout).items()}
    print(f"  {label}: {time.perf_counter() - t:.0f} s wall; "
          + ", ".join(f"{k} {v:.3f}s" for k, v in table.items()), file=sys.stderr, flush=True)
    return table


def against(args) -> int:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.against}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        print(f"not a revision of {ROOT}: {args.against!r}\n{rev.stderr}", file=sys.stderr)
        return 2
    commit = rev.stdout.strip()
    argv = ["--rounds", str(args.rounds), "--batch", str(args.batch), "--rois", str(args.rois),
            "--threads", str(args.threads or 1), "--clock", args.clock]
    if args.only:
        argv += ["--only", *args.only]
    tmp = Path(tempfile.mkdtemp(prefix="bench_step_against_"))
    tree = tmp / "tree"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                       check=True, capture_output=True, text=True)
        sides = {"new": (Path(__file__).resolve(), ROOT / "src"), "old": (tree / "benchmarks" / "bench_step.py", tree / "src")}
        results: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
        print(f"bench_step: this tree vs {args.against} ({commit[:10]}) in {tree}, {args.repeats} repeat(s) each, "
              f"alternating", file=sys.stderr, flush=True)
        for r in range(args.repeats):
            order = ("new", "old") if r % 2 == 0 else ("old", "new")
            for side in order:
                script, src = sides[side]
                results[side].append(_run_side(script, src, argv, f"repeat {r + 1} {side}"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    names = [n for n in results["new"][0] if all(n in t for t in results["new"] + results["old"])]
    print(f"\nTrain step, this tree (new: TrainingTask + GuardedStep) vs {args.against} (old: its own bench_step), "
          f"batch {args.batch}, K = {args.rois}, torch threads {args.threads or 1}, {args.clock} clock; per side the "
          f"median over {args.repeats} alternating run(s) of each run's median of {args.rounds} steps:")
    print("| configuration | new step (s) | old step (s) | new / old | per-repeat new / old |")
    print("|---|---|---|---|---|")
    for name in names:
        new = [t[name] for t in results["new"]]
        old = [t[name] for t in results["old"]]
        per = [a / b for a, b in zip(new, old)]
        print(f"| {name} | {statistics.median(new):.3f} | {statistics.median(old):.3f} | "
              f"{statistics.median(new) / statistics.median(old):.2f} | {min(per):.2f}–{max(per):.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rois", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default; 1 with --against)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (names as printed)")
    ap.add_argument("--against", metavar="REV", default=None,
                    help="also time git revision REV's own bench_step (temporary worktree), interleaved; print new/old")
    ap.add_argument("--repeats", type=int, default=2, help="with --against: runs of each side, alternating")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--rounds 1 --batch 2 --rois 2, two variants)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.batch, args.rois, args.repeats = 1, 2, 2, 1
        args.only = args.only or ["align, same losses", "crop, full method"]  # both ROI modes, both loss sets
    if args.against:
        return against(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
