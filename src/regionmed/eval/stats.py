"""AUC and accuracy with seeded, vectorised bootstrap 95% confidence intervals.

The bootstrap resamples examples with replacement ``n_boot`` times. A resample is
represented by its multinomial counts (how often each example was drawn), so every
statistic is computed for all resamples at once: the AUC through the tie-aware
Mann–Whitney form with weights, accuracy as a weighted mean. Point estimates use
scikit-learn's ``roc_auc_score`` (the weighted form equals it with unit weights).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def bootstrap_counts(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multinomial counts of ``n`` draws with replacement per resample."""
    rng = np.random.default_rng(seed)
    if n == 0:
        return np.zeros((n_boot, 0), dtype=np.int32)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.int32)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of ``scores`` for binary ``labels`` under each row of ``weights`` (B, n).

    AUC = sum over (pos i, neg j) w_i w_j ([s_i > s_j] + 0.5 [s_i == s_j]) / (W_pos W_neg).
    Returns (B,); NaN where a resample has no positive or no negative."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    uniq, group = np.unique(scores, return_inverse=True)  # groups of tied scores, ascending
    g = len(uniq)
    b = weights.shape[0]
    pos = np.zeros((b, g))
    neg = np.zeros((b, g))
    np.add.at(pos.T, group[labels], weights[:, labels].T)
    np.add.at(neg.T, group[~labels], weights[:, ~labels].T)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _ci(values: np.ndarray) -> list[float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def auc_with_ci(scores, labels, counts: np.ndarray) -> dict:
    """{"auc", "ci": [lo, hi], "n_pos", "n_neg"}; auc None when one class is absent.

    ``labels`` 1 / 0, or -1 for unknown (e.g. an uncertain label under U-Ignore): unknown
    examples are left out of the AUC and of every resample (``"n_unknown"`` counts them)."""
    labels = np.asarray(labels).astype(int)
    known = labels >= 0
    if not known.all():
        out = auc_with_ci(np.asarray(scores)[known], labels[known], np.asarray(counts)[:, known])
        return {**out, "n_unknown": int((~known).sum())}
    n_pos = int(labels.sum())
    n_neg = int(len(labels) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return {"auc": None, "ci": [None, None], "n_pos": n_pos, "n_neg": n_neg,
                "note": "AUC undefined: only one class present"}
    auc = float(roc_auc_score(labels, scores))
    return {"auc": auc, "ci": _ci(weighted_auc(scores, labels, counts)), "n_pos": n_pos, "n_neg": n_neg}


def macro_auc_resamples(score_matrix: np.ndarray, label_matrix: np.ndarray, counts: np.ndarray) -> tuple[float | None, np.ndarray, int]:
    """``(macro AUC, its value on each resample (B,), classes)``: the mean AUC over the classes that
    have both positives and negatives; per resample, the mean over the classes defined in it
    (NaN where none is). Labels of -1 (unknown) leave that example out of that class's AUC only.
    Two score matrices on the same ``counts`` give paired resamples (their difference's CI)."""
    score_matrix = np.asarray(score_matrix)
    label_matrix = np.asarray(label_matrix).astype(int)
    counts = np.asarray(counts)
    per, boots = [], []
    for c in range(label_matrix.shape[1]):
        known = label_matrix[:, c] >= 0
        y = label_matrix[known, c]
        if 0 < y.sum() < len(y):
            per.append(float(roc_auc_score(y, score_matrix[known, c])))
            boots.append(weighted_auc(score_matrix[known, c], y, counts[:, known]))
    if not per:
        return None, np.full(counts.shape[0], np.nan), 0
    stacked = np.vstack(boots)  # (C, B)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(stacked)
        mean = np.where(valid.any(0), np.nansum(stacked, 0) / np.maximum(valid.sum(0), 1), np.nan)
    return float(np.mean(per)), mean, len(per)


def macro_auc_with_ci(score_matrix: np.ndarray, label_matrix: np.ndarray, counts: np.ndarray) -> dict:
    """Mean AUC over the classes that have both positives and negatives, with a CI
    from the same resamples for every class (:func:`macro_auc_resamples`)."""
    auc, boot, n = macro_auc_resamples(score_matrix, label_matrix, counts)
    if auc is None:
        return {"auc": None, "ci": [None, None], "classes": 0}
    return {"auc": auc, "ci": _ci(boot), "classes": n}


def mean_with_ci(values, counts: np.ndarray) -> dict:
    """A mean of per-example values (e.g. 0/1 correct) with its bootstrap CI.

    ``counts`` may be the columns of a larger resample (a subset of its examples):
    each resample's mean is then over the subset's draws in it."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    drawn = counts.sum(1)
    keep = drawn > 0
    boot = counts[keep] @ values / drawn[keep]
    return {"value": float(values.mean()), "ci": _ci(boot), "n": int(values.size)}
