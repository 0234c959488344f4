"""Evaluation speed: embedding throughput and retrieval at scale.

    python benchmarks/bench_eval.py [--images 256] [--rounds 3] [--retrieval-n 100000] [--dim 256] [--chunk 256] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): 8 images in
batches of 4, one round, retrieval on 2,000 x 2,000 in chunks of 256.

1. **Embedding throughput** with the demo recipe's model (resnet18 @128 px, crop ROIs,
   MiniLM; random image weights: speed does not depend on them) on SLAKE images from
   ``$REGIONMED_DATA/slake`` with their given boxes (falls back to synthetic PNGs):

   * *plain inference*: a loop that opens each image, runs the model's
     :class:`~regionmed.data.transforms.Preprocessor` and ``model.encode_image`` on
     batches — what a user would write;
   * *eval*: :func:`regionmed.eval.images.embed_images` (the path every eval task uses),
     same images, same boxes, same batch size.

   Interleaved rounds, median images/s; the goal is eval within 10% of plain.
2. **Retrieval** R@1/5/10 both ways on N x N random L2-normalised embeddings with
   :func:`regionmed.eval.retrieval.retrieval_recall` (row chunks; the full N x N
   float32 matrix would need N²·4 bytes). Reports wall time and peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from regionmed.apps.train.config import load_run_config  # noqa: E402
from regionmed.data.schema import sanitize_box  # noqa: E402
from regionmed.data.transforms import Preprocessor  # noqa: E402
from regionmed.eval.images import ImageRef, embed_images  # noqa: E402
from regionmed.model.clip import RegionMedCLIP  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def image_refs(n: int, tmp: Path) -> list[ImageRef]:
    from regionmed.apps import data_root
    from regionmed.apps.evaluate.suites import SlakeSet

    slake = data_root() / "slake"
    if (slake / "imgs").is_dir():
        keys = sorted(f"slake/{p.name}" for p in (slake / "imgs").iterdir() if (p / "detection.json").is_file())
        refs, _ = SlakeSet(slake).image_refs(keys)
        return (refs * (n // max(1, len(refs)) + 1))[:n]
    rng = np.random.default_rng(0)
    refs = []
    for i in range(n):
        p = tmp / f"{i}.png"
        Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(p)
        refs.append(ImageRef(f"s{i}", str(p), boxes=[[20, 20, 120, 120], [100, 60, 220, 200]]))
    return refs


@torch.no_grad()
def plain(model: RegionMedCLIP, refs: list[ImageRef], batch: int) -> int:
    pre = Preprocessor.from_model(model)
    n = 0
    for start in range(0, len(refs), batch):
        samples = []
        for ref in refs[start : start + batch]:
            with Image.open(ref.path) as im:
                im = im.convert("RGB")
            w, h = im.size
            boxes = [b for b in (sanitize_box(list(b), w, h)[0] for b in ref.boxes) if b is not None][: pre.max_rois]
            samples.append(pre(im, boxes))
        k = max(s["boxes"].shape[0] for s in samples)
        boxes = torch.zeros(len(samples), k, 4)
        mask = torch.zeros(len(samples), k, dtype=torch.bool)
        for i, s in enumerate(samples):
            boxes[i, : s["boxes"].shape[0]] = s["boxes"]
            mask[i, : s["boxes"].shape[0]] = True
        emb = model.encode_image(torch.stack([s["image"] for s in samples]), boxes, mask, torch.cat([s["crops"] for s in samples]))
        n += emb.fused.shape[0]
    return n


def bench_embedding(args) -> dict:
    cfg = load_run_config(CONFIG)
    torch.manual_seed(0)
    model = RegionMedCLIP(cfg.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        refs = image_refs(args.images, Path(tmp))
        plain(model, refs[: args.batch], args.batch)  # warm-up
        embed_images(model, refs[: args.batch], "given", batch_size=args.batch)
        times = {"plain": [], "eval": []}
        for _ in range(args.rounds):
            t = time.perf_counter()
            n = plain(model, refs, args.batch)
            times["plain"].append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            out = embed_images(model, refs, "given", batch_size=args.batch, num_workers=args.workers)
            times["eval"].append(len(out.keys) / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"images": len(refs), "batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "plain_img_per_s": med["plain"], "eval_img_per_s": med["eval"], "eval_vs_plain": med["eval"] / med["plain"],
            "all": times}


def bench_retrieval(args) -> dict:
    from regionmed.eval.retrieval import retrieval_recall

    n, d = args.retrieval_n, args.dim
    g = torch.Generator().manual_seed(0)
    before = rss_mb()
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 3.0 * torch.randn(n, d, generator=g) / d**0.5, dim=-1)  # a noisy copy: recall above chance
    after_data = rss_mb()
    t = time.perf_counter()
    rec = retrieval_recall(img, txt, torch.arange(n), None, ks=(1, 5, 10), chunk=args.chunk)
    wall = time.perf_counter() - t
    peak = rss_mb()
    return {"n": n, "dim": d, "chunk": args.chunk, "wall_s": wall, "recall": rec, "peak_rss_mb": peak,
            "rss_before_mb": before, "rss_after_embeddings_mb": after_data,
            "full_matrix_would_need_mb": n * n * 4 / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="eval image-loading workers (default 0: same as plain)")
    p.add_argument("--retrieval-n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--skip", choices=("embedding", "retrieval"), action="append", default=[])
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long run for CI: tiny sizes, figures meaningless (8 images, batch 4, 1 round, retrieval N 2000)")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch, args.rounds, args.retrieval_n, args.chunk = 8, 4, 1, 2000, 256
    if "retrieval" not in args.skip:  # first: its peak RSS is not inflated by the model
        r = bench_retrieval(args)
        print(f"retrieval {r['n']:,} x {r['n']:,} (dim {r['dim']}, chunk {r['chunk']}): {r['wall_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (process before the embeddings: {r['rss_before_mb']:.0f} MB; embeddings alone: {r['rss_after_embeddings_mb'] - r['rss_before_mb']:.0f} MB; "
              f"a full similarity matrix would need {r['full_matrix_would_need_mb']:,.0f} MB)")
        print("  " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["recall"].items()))
    if "embedding" not in args.skip:
        e = bench_embedding(args)
        print(f"embedding {e['images']} images, batch {e['batch']}, {e['threads']} threads, median of {e['rounds']} rounds: "
              f"plain inference {e['plain_img_per_s']:.1f} img/s, eval {e['eval_img_per_s']:.1f} img/s "
              f"(eval/plain = {e['eval_vs_plain']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
