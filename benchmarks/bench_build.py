"""Benchmark of the MedRegion builder (not a timed test).

1. Build speed: images/s for building ``$REGIONMED_DATA/slake`` with annotation
   ROIs and rule captions (and negatives), and peak memory (RSS) of the main
   process and of the largest worker at 1x and 4x the input list (the list
   repeated with new ids: memory should stay flat as the input grows).
2. Recall of the ``unsupervised`` proposer at IoU 0.3 / 0.5 against SLAKE's boxes.

Each build runs in a fresh subprocess so that peak RSS is its own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_build.py [--workers 2] [--repeats 1 4] [--recall-limit N]
                                                                 [--limit N] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): the first 16
SLAKE items built at 1x and 2x with one worker, recall of up to 8 proposals on 16 items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(repeat: int, workers: int, out: str, limit: int | None = None) -> None:
    from regionmed.apps import data_root
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import BuildConfig, SourceSpec

    cfg = BuildConfig(out=out, workers=workers, progress=False,
                      sources=[SourceSpec("slake", str(data_root() / "slake"), limit=limit, repeat=repeat)])
    t0 = time.perf_counter()
    s = build(cfg, log=lambda _: None)
    dt = time.perf_counter() - t0
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"repeat": repeat, "inputs": s.inputs, "built": s.built, "regions": s.regions, "seconds": dt,
                      "images_per_s": s.inputs / dt, "main_peak_rss_mb": self_kb / 1024, "worker_peak_rss_mb": child_kb / 1024}))


def _recall_pairs(limit):
    from PIL import Image

    from regionmed.apps import data_root
    from regionmed.apps.curation.sources import get_source

    for item in get_source("slake", data_root() / "slake", limit=limit):
        if item.boxes:
            with Image.open(item.image_path) as im:
                im.load()
                yield im.copy(), [b.box for b in item.boxes]


_K = {"k": 8}


def _recall_one(args):
    from regionmed.apps.curation.proposers import ProposerConfig, make_proposer, proposal_recall

    image, gts = args
    return proposal_recall([(image, gts)], make_proposer(ProposerConfig(name="unsupervised", max_proposals=_K["k"])))


def recall(limit: int | None, workers: int, max_proposals: int = 8) -> dict:
    """Recall of the unsupervised proposer (``max_proposals`` boxes per image) against SLAKE's boxes."""
    import multiprocessing as mp

    _K["k"] = max_proposals
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        parts = list(pool.imap(_recall_one, _recall_pairs(limit), chunksize=4))
    n_gt = sum(p["gt_boxes"] for p in parts)
    out = {"images": sum(p["images"] for p in parts), "gt_boxes": n_gt,
           "proposals_per_image": sum(p["proposals_per_image"] for p in parts) / max(1, len(parts)),
           "seconds": time.perf_counter() - t0}
    for t in (0.3, 0.5):
        out[f"recall@{t}"] = sum(p[f"recall@{t}"] * p["gt_boxes"] for p in parts) / max(1, n_gt)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--recall-limit", type=int, default=None, help="SLAKE items for the recall figure (default all)")
    ap.add_argument("--proposals", type=int, nargs="+", default=[8, 20], help="max proposals per image for the recall figures")
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="SLAKE items per build, before the repeats (default all)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--limit 16 --repeats 1 2 --workers 1 "
                         "--recall-limit 16 --proposals 8)")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.repeats, args.workers, args.recall_limit, args.proposals = 16, [1, 2], 1, 16, [8]
    if args._child:
        _child(args._child, args.workers, args._out, args.limit)
        return 0
    print(f"CPU cores: {os.cpu_count()}, workers: {args.workers}")
    for r in args.repeats:
        with tempfile.TemporaryDirectory() as tmp:
            limit = ["--limit", str(args.limit)] if args.limit else []
            res = subprocess.run([sys.executable, __file__, "--_child", str(r), "--workers", str(args.workers),
                                  "--_out", str(Path(tmp) / "ds"), *limit], capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"slake x{row['repeat']}: {row['inputs']} images ({row['regions']} regions) in {row['seconds']:.1f} s = "
              f"{row['images_per_s']:.1f} images/s; peak RSS main {row['main_peak_rss_mb']:.0f} MB, "
              f"largest worker {row['worker_peak_rss_mb']:.0f} MB")
    if not args.skip_recall:
        for k in args.proposals:
            rec = recall(args.recall_limit, args.workers, k)
            print(f"unsupervised proposer (max {k}) vs SLAKE boxes: {rec['images']} images, {rec['gt_boxes']} boxes, "
                  f"{rec['proposals_per_image']:.1f} proposals/image: recall@0.3 = {rec['recall@0.3']:.3f}, "
                  f"recall@0.5 = {rec['recall@0.5']:.3f} ({rec['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
