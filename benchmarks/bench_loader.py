"""Start-up, memory and loader throughput of the two readers, against the dataset size.

    python benchmarks/bench_loader.py [--sizes 10000 100000] [--cache /tmp/regionmed_bench_loader] [--workers 1]
                                      [--repeats 2] [--seconds 8] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): one dataset of
200 samples, made in a temporary folder (not the cache) and removed, one first-step run
per reader, loader throughput over 1 s.

Generates (once, cached under ``--cache``) synthetic MedRegion datasets of each size
with :class:`regionmed.data.shards.MedRegionWriter`: 32 px grayscale PNGs (64
distinct images cycled), one or two regions with captions and negatives per image,
1000 samples per shard. Then, for each reader (``indexed``, ``streaming``) and size,
in a fresh subprocess (one torch thread):

* **first step**: seconds from just before the process is started to the end of the
  first real training step (a tiny ViT/MiniLM model, batch 32, ROIs on): interpreter
  and imports, the trainer's set-up (manifest, index, statistics), the loader, one
  optimiser step;
* **data set-up**: seconds from the end of the imports to the first batch (model
  built, manifest, index and statistics read, loader started): the part that would
  grow with the dataset;
* **peak RSS**: the subprocess's ``ru_maxrss`` (MiB), DataLoader workers excluded
  (``num_workers=0`` for this figure).

Goal: both flat in the dataset size (largest within 1.2x of the smallest).

Then, on the largest dataset: loader samples/s with ``--workers`` worker(s) (per
worker), against the samples/s one training step consumes on the same machine, and
the workers that keeps the step fed (``ceil(consumed / per worker)``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

MODEL = "tiny-vit-minilm"  # the tiny test model (regionmed models tiny-vit-minilm)


def make_dataset(root: Path, n: int) -> Path:
    """A synthetic MedRegion split of ``n`` samples (cached: reused when its manifest exists)."""
    if (root / "manifest.json").is_file():
        return root
    import numpy as np
    from PIL import Image

    from regionmed.data.shards import MedRegionWriter, write_manifest

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    tmp = root.with_name(root.name + ".partial")
    with MedRegionWriter(tmp, "train", max_count=1000) as w:
        for i in range(n):
            regions = [{"box": [2 + i % 7, 3, 20, 18 + i % 9], "caption": f"lesion {i % 11} in the left lobe",
                        "negatives": [{"text": f"lesion {i % 11} in the right lobe", "rule": "laterality"}]}]
            if i % 2:
                regions.append({"box": [10, 10, 30, 30], "caption": "nodule lower zone",
                                "negatives": [{"text": "nodule upper zone", "rule": "location"}]})
            w.write({"schema_version": 1, "id": f"syn-{i:07d}", "split": "train", "width": 32, "height": 32,
                     "summary": f"finding {i % 13}", "report": f"report {i % 101}: finding {i % 13} seen.",
                     "negatives": [{"text": f"report {i % 101}: no finding.", "rule": "negation"}],
                     "regions": regions}, pngs[i % 64])
    write_manifest(tmp, {"train": w.summary()})
    tmp.rename(root)
    return root


CHILD = r"""
import json, os, resource, sys, time
import torch
t_imports = None
torch.set_num_threads(1)
from regionmed.apps.train.config import RunConfig, StageConfig
from regionmed.apps.train.schedule import stage_at
from regionmed.apps.train.trainer import Trainer
from regionmed.model.registry import model_config

data, reader, out, model, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
workers, seconds = int(sys.argv[6]), float(sys.argv[7])
cfg = RunConfig(seed=0, model=model_config(model))
cfg.data.train, cfg.data.reader, cfg.data.num_workers, cfg.data.shuffle_buffer = data, reader, workers, 256
cfg.train.batch_size, cfg.train.output_dir, cfg.train.tensorboard = 32, out, False
cfg.train.stages = [StageConfig(name="s", steps=1000, lr=1e-4, use_rois=True,
                                losses={"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 1.0})]


t_imports = time.time()


class NoLog:
    def write(self, *a, **k):
        pass


t = Trainer(cfg, progress=False)
plan = stage_at(t.plans, 0)
t._enter_stage(plan, NoLog())
loader = iter(t._loader())
if mode == "first":
    batch = next(loader)
    t_batch = time.time()
    t.train_step(batch, plan)
    print(json.dumps({"done": time.time(), "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "counts_from": t.counts_from, "setup_s": t_batch - t_imports}))
elif mode == "loader":
    for _ in range(3):
        next(loader)  # workers started, buffers filled
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += len(next(loader))
    print(json.dumps({"samples_per_s": n / (time.perf_counter() - t0)}))
else:  # step: what training consumes
    batch = next(loader)
    t.train_step(batch, plan)
    t0 = time.perf_counter()
    for _ in range(5):
        t.train_step(batch, plan)
    print(json.dumps({"samples_per_s": 5 * len(batch) / (time.perf_counter() - t0)}))
"""


def child(data: Path, reader: str, mode: str, workers: int = 0, seconds: float = 8.0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT / "src"))
    # the trainer's output folder, and the child's TMPDIR (its multiprocessing pymp-* folders are left behind, so
    # removed with it; a short name: a Unix socket's path in it must stay under 108 bytes, or the loader hangs)
    with tempfile.TemporaryDirectory(prefix="bench_loader_run_") as out, tempfile.TemporaryDirectory(prefix="bl") as tmp:
        env["TMPDIR"] = tmp
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(data), reader, str(out), MODEL, mode, str(workers),
                               str(seconds)], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{reader} {mode} on {data} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "done" in result:
        result["first_step_s"] = result.pop("done") - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--cache", default="/tmp/regionmed_bench_loader")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers for the throughput figure")
    ap.add_argument("--repeats", type=int, default=2, help="first-step runs per (reader, size); the median is shown")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of loading for the throughput figure")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--sizes 200 --repeats 1 --seconds 1, "
                         "the dataset in a temporary folder)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.repeats, args.seconds = [200], 1, 1.0
        with tempfile.TemporaryDirectory(prefix="bench_loader_smoke_") as tmp:
            run(args, Path(tmp))
    else:
        run(args, Path(args.cache))


def run(args, cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    datasets = {}
    for n in sizes:
        t0 = time.perf_counter()
        datasets[n] = make_dataset(cache / f"synthetic-{n}", n)
        print(f"dataset {n}: {datasets[n]} ({time.perf_counter() - t0:.1f} s to make or find)", flush=True)

    print("\nreader     samples  first step (s)  data set-up (s)  peak RSS (MiB)  counts from")
    table: dict[tuple[str, int], dict] = {}
    for reader in ("indexed", "streaming"):
        for n in sizes:
            runs = [child(datasets[n], reader, "first") for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["first_step_s"])
            r = runs[len(runs) // 2]
            table[(reader, n)] = r
            print(f"{reader:<10} {n:>7}  {r['first_step_s']:>14.2f}  {r['setup_s']:>15.2f}  {r['rss_mib']:>14.0f}  "
                  f"{r['counts_from']}", flush=True)
    print("\nratio largest / smallest size (goal <= 1.2):")
    for reader in ("indexed", "streaming"):
        a, b = table[(reader, sizes[0])], table[(reader, sizes[-1])]
        print(f"  {reader:<10} first step {b['first_step_s'] / a['first_step_s']:.2f}x, data set-up "
              f"{b['setup_s'] / a['setup_s']:.2f}x, peak RSS {b['rss_mib'] / a['rss_mib']:.2f}x")

    big = datasets[sizes[-1]]
    step = child(big, "indexed", "step")["samples_per_s"]
    print(f"\none training step consumes {step:.0f} samples/s (tiny model, batch 32, ROIs on, 1 thread)")
    for reader in ("indexed", "streaming"):
        rate = child(big, reader, "loader", args.workers, args.seconds)["samples_per_s"] / max(1, args.workers)
        print(f"  {reader:<10} loader: {rate:.0f} samples/s per worker ({args.workers} worker(s)); "
              f"{math.ceil(step / rate)} worker(s) keep the step fed")


if __name__ == "__main__":
    main()
