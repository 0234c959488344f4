"""Text encoding: fixed chunks of 64 (the old plan) vs bounded-padding chunks (the new one).

    python benchmarks/bench_text.py [--repeats 7] [--slack 0.25] [--threads 1] [--clock wall|cpu] [--smoke]

``--smoke``: a seconds-long run for CI (tiny sizes, figures meaningless): one repeat,
4 records, 10 captions.

Texts like one training batch of the demo (``configs/demo.yaml``: batch 32, the
pretrained MiniLM-L6 text tower, context length 64), built from phantom records
(:func:`regionmed.apps.curation.phantoms.generate_phantom`):

* 32 reports, each a phantom report followed by routine sentences up to a drawn
  length of 40-64 tokens (phantom reports alone are 18-47 tokens; real reports are longer);
* 32 summaries (the phantoms' own, 6-25 tokens);
* 100 distinct region captions of ~10 tokens: the phantoms' captions and near-miss
  negatives (their vocabulary has only ~40 distinct ones), then captions in the same
  style from a wider vocabulary of findings, modifiers and locations.

Two batches: the refine stage (global + summary losses: reports and summaries, 64
texts) and the full method (+ region captions). Both plans encode the same unique
texts sorted by token length:

* *old*: fixed chunks of 64 after sorting (reimplemented here as the baseline), each
  padded to its longest member;
* *new*: ``model.encode_text`` (chunks planned by
  :func:`regionmed.model.clip.plan_text_chunks`: padded <= (1 + slack) x real tokens).

Each is timed under ``torch.no_grad()`` (inference) and with gradients (train mode,
forward + backward of the embeddings' sum through the text tower, as a training step
does). Old and new alternate within each repeat (their order flips every repeat);
the median of ``--repeats`` is reported, after one warm-up of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from regionmed.apps.curation.phantoms import generate_phantom  # noqa: E402
from regionmed.apps.train.config import load_run_config  # noqa: E402
from regionmed.model.clip import RegionMedCLIP, plan_text_chunks  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

ROUTINE = [
    "The cardiomediastinal silhouette is within normal limits.",
    "No pneumothorax is seen.",
    "The costophrenic angles are sharp.",
    "The visualised bones are intact.",
    "There is no free air under the diaphragm.",
    "The trachea is central.",
    "The hila are of normal size and position.",
    "Comparison is made with the prior study; there is no interval change.",
    "Both hemidiaphragms are clearly outlined.",
    "The soft tissues are unremarkable.",
]
MODIFIERS = ["small", "large", "dense", "faint", "ill-defined", "well-circumscribed", "patchy", "rounded"]
FINDINGS = ["nodule", "mass", "opacity", "consolidation", "atelectasis", "calcified granuloma", "cavitating lesion"]
PLACES = [f"{side} {level} zone" for side in ("right", "left") for level in ("upper", "middle", "lower")] + [
    "right perihilar region", "left perihilar region", "right lung apex", "left lung base"]


def batch_texts(tokenizer, batch: int, captions: int, seed: int = 0) -> dict[str, list[str]]:
    """Reports (40-64 tokens), summaries and region captions of ``batch`` phantom records."""
    rng = np.random.default_rng(seed)
    count = lambda t: len(tokenizer.ids([t])[0])  # noqa: E731
    records = [generate_phantom(i, seed, "train")[1] for i in range(batch)]
    reports = []
    for rec in records:
        target, text = int(rng.integers(40, 65)), rec["report"]
        for sentence in rng.permutation(ROUTINE):
            if count(text) >= target:
                break
            if count(f"{text} {sentence}") <= 64:
                text = f"{text} {sentence}"
        reports.append(text)
    summaries = [rec["summary"] for rec in records]
    caps: list[str] = []
    i = 0
    while len(caps) < captions and i < 4 * batch:  # more phantoms until there are enough distinct captions
        rec = records[i] if i < batch else generate_phantom(i, seed, "train")[1]
        for region in rec["regions"]:
            caps += [region["caption"]] + [n["text"] for n in region.get("negatives", [])]
        caps = list(dict.fromkeys(caps))
        i += 1
    while len(caps) < captions:
        caps = list(dict.fromkeys([*caps, f"{rng.choice(MODIFIERS)} {rng.choice(FINDINGS)} in the {rng.choice(PLACES)}"]))
    return {"reports": reports, "summaries": summaries, "captions": caps[:captions]}


def old_encode_text(model: RegionMedCLIP, texts: list[str], step: int = 64) -> torch.Tensor:
    """The previous ``encode_text``: unique texts sorted by length, fixed chunks of ``step``."""
    unique = list(dict.fromkeys(texts))
    tokenizer = model.text_tower.tokenizer
    ids = tokenizer.ids(unique)
    order = sorted(range(len(unique)), key=lambda i: len(ids[i]))
    chunks, placed = [], []
    for start in range(0, len(order), step):
        part = order[start : start + step]
        input_ids, mask = tokenizer.pad([ids[i] for i in part])
        feats = model.text_tower(input_ids, mask)
        chunks.append(F.normalize(model.projections["text"](feats), dim=-1))
        placed += part
    emb = torch.cat(chunks)
    row_of = {u: r for r, u in enumerate(placed)}
    position = {t: row_of[i] for i, t in enumerate(unique)}
    return emb[torch.tensor([position[t] for t in texts])]


def old_plan(lengths: list[int], step: int = 64) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s : s + step] for s in range(0, len(order), step)]


def tokens(plan: list[list[int]], lengths: list[int]) -> tuple[int, int]:
    """(padded, real) tokens of a chunk plan."""
    padded = sum(len(c) * max(lengths[i] for i in c) for c in plan)
    return padded, sum(lengths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--slack", type=float, default=0.25, help="pad_slack of the new plan")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long run for CI: tiny sizes, figures meaningless (--repeats 1 --batch 4 --captions 10)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.batch, args.captions = 1, 4, 10
    torch.set_num_threads(args.threads)
    cfg = load_run_config(CONFIG)
    torch.manual_seed(0)
    model = RegionMedCLIP(cfg.model)  # pretrained MiniLM, as the demo
    tokenizer = model.text_tower.tokenizer
    texts = batch_texts(tokenizer, args.batch, args.captions)
    scenarios = {
        "refine stage (reports + summaries)": texts["reports"] + texts["summaries"],
        "full method (+ region captions)": texts["reports"] + texts["summaries"] + texts["captions"],
    }
    for name, group in texts.items():
        ls = [len(x) for x in tokenizer.ids(group)]
        print(f"{name}: {len(group)} texts, {min(ls)}-{max(ls)} tokens (median {statistics.median(ls):g})", file=sys.stderr)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def run(kind: str, group: list[str], grad: bool) -> float:
        encode = (lambda: old_encode_text(model, group)) if kind == "old" else (lambda: model.encode_text(group, pad_slack=args.slack))
        t = clock()
        if grad:
            model.train()
            encode().sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad():
                encode()
        return clock() - t

    cases = [(s, g) for s in scenarios for g in (False, True)]
    times = {(s, g, k): [] for s, g in cases for k in ("old", "new")}
    for s, g in cases:  # warm-up
        run("old", scenarios[s], g), run("new", scenarios[s], g)
    for r in range(args.repeats):
        for s, g in cases:
            for kind in (("old", "new") if r % 2 == 0 else ("new", "old")):
                times[(s, g, kind)].append(run(kind, scenarios[s], g))
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    model.eval()
    print(f"\nText encoding, demo text tower ({cfg.model.text.name}, pretrained, context {cfg.model.text.context_length}), "
          f"torch threads {torch.get_num_threads()}, {args.clock} clock, median of {args.repeats} interleaved repeats; "
          f"new plan pad_slack {args.slack}, both at most 64 texts per chunk:")
    print("| batch | unique texts | chunks old → new | padded/real old | padded/real new | mode | old (s) | new (s) | old/new | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, group in scenarios.items():
        unique = list(dict.fromkeys(group))
        lengths = [len(x) for x in tokenizer.ids(unique)]
        po, pn = old_plan(lengths), plan_text_chunks(lengths, args.slack, 64)
        (pad_o, real), (pad_n, _) = tokens(po, lengths), tokens(pn, lengths)
        with torch.no_grad():
            diff = (old_encode_text(model, group) - model.encode_text(group, pad_slack=args.slack)).abs().max().item()
        for g in (False, True):
            to, tn = statistics.median(times[(s, g, "old")]), statistics.median(times[(s, g, "new")])
            mode = "fwd+bwd (train)" if g else "no_grad (eval)"
            print(f"| {s} | {len(unique)} | {len(po)} → {len(pn)} | {pad_o / real:.2f} | {pad_n / real:.2f} | {mode} "
                  f"| {to:.3f} | {tn:.3f} | {to / tn:.2f} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
