"""Non-finite checks shared by the model, the optimiser step, evaluation and inference.

* :func:`nonfinite_tensors` — which named tensors (weights, buffers) hold NaN or inf;
* :func:`require_finite` — the model's embeddings unchanged, or :class:`NonFiniteEmbeddingError`.

Kept below :mod:`regionmed.model` and :mod:`regionmed.optim` so that both use one check
without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from regionmed.errors import RegionmedError

__all__ = ["NonFiniteEmbeddingError", "nonfinite_tensors", "require_finite"]


class NonFiniteEmbeddingError(RegionmedError, ValueError):
    """The model computed NaN/inf embeddings (damaged or diverged weights): no metric is
    computed from them."""


def nonfinite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors of ``named`` (``(name, tensor)`` pairs, e.g.
    ``model.named_parameters()``) that hold NaN or inf; one synchronisation on GPU."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    with torch.no_grad():
        ok = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu().tolist()
    return [n for (n, _), good in zip(named, ok) if not good]


def require_finite(emb, what: str = "image"):
    """``emb`` (an ``ImageEmbeddings`` or a tensor) unchanged; raises
    :class:`NonFiniteEmbeddingError` when any of its tensors holds NaN or inf."""
    tensors = [emb] if isinstance(emb, torch.Tensor) else [t for t in vars(emb).values() if isinstance(t, torch.Tensor)]
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
        raise NonFiniteEmbeddingError(f"the model computed non-finite {what} embeddings (NaN/inf): its weights are "
                                      "damaged or diverged; no metric is computed from them")
    return emb
