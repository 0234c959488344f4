"""``regionmed serve``: time to first heatmap for a 2048 x 2048 radiograph on this CPU.

    python benchmarks/bench_serve.py [--model runs/demo/region/model] [--size 2048] [--repeats 3] [--threads 2] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): a tiny random
model (unless ``--model``), a 256 x 256 image, one repeat, one thread.

The image: a real chest radiograph from ``$REGIONMED_DATA/covid_cxr`` (default
../shared/data) scaled up to SIZE x SIZE (bicubic, grey scale), stored once as PNG and
once as a 16-bit DICOM. The model: ``--model``, default ``runs/demo/region/model`` when
``make demo`` has made it, else a tiny random model (said in the output).

Two measurements, each the median over ``--repeats`` runs after one cold run (also printed):

* **in-process**, the demo's own functions (:class:`regionmed.apps.serve.DemoBackend`):
  decode the upload → ground one phrase (:meth:`Predictor.ground`) → draw its overlay;
* **through the server** (``regionmed serve`` launched in-process on a free loopback
  port, driven over HTTP by ``gradio_client``, as the page does): upload + ``/load_image``
  (decode, PNG of the preview), then ``/ground`` with one phrase, the overlay fetched.
  "Time to first heatmap" is the sum: from choosing the file to seeing its heatmap.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers: tiny model, DICOM writer, free port


def _radiograph(size: int) -> Image.Image:
    data = Path(os.environ.get("REGIONMED_DATA", ROOT.parent / "shared" / "data")) / "covid_cxr" / "images"
    files = sorted(data.glob("*"))
    if not files:
        sys.exit(f"bench_serve: no radiographs in {data} (set REGIONMED_DATA)")
    return Image.open(files[0]).convert("L").resize((size, size), Image.Resampling.BICUBIC)


def _dicom(image: Image.Image) -> bytes:
    """The image as a 16-bit (12 bits stored) DICOM without identifiers (the tests' writer)."""
    from infer_helpers import make_dicom

    return make_dicom(np.asarray(image, dtype=np.uint16) * 16, window=None, identifiers=False)


def _tiny_model(folder: Path) -> Path:
    from conftest import tiny_model_config
    from regionmed.model.clip import create_model

    torch.manual_seed(0)
    return create_model(tiny_model_config()).save_pretrained(folder)


def _median_after_cold(fn, repeats: int) -> tuple[float, float]:
    cold = fn()
    return cold, statistics.median(fn() for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default runs/demo/region/model, else a tiny random model)")
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--phrase", default="right lower zone opacity")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (a tiny random model, --size 256 "
                         "--repeats 1 --threads 1)")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.repeats, args.threads = 256, 1, 1
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp / "gradio"))  # the server's and the client's files
    (tmp / "tmp").mkdir()
    tempfile.tempdir = str(tmp / "tmp")  # gradio_client's upload folders (tempfile.gettempdir()): removed with tmp
    try:
        return measure(args, tmp)
    finally:
        tempfile.tempdir = None
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: Path) -> int:
    from gradio_client import Client, handle_file

    from infer_helpers import free_port
    from regionmed.apps.serve import DemoBackend, GroundState, ServeLimits, build_app, launch_app
    from regionmed.inference import Predictor

    demo = ROOT / "runs" / "demo" / "region" / "model"
    if args.model:
        model, what = Path(args.model), args.model
    elif (demo / "config.json").is_file() and not args.smoke:
        model, what = demo, "runs/demo/region/model (make demo)"
    else:
        model = _tiny_model(tmp / "tiny")
        what = "a tiny random model" + (" (--smoke)" if args.smoke else " (no runs/demo/region/model: run make demo)")
    predictor = Predictor.from_pretrained(model)
    cfg = predictor.model.cfg
    print(f"model: {what}: {cfg.image.name} at {cfg.image.image_size} px, region path: {predictor.has_region_path}; "
          f"torch threads {args.threads}; {os.cpu_count()} CPUs")

    image = _radiograph(args.size)
    png = tmp / "cxr.png"
    image.save(png)
    dcm = tmp / "cxr.dcm"
    dcm.write_bytes(_dicom(image))
    print(f"image: {args.size} x {args.size} real radiograph scaled up; PNG {png.stat().st_size / 1e6:.1f} MB, "
          f"DICOM {dcm.stat().st_size / 1e6:.1f} MB")

    limits = ServeLimits()
    backend = DemoBackend(predictor, limits=limits)
    rows = []
    for name, path in (("PNG", png), ("DICOM", dcm)):
        raw = path.read_bytes()
        parts: dict[str, list[float]] = {"decode": [], "ground": [], "overlay": []}

        def once() -> float:
            t0 = time.perf_counter()
            img, msg = backend.load_bytes(raw)
            t1 = time.perf_counter()
            assert img is not None, msg
            g = predictor.ground(img, [args.phrase])
            t2 = time.perf_counter()
            backend.render(img, GroundState.from_groundings(g, img.size, limits.display_max_side), 0.5, 0.5)
            t3 = time.perf_counter()
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(v)
            return t3 - t0

        cold, warm = _median_after_cold(once, args.repeats)
        split = ", ".join(f"{k} {statistics.median(v[1:]):.2f} s" for k, v in parts.items())
        rows.append((f"in-process, {name}", cold, warm, split))

    app = build_app(predictor, limits=limits)
    url = launch_app(app, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    try:
        client = Client(url, verbose=False)
        for name, path in (("PNG", png), ("DICOM", dcm)):
            parts = {"upload + decode": [], "ground + overlay": []}

            def once() -> float:
                t0 = time.perf_counter()
                shown, msg = client.predict(handle_file(str(path)), api_name="/load_image")
                t1 = time.perf_counter()
                assert shown, msg
                gallery, _, msg = client.predict(handle_file(shown), args.phrase, 0.5, 0.5, api_name="/ground")
                assert gallery, msg
                Image.open(gallery[0]["image"]).load()
                t2 = time.perf_counter()
                parts["upload + decode"].append(t1 - t0)
                parts["ground + overlay"].append(t2 - t1)
                return t2 - t0

            cold, warm = _median_after_cold(once, args.repeats)
            split = ", ".join(f"{k} {statistics.median(v[1:]):.2f} s" for k, v in parts.items())
            rows.append((f"HTTP API, {name}", cold, warm, split))
    finally:
        app.close()

    print(f"\ntime to first heatmap, {args.size} x {args.size}, one phrase (median of {args.repeats} after a cold run):")
    print(f"{'path':<22} {'cold':>7} {'median':>8}  parts (median)")
    for name, cold, warm, split in rows:
        print(f"{name:<22} {cold:6.2f}s {warm:7.2f}s  {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
