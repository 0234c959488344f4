"""The location/side test: does a region's true caption beat its own hard negatives?

Each region's negatives differ from its caption by one clinical change (side, zone,
finding, size...). A region counts as correct when its caption scores higher than
every one of its negatives; per-rule accuracy compares with that rule's negatives only.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def hard_negative_accuracy(
    region_emb: torch.Tensor,
    caption_emb: torch.Tensor,
    negative_emb: list[torch.Tensor],
    negative_rules: list[list[str]],
    only_rules: tuple[str, ...] | None = None,
) -> dict[str, float | int]:
    """region_emb, caption_emb (R, D); negative_emb[r] (n_r, D); negative_rules[r] (n_r names).

    Returns ``{"all": acc, "chance": ..., "n": regions scored, "rule:<name>": acc, "n:<name>": count}``.
    "all" = the caption beats every negative (of ``only_rules``, when given; regions
    with none of them are not scored); its chance level is the mean of ``1/(1+n_r)``.
    Per-rule accuracies are pairwise (chance 0.5) over all negatives."""
    if region_emb.shape[0] != len(negative_emb):
        raise ValueError("one list of negatives per region is needed")
    pos = (region_emb * caption_emb).sum(-1)
    wins = defaultdict(int)
    counts = defaultdict(int)
    all_correct = n = 0
    chance = 0.0
    for r, (negs, rules) in enumerate(zip(negative_emb, negative_rules)):
        if negs.shape[0] == 0:
            continue
        scores = negs @ region_emb[r]
        chosen = [i for i, rule in enumerate(rules) if only_rules is None or rule in only_rules]
        if chosen:
            all_correct += int(bool((pos[r] > scores[chosen]).all()))
            chance += 1.0 / (1 + len(chosen))
            n += 1
        for s, rule in zip(scores.tolist(), rules):
            counts[rule] += 1
            wins[rule] += int(pos[r].item() > s)
    out: dict[str, float | int] = {"all": all_correct / max(1, n), "n": n, "chance": chance / max(1, n)}
    for rule in sorted(counts):
        out[f"rule:{rule}"] = wins[rule] / counts[rule]
        out[f"n:{rule}"] = counts[rule]
    return out
