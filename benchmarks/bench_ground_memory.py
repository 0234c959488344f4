"""Peak memory of grounding against the image's pixel count: ``regionmed ground`` and the web demo's ground.

    python benchmarks/bench_ground_memory.py [--sides 1000,2000,4000,8000] [--phrases 2] [--path cli|serve] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): one side of 256
besides the floor, the model at 64 px.

For each side S an S x S grayscale PNG (a smooth gradient with a few discs: a small file,
as a scanned film or a mostly empty export is) is grounded with ``--phrases`` phrases by a
small random model (vit_tiny at 224 px, MiniLM text tower, crop ROI path: the windows
read-out). Each size runs in a fresh process, which reports its peak resident memory
(``ru_maxrss``) and the wall time of the grounding; a run on a 64 x 64 image gives the
floor (model, libraries). Printed per size: pixels, peak MB, peak above the floor, MB above
the floor per megapixel, seconds.

``--path cli`` runs ``regionmed ground`` (overlay PNGs written), ``--path serve`` the web
demo's ground function (:meth:`regionmed.apps.serve.DemoBackend.ground`, overlays in memory).

Bounded memory means: peak above the floor grows with the decoded image only (one 8-bit
copy of it, plus a constant), not with heatmaps or overlays at the image's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from regionmed.model.clip import load
path, model_dir, phrases, mode, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
words = ["nodule", "pleural effusion", "cardiomegaly", "left lung", "right lung", "opacity"][:phrases]
load(model_dir)  # libraries and weights in memory before the floor is read
start = time.perf_counter()
if mode == "cli":
    from regionmed.apps.cli import main
    argv = ["ground", model_dir, path, "--out", out, "--no-progress"]
    for w in words:
        argv += ["--phrase", w]
    rc = main(argv)
    assert rc == 0, rc
else:
    from regionmed.apps.serve import DemoBackend
    from regionmed.inference import Predictor
    backend = DemoBackend(Predictor.from_pretrained(model_dir))
    with open(path, "rb") as fh:
        image, message = backend.load_bytes(fh.read())
    overlays, rows, state, message = backend.ground(image, "\n".join(words), 0.5, 0.5)
    assert len(rows) == phrases, message
seconds = time.perf_counter() - start
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}))
"""


def make_png(path: Path, side: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    ramp = np.linspace(40, 200, side, dtype=np.float32)
    img = Image.fromarray(np.round(np.add.outer(ramp, ramp) / 2).astype(np.uint8), "L")
    draw = ImageDraw.Draw(img)
    for i in range(3):
        c, r = side * (0.3 + 0.2 * i), side * 0.05
        draw.ellipse([c - r, side * 0.4 - r, c + r, side * 0.4 + r], fill=230)
    img.save(path, optimize=True)


def make_model(folder: Path, image_size: int = 224) -> None:
    import torch

    from regionmed.config import from_dict
    from regionmed.model.clip import create_model
    from regionmed.model.config import ModelConfig

    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"embed_dim": 64, "image": {"name": "vit_tiny_patch16_224", "image_size": image_size,
                                                             "kwargs": {"depth": 2}},
                                  "text": {"name": "minilm", "pretrained": False, "context_length": 32,
                                           "config_overrides": {"num_hidden_layers": 2}},
                                  "roi": {"mode": "crop", "max_rois": 3, "roi_size": 64, "num_heads": 4}})
    create_model(cfg).save_pretrained(folder)


def run(png: Path, model: Path, phrases: int, mode: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(png), str(model), str(phrases), mode, str(out)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="1000,2000,4000,8000")
    ap.add_argument("--phrases", type=int, default=2)
    ap.add_argument("--path", choices=("cli", "serve"), default="cli")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--sides 256, the model at 64 px)")
    args = ap.parse_args()
    if args.smoke:
        args.sides = "256"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", 64 if args.smoke else 224)
        make_png(tmp / "floor.png", 64)
        floor = run(tmp / "floor.png", tmp / "model", args.phrases, args.path, tmp / "out0")
        print(f"path {args.path}, {args.phrases} phrases; floor (64 x 64 image): {floor['peak_mb']:.0f} MB, "
              f"{floor['seconds']:.2f} s")
        print(f"{'side':>6} {'pixels':>12} {'file KB':>8} {'peak MB':>8} {'above floor':>12} {'MB/Mpx':>7} {'s':>6}")
        for n, side in enumerate(int(v) for v in args.sides.split(",")):
            png = tmp / f"s{side}.png"
            make_png(png, side)
            r = run(png, tmp / "model", args.phrases, args.path, tmp / f"out{n + 1}")
            above = r["peak_mb"] - floor["peak_mb"]
            mpx = side * side / 1e6
            print(f"{side:>6} {side * side:>12,} {png.stat().st_size / 1024:>8.0f} {r['peak_mb']:>8.0f} {above:>12.0f} "
                  f"{above / mpx:>7.1f} {r['seconds']:>6.2f}")


if __name__ == "__main__":
    time.sleep(0)
    main()
