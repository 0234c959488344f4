"""Inference speed: ``regionmed embed``'s code path vs plain model inference, and search at 1M vectors.

    python benchmarks/bench_infer.py [--images 64] [--batch 32] [--model full|demo] [--vectors 1000000]
                                     [--repeats 3] [--skip-embed] [--skip-search] [--threads N] [--nlist 1024]
                                     [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): 4 images in
batches of 2 with the demo model, one repeat, search over 5,000 vectors with nlist 16.

**Embedding throughput.** ``--images`` real chest radiographs (``covid_cxr``, up to
1024 px, JPEG) embedded by a model of the shape ``--model`` names (``full``: the
full-scale recipe's ViT-B/16 at 224 px, D = 512, random weights; ``demo``: resnet18
at 128 px) with the offline MiniLM text tower. Three runs over the same images and
batches, after one warm-up batch, each run ``--repeats`` times in alternating order
(the median is reported):

* *plain forward*: the images decoded and preprocessed beforehand; only
  ``model.encode_image`` on each batch is timed — the floor;
* *plain loop*: what a user writes by hand: ``decode_image`` + ``Preprocessor`` +
  ``model.encode_image`` per batch;
* *command path*: :func:`regionmed.apps.infer.embed_items` — what ``regionmed embed``
  runs (input listing, PHI-safe decoding, problem bookkeeping, batching through
  :meth:`regionmed.inference.Predictor.embed_images`).

Printed: images/s of each and the ratios command / plain forward and command / plain
loop (goal: the command within 10% of plain inference).

**Search at scale.** ``--vectors`` synthetic L2-normalised float32 vectors of D = 512
(standard normal, normalised) in :class:`regionmed.index.EmbeddingIndex` (FAISS
``IndexFlatIP``, one metadata object per vector). Queries are database vectors plus
Gaussian noise (a near-duplicate exists, so recall is meaningful). Printed: the
index's memory (vectors and the metadata sidecar, from the process's resident
memory), the latency of one query (median of 50) and of a batch of 100 queries,
through the wrapper and raw FAISS, with k = 10. For comparison a FAISS
``IndexIVFFlat`` (``--nlist``, default 1024, trained on up to 65,536 of the vectors) at nprobe 8 and 32:
its latency and recall@10 against the exact result.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = Path(os.environ.get("REGIONMED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_model(kind: str):
    from regionmed.model.clip import create_model
    from regionmed.model.registry import model_config

    if kind == "full":  # the full-scale model with MiniLM as its text tower (BiomedBERT needs the hub cache)
        cfg = model_config("vit-b16-biomedbert", {"text": {"name": "minilm", "context_length": 64}})
    else:
        cfg = model_config("resnet18-minilm")
    torch.manual_seed(0)
    return create_model(cfg).eval()


def bench_embed(args) -> None:
    from dataclasses import replace

    from regionmed.apps.infer import collect_items, embed_items
    from regionmed.data.decode import decode_image
    from regionmed.inference import Predictor

    paths = sorted((DATA / "covid_cxr" / "images").iterdir())[: args.images]
    if len(paths) < args.images:
        sys.exit(f"need {args.images} images in {DATA / 'covid_cxr' / 'images'}")
    model = make_model(args.model)
    pre = replace(model.preprocessor, roi_mode="none")
    predictor = Predictor(model, batch_size=args.batch)
    batches = [paths[i: i + args.batch] for i in range(0, len(paths), args.batch)]
    print(f"embedding: {len(paths)} covid_cxr radiographs, batch {args.batch}, model {args.model} "
          f"({model.cfg.image.name} {model.cfg.image.image_size}px, D={model.cfg.embed_dim}), {torch.get_num_threads()} threads")

    def tensors(batch):
        return torch.stack([pre(decode_image(p)[0])["image"] for p in batch])

    prepared = [tensors(b) for b in batches]

    @torch.no_grad()
    def plain_forward():
        return [model.encode_image(x, use_rois=False).global_ for x in prepared]

    @torch.no_grad()
    def plain_loop():
        return [model.encode_image(tensors(b), use_rois=False).global_ for b in batches]

    def command():
        items = collect_items([str(p) for p in paths])
        return [res.global_ for _, res, _ in embed_items(predictor, items, use_boxes=False, progress=False)]

    with torch.no_grad():  # warm-up: one batch of each
        model.encode_image(prepared[0], use_rois=False)
    runs: dict[str, list[float]] = {}
    results = {}
    fns = [("plain forward", plain_forward), ("plain loop", plain_loop), ("command path", command)]
    for r in range(args.repeats):  # alternate the order every repeat (a busy machine drifts)
        for name, fn in (fns if r % 2 == 0 else fns[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            results[name] = torch.cat(fn())
            runs.setdefault(name, []).append(time.perf_counter() - t0)
    times = {name: statistics.median(ts) for name, ts in runs.items()}
    for name, t in times.items():
        print(f"  {name:14s} {t:7.2f} s  {len(paths) / t:7.2f} images/s   (runs: {', '.join(f'{x:.2f}' for x in runs[name])} s)")
    same = torch.allclose(results["command path"], results["plain forward"], atol=1e-5)
    print(f"  command / plain forward time: {times['command path'] / times['plain forward']:.3f}   "
          f"command / plain loop: {times['command path'] / times['plain loop']:.3f}   (same embeddings: {same})")


def bench_search(args) -> None:
    import faiss

    from regionmed.index import EmbeddingIndex

    n, d, k = args.vectors, 512, 10
    rng = np.random.default_rng(0)
    print(f"search: {n:,} synthetic vectors, D={d}, k={k}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    chunk = 100_000

    def chunks():  # the same vectors every time (seeded), 100k at a time
        gen = np.random.default_rng(1)
        for start in range(0, n, chunk):
            x = gen.standard_normal((min(chunk, n - start), d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            yield start, x

    base = rss_mib()
    index = EmbeddingIndex("bench-model", d)
    t0 = time.perf_counter()
    sample = []
    for start, x in chunks():
        m = len(x)
        index.add(x, [{"id": f"img{start + i:07d}", "source": f"/data/img{start + i:07d}.png"} for i in range(m)], "image")
        if start == 0:
            sample = x[:65_536].copy()
        del x
    gc.collect()
    build = time.perf_counter() - t0
    mem = rss_mib() - base
    vec_mib = n * d * 4 / 2**20
    print(f"  EmbeddingIndex (IndexFlatIP): built in {build:.1f} s; memory {mem:,.0f} MiB "
          f"({vec_mib:,.0f} MiB vectors + ~{mem - vec_mib:,.0f} MiB metadata sidecar and overhead)")
    raw = index._indexes["image"]
    picks = rng.choice(n, 100, replace=False)
    queries = np.stack([raw.reconstruct(int(i)) for i in picks])
    queries += rng.standard_normal(queries.shape, dtype=np.float32) * 0.02
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    single = []
    for q in queries[:50]:
        t0 = time.perf_counter()
        index.search(q[None], k, "image")
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    hits = index.search(queries, k, "image")
    batch_t = time.perf_counter() - t0
    found = np.mean([h[0].row == int(p) for h, p in zip(hits, picks)])
    t0 = time.perf_counter()
    _, exact = raw.search(queries, k)
    raw_batch = time.perf_counter() - t0
    print(f"  flat: one query {statistics.median(single) * 1000:.1f} ms (median of 50); 100 queries {batch_t * 1000:.0f} ms "
          f"via EmbeddingIndex, {raw_batch * 1000:.0f} ms raw faiss; the perturbed source ranked first: {found:.0%}")

    nlist = args.nlist
    quant = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    ivf.train(sample)
    for _, x in chunks():
        ivf.add(x)
    ivf_build = time.perf_counter() - t0
    print(f"  IVFFlat nlist={nlist}: trained + built in {ivf_build:.1f} s (memory ~ the same vectors + {nlist} centroids)")
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        single = []
        for q in queries[:50]:
            t0 = time.perf_counter()
            ivf.search(q[None], k)
            single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, approx = ivf.search(queries, k)
        bt = time.perf_counter() - t0
        recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
        top1 = np.mean(approx[:, 0] == picks)
        print(f"  IVF nprobe={nprobe:2d}: one query {statistics.median(single) * 1000:.2f} ms; 100 queries {bt * 1000:.0f} ms; "
              f"recall@10 vs exact {recall:.3f}; perturbed source first {top1:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", choices=("full", "demo"), default="full")
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each embedding variant (median reported)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--nlist", type=int, default=1024, help="IVF lists of the approximate index (default 1024)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (4 images, batch 2, demo model, "
                         "1 repeat, 5000 vectors, nlist 16)")
    args = ap.parse_args()
    if args.smoke:
        args.images, args.batch, args.model, args.repeats, args.vectors, args.nlist = 4, 2, "demo", 1, 5000, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_embed:
        bench_embed(args)
    if not args.skip_search:
        bench_search(args)


if __name__ == "__main__":
    main()
