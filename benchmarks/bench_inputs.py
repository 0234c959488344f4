"""Benchmark: what knowing about changed inputs and stale shards costs (not a timed test).

1. Builds the public sources of ``$REGIONMED_DATA`` (slake, vqa_rad, covid_cxr), then
   re-runs the same build: the re-run reads every row again, stats every image and
   hashes every table/JSON input to decide "up to date" (``build-inputs.jsonl``). Prints
   both times and their ratio, and the time to stat and to hash every input file.
2. Opens each split of the result: the shard check at open (a stat and two 64 KiB reads
   per shard, :func:`regionmed.data.shards.verify_shards`) against loading the index alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inputs.py [--workers 2] [--shard-count 50] [--limit N] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): the first 12
items of each source, shards of 4, one worker, 2 repetitions of each open.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-count", type=int, default=50, help="samples per shard (small: many shards to check)")
    ap.add_argument("--limit", type=int, default=None, help="items per source (default all)")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each timed open (default 20)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--limit 12 --shard-count 4 "
                         "--workers 1 --reps 2)")
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.shard_count, args.workers, args.reps = 12, 4, 1, 2

    from regionmed.apps import data_root
    from regionmed.apps.curation.builder import build
    from regionmed.apps.curation.config import BuildConfig, SourceSpec
    from regionmed.apps.curation.inputs import file_sha256, read_ledger
    from regionmed.data.shards import MedRegionDataset, SplitIndex, read_manifest, verify_shards

    root = data_root()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BuildConfig(out=str(Path(tmp) / "ds"), workers=args.workers, progress=False,
                          sources=[SourceSpec(n, str(root / n), limit=args.limit) for n in ("slake", "vqa_rad", "covid_cxr")])
        cfg.shards.max_count = args.shard_count
        t0 = time.perf_counter()
        summary = build(cfg, log=lambda _: None)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = build(cfg, log=lambda _: None)
        rerun = time.perf_counter() - t0
        assert again.up_to_date
        ledger = read_ledger(cfg.out)
        print(f"build of {summary.inputs} inputs: {built:.1f} s; re-run, inputs checked, up to date: {rerun:.2f} s "
              f"({rerun / built:.1%} of the build); {len(ledger)} input files in the ledger")
        files = [p for p in root.rglob("*") if p.is_file()]
        t0 = time.perf_counter()
        for p in files:
            p.stat()
        stat_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        size = sum(p.stat().st_size for p in files)
        for p in files:
            file_sha256(p)
        hash_s = time.perf_counter() - t0
        print(f"{len(files)} files under {root} ({size / 1e6:.0f} MB): stat all {stat_s * 1e3:.0f} ms, "
              f"SHA-256 all {hash_s:.2f} s ({size / 1e6 / hash_s:.0f} MB/s)")
        out = Path(cfg.out)
        for split, info in read_manifest(out)["splits"].items():
            reps = args.reps
            t0 = time.perf_counter()
            for _ in range(reps):
                verify_shards(out, split, info["shards"])
            check = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for _ in range(reps):
                SplitIndex.load(out / info["index"]["name"], info["index"]["sha256"])
            index = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for _ in range(reps):
                MedRegionDataset(out, split)
            opened = (time.perf_counter() - t0) / reps
            n = len(info["shards"])
            print(f"split {split}: {n} shards, open {opened * 1e3:.1f} ms = shard check {check * 1e3:.1f} ms "
                  f"({check / n * 1e3:.2f} ms per shard) + index {index * 1e3:.1f} ms + manifest")


if __name__ == "__main__":
    main()
