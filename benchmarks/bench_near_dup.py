"""Calibration of the near-duplicate check of split assignment (not a timed test).

The builder keeps images whose perceptual hashes lie within ``near_dup_threshold``
bits in one split. On radiographs a coarse hash links films of *different* patients
(one view of one body part looks alike at low resolution), which merges patients
and skews splits. This measures, on real chest films of distinct patients
(``$REGIONMED_DATA/covid_cxr``: 509 films, ``metadata.csv`` ``patientid``):

1. **false links**: pairs of films of distinct patients within the threshold, for
   the builder's hash (:func:`regionmed.apps.curation.images.phash`) and for the
   64-bit hash it replaced, over a sweep of thresholds. The collection holds a few
   films published twice under two patient ids; such a pair (64 × 64 thumbnails
   correlating >= 0.95) is the same film, a true duplicate, and is counted apart.
   Also on one film per patient (the first by file name), as the issue measured it.
2. **recall**: each film against a re-encoded (JPEG q70), half-size, contrast x1.2
   and gamma 0.8 copy of itself: the share within the threshold.

    .venv/bin/python benchmarks/bench_near_dup.py [--data DIR] [--threshold N] [--every K] [--limit N] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): the first 60
films by file name (``--limit 60``), recall on every 4th.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from regionmed.apps import data_root
from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD, PHASH_BITS, phash
from regionmed.data.decode import decode_image

OLD = {"name": "64-bit (32x32, 8x8; the old default, threshold 4)", "size": 32, "bits": 8, "threshold": 4}
NEW = {"name": f"{PHASH_BITS}-bit (the builder's phash)", "size": None, "bits": None, "threshold": NEAR_DUP_THRESHOLD}
SAME_FILM_CORR = 0.95


def _hash(img: Image.Image, spec: dict) -> int:
    return phash(img) if spec["size"] is None else phash(img, spec["size"], spec["bits"])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return decode_image(buf.getvalue())[0]


COPIES = {
    "jpeg q70": lambda im: _jpeg(im, 70),
    "half size": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BICUBIC),
    "contrast x1.2": lambda im: ImageEnhance.Contrast(im).enhance(1.2),
    "gamma 0.8": lambda im: im.point(lambda v: round(255 * (v / 255) ** 0.8)),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="folder holding covid_cxr/ (default: $REGIONMED_DATA)")
    ap.add_argument("--threshold", type=int, default=NEAR_DUP_THRESHOLD, help=f"threshold to report for the builder's hash (default {NEAR_DUP_THRESHOLD})")
    ap.add_argument("--every", type=int, default=1, help="recall on every K-th film (default 1: all)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N films by file name (default all)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--limit 60 --every 4)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit, args.every = 60, 4
    root = (Path(args.data) if args.data else data_root()) / "covid_cxr"
    rows: dict[str, dict] = {}
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["filename"], row)
    files = sorted(p.name for p in (root / "images").iterdir() if p.is_file())[: args.limit]
    patient = [(rows.get(f, {}).get("patientid") or "").strip() for f in files]
    images = [decode_image(root / "images" / f)[0].convert("L") for f in files]
    thumbs = np.stack([np.asarray(im.resize((64, 64), Image.BILINEAR), dtype=np.float64).ravel() for im in images])
    thumbs = (thumbs - thumbs.mean(1, keepdims=True)) / (thumbs.std(1, keepdims=True) + 1e-9)
    corr = thumbs @ thumbs.T / thumbs.shape[1]
    distinct = [(i, j) for i, j in itertools.combinations(range(len(files)), 2)
                if patient[i] and patient[j] and patient[i] != patient[j]]
    same_film = {(i, j) for i, j in distinct if corr[i, j] >= SAME_FILM_CORR}
    first = {}
    for i, p in enumerate(patient):
        if p:
            first.setdefault(p, i)
    one_each = set(first.values())
    print(f"covid_cxr: {len(files)} films, {len(first)} patients; {len(distinct)} pairs of films of distinct patients, "
          f"{len(same_film)} of them the same film published under two patient ids (thumbnail correlation >= {SAME_FILM_CORR})")
    print(f"one film per patient: {len(one_each)} films, {len(one_each) * (len(one_each) - 1) // 2} pairs")
    for spec in (OLD, NEW):
        threshold = spec["threshold"] if spec is OLD else args.threshold
        hashes = [_hash(im, spec) for im in images]
        dist = {(i, j): (hashes[i] ^ hashes[j]).bit_count() for i, j in distinct}
        others = [d for k, d in dist.items() if k not in same_film]
        print(f"\n{spec['name']}: distinct-patient distances (other films): min {min(others)}, "
              f"0.01% {np.quantile(others, 1e-4):.0f}, 0.1% {np.quantile(others, 1e-3):.0f}, 1% {np.quantile(others, 1e-2):.0f}; "
              f"same film under two ids: {sorted(dist[k] for k in same_film)}")
        sweep = sorted({0, 2, 4, 8, 16, 24, 32, 40, 48, 56, threshold} if spec is NEW else {0, 2, 4, 6, 8})
        print(f"  {'threshold':>9} {'false links':>11} {'rate':>9} {'same-film links':>15} {'one-per-patient links':>21}")
        for t in sweep:
            false = sum(d <= t for d in others)
            true = sum(dist[k] <= t for k in same_film)
            one = sum(d <= t for (i, j), d in dist.items() if i in one_each and j in one_each)
            mark = "  <- used" if t == threshold else ""
            print(f"  {t:>9} {false:>11} {false / len(others):>9.2e} {true:>9}/{len(same_film):<5} {one:>21}{mark}")
        picked = images[:: max(1, args.every)]
        recall = []
        for name, copy in COPIES.items():
            d = np.array([(_hash(im, spec) ^ _hash(copy(im), spec)).bit_count() for im in picked])
            recall.append(f"{name} {np.mean(d <= threshold):.1%} (max {d.max()})")
        print(f"  recall at {threshold} on {len(picked)} films: " + ", ".join(recall))
    return 0


if __name__ == "__main__":
    sys.exit(main())
