"""Approximate region search at scale: the ivf index against exact search (issue 20).

    python benchmarks/bench_index.py [--model DIR] [--vectors 1000000] [--images 400] [--smoke]

**Vectors.** Real region embeddings: ``--images`` radiographs of ``$REGIONMED_DATA``
(slake, covid_cxr, tbx11k, those present) embedded by ``--model`` (a saved model folder;
default a tiny random model, said in the output), each image with nine windows (a 3x3 grid)
and its whole as regions. They are replicated to ``--vectors`` with small perturbations:
each copy is a base vector plus Gaussian noise of standard deviation ``--noise`` per
dimension, L2-normalised again (about 0.9 cosine to its base at D = 256). Uniform random
vectors have no neighbourhood structure and would say nothing about real use.

**Queries**, none of them in the index: ``--queries`` fresh perturbations of base vectors,
and the text embeddings of a few anatomy and finding phrases (what ``regionmed search``
sends).

**Measured** (one torch/FAISS thread unless ``--threads``): the ivf index's build time (k-means
+ adding + the recall/nprobe tuning that :class:`regionmed.index.EmbeddingIndex` does at
save), the recall@10 and nprobe it recorded, then for exact and ivf search the latency of one
query (median over the queries) and the recall@10 of ivf against exact on the held-out queries.
Goal: recall@10 >= 0.95 at 10^6 vectors with latency at least 10x lower than exact.

``--smoke``: a seconds-long run for CI (20,000 vectors, 8 images, 20 queries): figures meaningless.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

DATA = Path(os.environ.get("REGIONMED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PHRASES = ["left lung", "right lung", "heart", "liver", "pleural effusion", "nodule", "pulmonary tuberculosis",
           "cardiomegaly", "right upper zone opacity", "spleen"]


def images(n: int) -> list[Path]:
    exts = {".png", ".jpg", ".jpeg"}
    found = []
    for name in ("slake", "covid_cxr", "tbx11k"):
        root = DATA / name
        if root.is_dir():
            found.append(sorted(p for p in root.rglob("*") if p.suffix.lower() in exts))
    per = max(1, n // max(1, len(found)))
    out = [p for group in found for p in group[:per]]
    if not out:
        raise SystemExit(f"no images under {DATA} (slake, covid_cxr, tbx11k): set REGIONMED_DATA")
    return out[:n]


def predictor(model: str | None, tmp: Path):
    from regionmed.inference import Predictor

    if model:
        return Predictor.from_pretrained(model, batch_size=16), model
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from infer_helpers import save_tiny_model

    return Predictor.from_pretrained(save_tiny_model(tmp / "tiny"), batch_size=16), "a tiny random model"


def base_vectors(pred, paths: list[Path]) -> np.ndarray:
    from PIL import Image

    boxes = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
        grid = [[w * i / 3, h * j / 3, w * (i + 1) / 3, h * (j + 1) / 3] for i in range(3) for j in range(3)]
        boxes.append(grid + [[0, 0, w, h]])
    res = pred.embed_images([str(p) for p in paths], boxes)
    vecs = np.concatenate([r.float().numpy() for r in res.roi])
    return vecs[np.isfinite(vecs).all(1)]


def perturb(base: np.ndarray, n: int, noise: float, rng) -> np.ndarray:
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = base[rng.integers(0, len(base), m)] + noise * rng.standard_normal((m, base.shape[1])).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(index, queries: np.ndarray, k: int = 10) -> tuple[float, list[list[str]]]:
    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        hits = index.search(q, k, "region")[0]
        times.append(time.perf_counter() - t)
        ids.append([h.id for h in hits])
    return statistics.median(times), ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a saved model folder (default: a tiny random model)")
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.03, help="per-dimension noise of a copy (default 0.03)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="seconds-long run for CI: tiny sizes, figures meaningless")
    args = ap.parse_args(argv)
    if args.smoke:
        args.vectors, args.images, args.queries = 20_000, 8, 20
    import faiss
    import torch

    from regionmed.index import EmbeddingIndex, recall_at_k

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        pred, model_name = predictor(args.model, Path(tmp))
        t = time.perf_counter()
        base = base_vectors(pred, images(args.images))
        print(f"{len(base)} real region vectors (D = {base.shape[1]}) from {args.images} images by {model_name} in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        x = perturb(base, args.vectors, args.noise, rng)
        cos = float(np.mean(np.sum(x[:1000] * x[:1000], 1)))  # 1.0: a sanity check of the normalisation
        queries = np.concatenate([perturb(base, args.queries, args.noise, rng), pred.embed_texts(PHRASES).numpy()])
        rows = [{"id": str(i)} for i in range(len(x))]
        exact = EmbeddingIndex.create("bench", dim=x.shape[1], search="exact")
        exact.add(x, rows, "region")
        t_exact, want = latency(exact, queries)
        print(f"exact: {t_exact * 1000:.1f} ms a query", file=sys.stderr, flush=True)
        ivf = EmbeddingIndex.create("bench", dim=x.shape[1], search="ivf")
        ivf.add(x, rows, "region")
        del exact
        t = time.perf_counter()
        ivf.settle()
        build = time.perf_counter() - t
        rec = ivf.approximate["region"]
        t_ivf, got = latency(ivf, queries)
    recall_img = recall_at_k([np.array(g) for g in got[:args.queries]], [np.array(w) for w in want[:args.queries]])
    recall_txt = recall_at_k([np.array(g) for g in got[args.queries:]], [np.array(w) for w in want[args.queries:]])
    print(f"\nRegion search at {args.vectors:,} vectors (D = {x.shape[1]}; real region embeddings by {model_name}, "
          f"{len(base)} bases x copies with noise {args.noise}; unit norm {cos:.3f}), k = 10, {args.threads} thread(s):")
    print(f"ivf build (k-means, add, nprobe tuning): {build:.0f} s; {rec['nlist']} cells; nprobe {rec['nprobe']} "
          f"(recorded recall@10 {rec['recall_at_10']:.3f} on {rec['queries']} held-out vectors)")
    print("| search | one query (ms) | recall@10, held-out copies | recall@10, text queries | speed-up | goal |")
    print("|---|---|---|---|---|---|")
    print(f"| exact (IndexFlatIP) | {t_exact * 1000:.2f} | 1 | 1 | 1.0 | |")
    met = recall_img >= 0.95 and t_exact / t_ivf >= 10
    print(f"| ivf (IndexIVFFlat) | {t_ivf * 1000:.2f} | {recall_img:.3f} | {recall_txt:.3f} | {t_exact / t_ivf:.1f} | "
          f"recall >= 0.95 and >= 10x ({'met' if met else 'NOT met'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
