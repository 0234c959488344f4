"""Zero-shot classification with prompt ensembles.

* ``softmax`` (single-label): each class's prompts are embedded, averaged and
  re-normalised; an image's class probabilities are the softmax of the scaled
  cosine similarities. Accuracy = arg-max is the label.
* ``similarity`` (multi-label): a class's score is the cosine similarity of the
  image with the class's prompt ensemble, ranked across images (one-vs-rest AUC).
  Cosines have no decision threshold, so accuracy is top-1: the image's
  highest-scored class is one it has (images with no positive class left out).
* ``pairs`` (multi-label): per class, a positive and a negative prompt ensemble;
  P(class) = softmax over the pair. Accuracy = (P > 0.5) == label over all
  (image, class) cells. This needs a model that learned negation ("no {}"): with
  little negated text in pretraining the negative prompt mostly adds noise
  (measured on the ablation models: SLAKE organ macro AUC ~47 with pairs against
  ~70 with similarity), which is why the SLAKE organ task uses ``similarity``.

Metrics: per-class one-vs-rest AUC, macro AUC over classes with both positives
and negatives, accuracy; each with a seeded bootstrap 95% CI (:mod:`.stats`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from regionmed.errors import RegionmedError
from regionmed.eval.prompts import PromptSet
from regionmed.eval.stats import auc_with_ci, bootstrap_counts, macro_auc_with_ci, mean_with_ci

MODES = ("softmax", "pairs", "similarity")


class ZeroShotError(RegionmedError, ValueError):
    """A zero-shot task that cannot run (no classes, no labelled images)."""


@dataclass
class ZeroShotTask:
    name: str
    classes: list[str]
    labels: np.ndarray  # (N,) class index (softmax) or (N, C) 1 / 0 / -1 unknown (pairs, similarity)
    keys: list[str]  # image keys, one per row of labels
    mode: str = "softmax"  # or "pairs" / "similarity" (multi-label)


@torch.no_grad()
def ensemble(model, prompt_lists: list[list[str]], embed: Callable[[list[str]], torch.Tensor] | None = None) -> torch.Tensor:
    """(C, D) float32 on the CPU: each list's prompts embedded, averaged, re-normalised
    (a prompt ensemble, CLIP's practice: Radford et al. 2021, sec. 3.1.4).

    ``embed``: texts → (N, D) L2-normalised embeddings, called once with all prompts
    (default ``model.encode_text``; the :class:`~regionmed.inference.Predictor` passes
    its ``embed_texts``, which checks each text against the model's context length)."""
    flat = [p for ps in prompt_lists for p in ps]
    emb = (embed or model.encode_text)(flat).float().cpu()
    out, start = [], 0
    for ps in prompt_lists:
        out.append(F.normalize(emb[start : start + len(ps)].mean(0), dim=-1))
        start += len(ps)
    return torch.stack(out)


@torch.no_grad()
def ensemble_scores(model, image_emb: torch.Tensor, class_emb: torch.Tensor, mode: str = "softmax") -> np.ndarray:
    """(N, C) scores of (N, D) L2-normalised image embeddings against (C, D) class
    ensembles (:func:`ensemble`): ``"softmax"`` — the softmax over classes of the cosine
    similarities times the model's logit scale (probabilities, rows sum to 1);
    ``"similarity"`` — the cosine similarities themselves, in [-1, 1]."""
    image_emb, class_emb = image_emb.float().cpu(), class_emb.float().cpu()
    if mode == "similarity":
        return (image_emb @ class_emb.T).numpy()
    if mode == "softmax":
        return torch.softmax(float(model.scale().detach().cpu()) * image_emb @ class_emb.T, dim=-1).numpy()
    raise ZeroShotError(f"ensemble score mode {mode!r} is not 'softmax' or 'similarity'")


@torch.no_grad()
def class_scores(model, image_emb: torch.Tensor, classes: list[str], prompts: PromptSet, mode: str = "softmax") -> np.ndarray:
    """(N, C) scores of ``image_emb`` for ``classes`` (see the module docstring for the modes)."""
    if not classes:
        raise ZeroShotError("the class list is empty: give at least two classes (softmax) or one (pairs)")
    image_emb = image_emb.float().cpu()
    if mode == "softmax":
        if len(classes) < 2:
            raise ZeroShotError(f"softmax zero-shot needs at least two classes, got {classes}")
        return ensemble_scores(model, image_emb, ensemble(model, [prompts.class_prompts(c) for c in classes]), mode)
    if mode == "pairs":
        scale = float(model.scale().detach().cpu())
        pos = ensemble(model, [prompts.pair_prompts(c)[0] for c in classes])
        neg = ensemble(model, [prompts.pair_prompts(c)[1] for c in classes])
        logits = torch.stack([image_emb @ pos.T, image_emb @ neg.T], dim=-1) * scale
        return torch.softmax(logits, dim=-1)[..., 0].numpy()
    if mode == "similarity":
        return ensemble_scores(model, image_emb, ensemble(model, [prompts.class_prompts(c) for c in classes]), mode)
    raise ZeroShotError(f"zero-shot mode {mode!r} is not one of {MODES}")


def evaluate_scores(scores: np.ndarray, task: ZeroShotTask, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics for (N, C) scores of a task (labels as in :class:`ZeroShotTask`)."""
    n = scores.shape[0]
    counts = bootstrap_counts(n, n_boot, seed)
    if task.mode == "softmax":
        y = np.asarray(task.labels, dtype=int)
        onehot = np.eye(len(task.classes), dtype=int)[y]
        correct = (scores.argmax(1) == y).astype(float)
    elif task.mode == "similarity":
        onehot = np.asarray(task.labels, dtype=int)
        has = (onehot == 1).any(1)  # top-1: the best-scored class is present (images with a positive class)
        correct = (onehot[np.arange(n), scores.argmax(1)] == 1)[has].astype(float)
        counts_acc = counts[:, has]
    else:
        onehot = np.asarray(task.labels, dtype=int)
        # per image: the share of its known classes called right (images are resampled, their cells move together)
        known = onehot >= 0
        right = ((scores > 0.5).astype(int) == onehot) & known
        correct = right.sum(1) / np.maximum(known.sum(1), 1)
    per_class = {c: auc_with_ci(scores[:, i], onehot[:, i], counts) for i, c in enumerate(task.classes)}
    return {
        "task": task.name,
        "mode": task.mode,
        "n_images": n,
        "classes": task.classes,
        "per_class_auc": per_class,
        "macro_auc": macro_auc_with_ci(scores, onehot, counts),
        "accuracy": mean_with_ci(correct, counts_acc if task.mode == "similarity" else counts),
        "accuracy_kind": {"softmax": "arg-max class", "pairs": "P>0.5 per (image, class) cell",
                          "similarity": "top-1 class present"}[task.mode],
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95, "method": "percentile"},
    }


def run_task(model, image_emb: torch.Tensor, task: ZeroShotTask, prompts: PromptSet, n_boot: int = 1000, seed: int = 0,
             roc_png: str | None = None) -> dict:
    if not task.classes:
        raise ZeroShotError(f"zero-shot task {task.name!r}: the class list is empty")
    if image_emb.shape[0] != len(task.keys):
        raise ZeroShotError(f"zero-shot task {task.name!r}: {image_emb.shape[0]} embeddings for {len(task.keys)} images")
    if image_emb.shape[0] == 0:
        raise ZeroShotError(f"zero-shot task {task.name!r}: no labelled images")
    scores = class_scores(model, image_emb, task.classes, prompts, task.mode)
    out = evaluate_scores(scores, task, n_boot, seed)
    out["prompts"] = {"file": prompts.source, "version": prompts.version}
    if roc_png:
        out["roc_png"] = plot_roc(scores, task, roc_png)
    return out


def plot_roc(scores: np.ndarray, task: ZeroShotTask, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    onehot = np.eye(len(task.classes), dtype=int)[np.asarray(task.labels, dtype=int)] if task.mode == "softmax" else np.asarray(task.labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, c in enumerate(task.classes):
        known = onehot[:, i] >= 0  # -1: unknown, left out
        y, s = onehot[known, i], scores[known, i]
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{c} (AUC {roc_auc_score(y, s):.2f})", lw=1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"zero-shot {task.name}")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
