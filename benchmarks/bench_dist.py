"""Data-parallel scaling at a fixed per-rank batch: the local loss vs the old union loss.

    python benchmarks/bench_dist.py [--procs 1,2,4] [--per-rank-batch 32] [--rois 4] [--steps 10] [--warmup 2]
    python benchmarks/bench_dist.py --model [--procs 1,2,4] [--model-batch 8] [--steps 4] [--warmup 1]
    python benchmarks/bench_dist.py --smoke [--model]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): two processes
(``--procs 2``), per-rank batch 4 with K = 2 (``--model``: 2 phantoms), one warm-up and
one timed step, one profiled step per scheme.

For each world size P the script launches itself under
``python -m torch.distributed.run --standalone --nproc_per_node P`` (gloo, CPU, one
torch thread per process); rank 0 of each launch writes what every rank measured
to a JSON file, and this (parent) process prints one table over all P.

Loss step (default)
-------------------
Each rank builds fixed-shape synthetic :class:`regionmed.losses.LossInputs`: random
L2-normalised embeddings (leaf tensors with ``requires_grad``) for ``B`` =
``--per-rank-batch`` images, ``K`` = ``--rois`` ROI slots per image (all valid),
``N = 3`` negatives per ROI, ``M = 2`` per image, ``D = 256``, distinct text ids,
and a learnable logit scale; all four terms are active. The towers are not run:
a step is the loss alone, forward + backward. Two schemes, alternated step by step
in the same processes:

* **local** (this tree): ``compute_losses`` on the rank's own inputs: its ``B·K``
  region rows (``B`` image rows) against the ``P·B·K`` (``P·B``) gathered columns,
  backward of ``P × total`` (what :class:`regionmed.optim.GuardedStep` does);
* **union** (the scheme before the redesign, commit 8b46c7e): every field is
  all-gathered, the rank's own slice kept attached to its graph and the others
  plain copies, and every rank computes the whole single-process loss on the
  union batch (``compute_losses`` with the distributed helpers of
  :mod:`regionmed.losses` patched to single-process identities, as in
  ``tests/ddp_worker.py``): ``P·B·K × P·B·K`` logits; then backward.

Memory, the method: after the timed steps, each scheme's step runs
``--mem-repeats`` more times under ``torch.profiler`` with ``profile_memory=True``;
the profiler records every allocation and free of the CPU allocator (``[memory]``
events, signed byte counts, any thread). Their running sum in time order is the
number of tensor bytes allocated during the step and still alive; its maximum is
the step's **peak** (tensors that existed before the step, such as the inputs, are
not counted; gradients allocated in the step are). The median over the repeats is
printed (the largest over ranks) with the min–max over all: the union scheme's
peak varies from step to step (by up to ~1.5 MiB at P = 2 on the machine measured):
its allocations are the same every step, but some of the all-gathers' buffers are
released at times set by gloo's threads.

What grows with P. Local loss: the gathered columns (``P·B·K × D``) and the
``(B·K)_local × (B·K)_global`` matrices — logits, log-softmax, targets, masks and
their gradients — so the per-rank peak grows linearly, ≈ a + b·P (with one process
nothing is gathered, so P = 1 sits a little below the line). Union loss: the same
matrices are ``(B·K)_global²``, so the peak grows quadratically, ≈ a + b·P + c·P².
The constant ``a`` (this rank's hard negatives and the gradients of its inputs)
makes the ratios to P = 1 a little below P and P².

Time: the median over ``--steps`` (after ``--warmup``) of each scheme's step, wall
clock (ranks start each step together, after a barrier; the slowest rank's median
is printed) and this process's CPU time (the mean over ranks). With more processes
than cores the wall time includes waiting for a core; the CPU time does not.

Full model (``--model``)
------------------------
Real data-parallel train steps with the tiny towers of ``tests/conftest.py``
(ViT-Tiny depth 2 at 64 px, a 2-layer MiniLM from random init, crop ROIs, K = 3)
on phantom samples, ``--model-batch`` per rank: ``TrainingTask`` wrapped in
``DistributedDataParallel`` (one process: unwrapped), all four losses, ROIs on,
:class:`regionmed.optim.GuardedStep` and the trainer's AdamW. Printed per P: the
per-rank step time (median; wall, slowest rank, and CPU, mean over ranks), a rank's
resident set size once the model and batch are built (``/proc/self/statm``) and its
peak resident set size (``resource.getrusage``; both the largest over ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from regionmed.distributed import cleanup_distributed, gather_tensor, init_distributed  # noqa: E402
from regionmed.losses import LossInputs, compute_losses  # noqa: E402

WEIGHTS = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0}
N_ROI_NEG, N_IMG_NEG, DIM = 3, 2, 256
MIB = 2**20

MODEL = "tiny-vit-minilm"  # the tiny test model (regionmed models tiny-vit-minilm), as in tests/conftest.py


# --------------------------------------------------------------------------------------
# measuring
def peak_memory(fn) -> int:
    """Peak bytes allocated during ``fn()`` and alive at once, from the profiler's CPU
    allocator events (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    if not events:
        raise RuntimeError("the profiler recorded no CPU memory events")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``, ranks started together."""
    barrier()
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------
# loss-step worker
class SyntheticLoss:
    """One rank's fixed-shape leaf embeddings and the two loss steps over them."""

    def __init__(self, b: int, k: int, rank: int, world: int):
        self.rank, self.world = rank, world
        g = torch.Generator().manual_seed(1000 + rank)

        def emb(*shape: int) -> torch.Tensor:
            return F.normalize(torch.randn(*shape, DIM, generator=g), dim=-1).requires_grad_()

        def ids(*shape: int) -> torch.Tensor:  # distinct texts within a field, over all ranks
            return (torch.arange(math.prod(shape)) + rank * 10**7).reshape(shape)

        self.log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        self.leaves = {
            "image_fused": emb(b), "image_global": emb(b), "report": emb(b), "summary": emb(b),
            "roi": emb(b, k), "caption": emb(b, k), "roi_negatives": emb(b, k, N_ROI_NEG),
            "image_negatives": emb(b, N_IMG_NEG),
        }
        self.fixed = {
            "report_ids": ids(b), "summary_ids": ids(b), "caption_ids": ids(b, k),
            "roi_mask": torch.ones(b, k, dtype=torch.bool),
            "roi_negatives_mask": torch.ones(b, k, N_ROI_NEG, dtype=torch.bool),
            "image_negatives_mask": torch.ones(b, N_IMG_NEG, dtype=torch.bool),
        }

    def _params(self) -> list[torch.Tensor]:
        return [self.log_scale, *self.leaves.values()]

    def zero_grad(self) -> None:
        for p in self._params():
            p.grad = None

    def inputs(self) -> LossInputs:
        return LossInputs(logit_scale=self.log_scale.exp(), **self.leaves, **self.fixed)

    def local_step(self) -> None:
        terms = compute_losses(self.inputs(), WEIGHTS)
        (terms["total"] * self.world).backward()

    def _union(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of ``x``; only this rank's slice is attached to its graph."""
        if self.world == 1:
            return x
        parts = list(gather_tensor(x).chunk(self.world))
        parts[self.rank] = x
        return torch.cat(parts)

    def union_step(self) -> None:
        local = self.inputs()
        union = LossInputs(logit_scale=local.logit_scale, **{
            name: self._union(getattr(local, name)) for name in (*self.leaves, *self.fixed)
        })
        terms = compute_losses(union, WEIGHTS, distributed=False)
        terms["total"].backward()


def loss_worker(args, rank: int, world: int) -> dict:
    bench = SyntheticLoss(args.per_rank_batch, args.rois, rank, world)
    steps = {"local": bench.local_step, "union": bench.union_step}
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for i in range(args.warmup + args.steps):
        for name, fn in steps.items():
            bench.zero_grad()
            wall, cpu = timed(fn)
            if i >= args.warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    peaks: dict[str, list[int]] = {name: [] for name in steps}
    for _ in range(args.mem_repeats):
        for name, fn in steps.items():
            bench.zero_grad()
            barrier()
            peaks[name].append(peak_memory(fn))
    return {name: {"peak": statistics.median(peaks[name]), "peaks": peaks[name],
                   "wall": statistics.median(times[name]["wall"]), "cpu": statistics.median(times[name]["cpu"])}
            for name in steps}


# --------------------------------------------------------------------------------------
# full-model worker
def phantom_batch(model, b: int, rank: int):
    """``b`` phantom samples (this rank's own), preprocessed as the dataset does, collated."""
    from PIL import Image

    from regionmed.apps.curation.phantoms import generate_phantom
    from regionmed.data.loader import collate
    from regionmed.data.schema import sanitize_regions

    pre = model.preprocessor
    samples = []
    for i in range(rank * b, (rank + 1) * b):
        image, record = generate_phantom(i, 0, "train")
        regions = sanitize_regions(record)[0][: pre.max_rois]
        out = pre(Image.fromarray(image), [r["box"] for r in regions])
        samples.append({
            "id": record["id"], "image": out["image"], "boxes": out["boxes"], "crops": out["crops"],
            "report": record["report"], "summary": record["summary"],
            "captions": [r["caption"] for r in regions],
            "roi_negatives": [[n["text"] for n in r.get("negatives", [])][:N_ROI_NEG] for r in regions],
            "roi_negative_rules": [[n.get("rule", "") for n in r.get("negatives", [])][:N_ROI_NEG] for r in regions],
            "image_negatives": [n["text"] for n in record.get("negatives", [])][:N_IMG_NEG],
        })
    return collate(samples, max_rois=pre.max_rois)


def model_worker(args, rank: int, world: int) -> dict:
    from regionmed.apps.train.config import RunConfig, StageConfig
    from regionmed.apps.train.trainer import build_optimizer
    from regionmed.model.clip import create_model
    from regionmed.model.registry import model_config
    from regionmed.optim import GuardedStep
    from regionmed.task import TrainingTask

    cfg = RunConfig(seed=0, model=model_config(MODEL))
    cfg.train.stages = [StageConfig(name="region", steps=args.warmup + args.steps, lr=1e-3, use_rois=True, losses=WEIGHTS)]
    torch.manual_seed(0)
    model = create_model(cfg.model).train()
    task = TrainingTask(model, N_ROI_NEG, N_IMG_NEG)
    task.set_stage(WEIGHTS, use_rois=True)
    runner = task
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(task, broadcast_buffers=True)
    optimizer = build_optimizer(model, cfg)
    guard = GuardedStep(cfg.train.precision, cfg.train.grad_clip, cfg.train.max_nonfinite)
    batch = phantom_batch(model, args.model_batch, rank)
    rss_before = _rss_now()

    def step() -> None:
        if guard.step(runner(batch), optimizer, model.parameters()) is None:
            raise RuntimeError(guard.last_skip)

    wall, cpu = [], []
    for i in range(args.warmup + args.steps):
        w, c = timed(step)
        if i >= args.warmup:
            wall.append(w)
            cpu.append(c)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "rss_before": rss_before,
            "rois": int(batch.roi_mask.sum())}


def _rss_now() -> int:
    """This process's resident set size now, in bytes (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> int:
    torch.set_num_threads(1)
    info = init_distributed(backend="gloo", device="cpu")
    try:
        result = (model_worker if args.model else loss_worker)(args, info.rank, info.world_size)
        results = gather_objects(result)
        if info.is_main:
            Path(args.out).write_text(json.dumps({"world": info.world_size, "ranks": results}), encoding="utf-8")
            print(f"[rank 0 of {info.world_size}] {json.dumps(results[0])}", flush=True)
    finally:
        barrier()
        cleanup_distributed()
    return 0


# --------------------------------------------------------------------------------------
# parent: launch, collect, print
def launch(args, procs: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           str(Path(__file__).resolve()), "--worker", "--out", str(out),
           "--per-rank-batch", str(args.per_rank_batch), "--rois", str(args.rois), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--model-batch", str(args.model_batch),
           "--mem-repeats", str(args.mem_repeats)]
    if args.model:
        cmd.append("--model")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               KINETO_LOG_LEVEL="5", TMPDIR=str(out.parent))  # torchrun's torchelastic_* folder: removed with it
    for attempt in (1, 2):
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        note = ""
        if out.exists():  # rank 0 writes it once every rank's results are in
            if proc.returncode != 0:
                note = f" (torchrun exit code {proc.returncode} after the results were written: {_last_error(proc)})"
            print(f"P = {procs}: {time.perf_counter() - t:.0f} s{note}", file=sys.stderr, flush=True)
            for line in proc.stdout.splitlines():
                if line.startswith("[rank 0"):
                    print(f"  {line}", file=sys.stderr, flush=True)
            return json.loads(out.read_text(encoding="utf-8"))
        print(f"P = {procs}: attempt {attempt} failed ({proc.returncode}): {_last_error(proc)}", file=sys.stderr, flush=True)
    raise RuntimeError(f"torchrun with {procs} process(es) failed ({proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _last_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.splitlines()
    for key in ("terminate called", "Error", "Signal"):
        found = [x.strip() for x in lines if key in x]
        if found:
            return found[-1]
    return "no error line"


def print_loss_table(args, runs: dict[int, dict]) -> None:
    b, k = args.per_rank_batch, args.rois
    print(f"\nLoss step alone (forward compute_losses + backward; all four terms), fixed per-rank batch B = {b}, "
          f"K = {k} ROIs/image (B·K = {b * k} region rows per rank), N = {N_ROI_NEG}, M = {N_IMG_NEG}, D = {DIM}; "
          f"gloo on CPU, 1 thread/process, {os.cpu_count()} cores; median of {args.steps} steps after {args.warmup}.")
    print(f"Memory per rank: peak tensor bytes allocated during the step and alive at once (profiler allocator events; "
          f"median of {args.mem_repeats} profiled steps, the largest over ranks; min–max over all). "
          "Step time: wall (slowest rank) / CPU (mean over ranks).")
    print("| procs P | global batch | region logits per rank, local / union | local peak MiB (min–max) | × P=1 "
          "| union peak MiB (min–max) | × P=1 | union / local | local step ms wall / CPU | union step ms wall / CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = None
    for p, run in sorted(runs.items()):
        ranks = run["ranks"]
        row = {s: {"peak": max(r[s]["peak"] for r in ranks),
                   "lo": min(x for r in ranks for x in r[s]["peaks"]), "hi": max(x for r in ranks for x in r[s]["peaks"]),
                   "wall": max(r[s]["wall"] for r in ranks), "cpu": statistics.mean(r[s]["cpu"] for r in ranks)}
               for s in ("local", "union")}
        first = first or row
        n, m = b * k, b * k * p
        loc, uni = row["local"], row["union"]
        print(f"| {p} | {b * p} | {n}×{m} / {m}×{m} "
              f"| {loc['peak'] / MIB:.2f} ({loc['lo'] / MIB:.2f}–{loc['hi'] / MIB:.2f}) | {loc['peak'] / first['local']['peak']:.2f} "
              f"| {uni['peak'] / MIB:.2f} ({uni['lo'] / MIB:.2f}–{uni['hi'] / MIB:.2f}) | {uni['peak'] / first['union']['peak']:.2f} "
              f"| {uni['peak'] / loc['peak']:.2f} "
              f"| {loc['wall'] * 1e3:.1f} / {loc['cpu'] * 1e3:.1f} | {uni['wall'] * 1e3:.1f} / {uni['cpu'] * 1e3:.1f} |")


def print_model_table(args, runs: dict[int, dict]) -> None:
    print(f"\nFull DDP train step, tiny towers ({MODEL}: ViT-Tiny depth 2 @ 64 px, 2-layer MiniLM, "
          f"crop ROIs K = 3), all four losses, fixed per-rank batch {args.model_batch} phantoms; gloo on CPU, "
          f"1 thread/process, {os.cpu_count()} cores; median of {args.steps} steps after {args.warmup}.")
    print("| procs P | global batch | ROIs (rank 0) | step s wall (slowest rank) | step s CPU (mean over ranks) "
          "| RSS before the steps, MiB | peak RSS per rank MiB (max over ranks) |")
    print("|---|---|---|---|---|---|---|")
    for p, run in sorted(runs.items()):
        ranks = run["ranks"]
        print(f"| {p} | {args.model_batch * p} | {ranks[0]['rois']} | {max(r['wall'] for r in ranks):.3f} "
              f"| {statistics.mean(r['cpu'] for r in ranks):.3f} | {max(r['rss_before'] for r in ranks) / MIB:.0f} "
              f"| {max(r['rss'] for r in ranks) / MIB:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="1,2,4", help="world sizes, comma-separated")
    ap.add_argument("--per-rank-batch", type=int, default=32, help="images per rank (loss step)")
    ap.add_argument("--rois", type=int, default=4, help="ROI slots per image (loss step)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mem-repeats", type=int, default=3, help="profiled steps per scheme for the memory figure")
    ap.add_argument("--model", action="store_true", help="full DDP train steps with the tiny towers instead")
    ap.add_argument("--model-batch", type=int, default=8, help="images per rank with --model")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--procs 2 --per-rank-batch 4 --rois 2 "
                         "--steps 1 --warmup 1 --mem-repeats 1 --model-batch 2)")
    args = ap.parse_args(argv)
    if args.smoke and not args.worker:
        args.procs, args.per_rank_batch, args.rois, args.steps, args.warmup = "2", 4, 2, 1, 1
        args.mem_repeats, args.model_batch = 1, 2
    if args.worker:
        return worker(args)
    procs = [int(p) for p in args.procs.split(",") if p.strip()]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        for p in procs:
            runs[p] = launch(args, p, Path(tmp) / f"p{p}.json")
    (print_model_table if args.model else print_loss_table)(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
