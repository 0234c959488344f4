"""All training losses, each a named term; the total is their weighted sum.

Terms (see docs METHOD.md, "Losses"):

* ``global``        symmetric InfoNCE, fused image embedding <-> report;
* ``summary``       symmetric InfoNCE, global image embedding <-> summary;
* ``region``        symmetric InfoNCE, every valid ROI of the batch <-> its caption;
* ``hard_negative`` image->text only: each ROI's own negative captions (and each
  image's own negative reports) are extra logit columns, so the true text must
  beat its near-miss variants as well as the rest of the batch.

Identical texts in a batch are positives, not negatives: texts carry ids
(:func:`text_ids`, a stable hash), and every column whose text id equals the
row's own text id shares the target probability (multi-positive InfoNCE).

Data parallel: call :func:`gather_loss_inputs` on the local inputs, then
:func:`compute_losses` on the result on every rank; see
:mod:`regionmed.distributed` for why summed gradients then equal single-process
training on the union batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from torch import Tensor

from regionmed.distributed import gather_with_grad, get_world_size, is_dist, scale_grad

__all__ = [
    "LOSS_NAMES",
    "LossInputs",
    "multi_positive_infonce",
    "compute_losses",
    "gather_loss_inputs",
    "text_ids",
]

LOSS_NAMES = ("global", "summary", "region", "hard_negative")

_ID_MASK = (1 << 63) - 1


@dataclass
class LossInputs:
    """Embeddings of one batch (all L2-normalised) and the ids of their texts."""

    logit_scale: Tensor  # scalar, already exp()'d and clamped
    image_fused: Tensor  # (B, D)
    image_global: Tensor  # (B, D)
    report: Tensor  # (B, D)
    report_ids: Tensor  # (B,) int64; equal ids = identical texts
    summary: Tensor | None = None  # (B, D)
    summary_ids: Tensor | None = None  # (B,)
    roi: Tensor | None = None  # (R, D): all valid ROIs of the batch, flattened
    caption: Tensor | None = None  # (R, D): their region captions
    caption_ids: Tensor | None = None  # (R,)
    roi_negatives: Tensor | None = None  # (R, N, D): each ROI's own negative captions
    roi_negatives_mask: Tensor | None = None  # (R, N) bool, True = a real negative
    image_negatives: Tensor | None = None  # (B, M, D): each image's own negative reports
    image_negatives_mask: Tensor | None = None  # (B, M) bool


def text_ids(texts: list[str]) -> Tensor:
    """A stable, non-negative 63-bit id per text: equal strings give equal ids.

    BLAKE2b (8-byte digest) of the UTF-8 text, top bit cleared; unlike ``hash()``
    it is the same in every process and every run.
    """
    ids = [
        int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "big") & _ID_MASK
        for t in texts
    ]
    return torch.tensor(ids, dtype=torch.long)


def _positive_mask(n: int, b_ids: Tensor | None, a_ids: Tensor | None, device) -> Tensor:
    """(n, n) bool: pair (i, j) is positive if same text (or same a-item)."""
    pos = torch.eye(n, dtype=torch.bool, device=device)
    if b_ids is not None:
        b_ids = b_ids.to(device)
        pos = pos | (b_ids[:, None] == b_ids[None, :])
    if a_ids is not None:
        a_ids = a_ids.to(device)
        pos = pos | (a_ids[:, None] == a_ids[None, :])
    return pos


def _soft_target_ce(logits: Tensor, pos: Tensor) -> Tensor:
    """Mean over rows of CE against the uniform distribution over ``pos`` columns.

    ``logits`` may have more columns than ``pos`` (extra negatives, -inf allowed);
    they count in the normaliser only.
    """
    log_prob = logits.log_softmax(dim=1)[:, : pos.shape[1]]
    target = pos.to(log_prob.dtype)
    target = target / target.sum(dim=1, keepdim=True)
    # where() rather than a product: 0 * -inf would give NaN for masked columns.
    per_pair = torch.where(pos, target * log_prob, torch.zeros_like(log_prob))
    return -per_pair.sum(dim=1).mean()


def multi_positive_infonce(
    a: Tensor,
    b: Tensor,
    a_ids: Tensor | None,
    b_ids: Tensor | None,
    scale: Tensor | float,
    extra_negatives: Tensor | None = None,
    extra_mask: Tensor | None = None,
    symmetric: bool = True,
) -> Tensor:
    """InfoNCE between rows of ``a`` (n, D) and ``b`` (n, D), pair i <-> i.

    Positives: column j is a positive of row i when ``b_ids[i] == b_ids[j]``
    (identical texts; the ids describe the text side ``b``), or, if ``a_ids`` is
    given, when ``a_ids[i] == a_ids[j]``; i <-> i always is. Each direction's
    target is uniform over the positives; the b->a direction uses the same
    (symmetric) positive set. ``b_ids=None`` means all texts are distinct.

    ``extra_negatives`` (n, K, D), a->b direction only: row i gets K extra logit
    columns ``scale * <a_i, extra_negatives[i, k]>``, set to -inf where
    ``extra_mask`` (n, K) is False. With ``symmetric`` the result is the mean of
    the two directions (each a mean over rows); otherwise the a->b direction.

    With distinct ids and no extras this is the standard CLIP loss
    ``(CE(logits, arange) + CE(logits.T, arange)) / 2``.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (n, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    for name, ids in (("a_ids", a_ids), ("b_ids", b_ids)):
        if ids is not None and tuple(ids.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(ids.shape)}")
    logits = scale * (a @ b.t())
    pos = _positive_mask(n, b_ids, a_ids, a.device)

    logits_ab = logits
    if extra_negatives is not None:
        neg_shape = tuple(extra_negatives.shape)
        if len(neg_shape) != 3 or neg_shape[0] != n or neg_shape[2] != a.shape[1]:
            raise ValueError(f"extra_negatives must be ({n}, K, {a.shape[1]}), got {neg_shape}")
        extra = scale * torch.einsum("id,ikd->ik", a, extra_negatives)
        if extra_mask is not None:
            if tuple(extra_mask.shape) != tuple(extra.shape):
                raise ValueError(
                    f"extra_mask must have shape {tuple(extra.shape)}, "
                    f"got {tuple(extra_mask.shape)}"
                )
            real = extra_mask.to(device=extra.device, dtype=torch.bool)
            extra = extra.masked_fill(~real, -math.inf)
        logits_ab = torch.cat([logits, extra], dim=1)
    elif extra_mask is not None:
        raise ValueError("extra_mask given without extra_negatives")

    loss_ab = _soft_target_ce(logits_ab, pos)
    if not symmetric:
        return loss_ab
    loss_ba = _soft_target_ce(logits.t(), pos.t())
    return 0.5 * (loss_ab + loss_ba)


def _check_weights(weights: Mapping[str, float]) -> None:
    for name, w in weights.items():
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss name {name!r}; known: {', '.join(LOSS_NAMES)}")
        if not math.isfinite(float(w)) or float(w) < 0:
            raise ValueError(f"loss weight {name!r} must be a finite number >= 0, got {w!r}")


def _nonempty(*tensors: Tensor | None) -> bool:
    """All given and the first has at least one row."""
    return all(t is not None for t in tensors) and tensors[0].shape[0] > 0  # type: ignore


def compute_losses(inputs: LossInputs, weights: Mapping[str, float]) -> dict[str, Tensor]:
    """Named loss terms and their weighted sum.

    Returns one entry per *active* term (weight > 0 and its inputs present and
    non-empty), keyed by its name in :data:`LOSS_NAMES`, plus ``"total"`` =
    sum of weight * term. A name missing from ``weights`` has weight 0. When no
    term is active, ``"total"`` is a zero that still backpropagates (to the
    logit scale), so every rank can run the same backward/reduce steps.
    Raises ``ValueError`` for an unknown name or a negative weight.
    """
    _check_weights(weights)
    w = {name: float(weights.get(name, 0.0)) for name in LOSS_NAMES}
    s = inputs.logit_scale
    terms: dict[str, Tensor] = {}

    if w["global"] > 0 and _nonempty(inputs.image_fused, inputs.report):
        terms["global"] = multi_positive_infonce(
            inputs.image_fused, inputs.report, None, inputs.report_ids, s
        )

    if w["summary"] > 0 and _nonempty(inputs.image_global, inputs.summary):
        terms["summary"] = multi_positive_infonce(
            inputs.image_global, inputs.summary, None, inputs.summary_ids, s
        )

    if w["region"] > 0 and _nonempty(inputs.roi, inputs.caption):
        terms["region"] = multi_positive_infonce(
            inputs.roi, inputs.caption, None, inputs.caption_ids, s
        )

    if w["hard_negative"] > 0:
        parts = []
        if _nonempty(inputs.roi, inputs.caption, inputs.roi_negatives):
            parts.append(
                multi_positive_infonce(
                    inputs.roi,
                    inputs.caption,
                    None,
                    inputs.caption_ids,
                    s,
                    inputs.roi_negatives,
                    inputs.roi_negatives_mask,
                    symmetric=False,
                )
            )
        if _nonempty(inputs.image_fused, inputs.report, inputs.image_negatives):
            parts.append(
                multi_positive_infonce(
                    inputs.image_fused,
                    inputs.report,
                    None,
                    inputs.report_ids,
                    s,
                    inputs.image_negatives,
                    inputs.image_negatives_mask,
                    symmetric=False,
                )
            )
        if parts:
            terms["hard_negative"] = torch.stack(parts).mean()

    # A zero tied to the graph, so backward() works even when no term is active.
    total = s.sum() * 0.0
    for name, value in terms.items():
        total = total + w[name] * value
    terms["total"] = total
    return terms


def gather_loss_inputs(inputs: LossInputs) -> LossInputs:
    """Gather every per-row field over all ranks (see ``gather_with_grad``).

    Row counts may differ per rank (ROIs, images); every rank must have the same
    fields set to ``None`` and the same trailing shapes (pad negatives to a common
    N / M and mark padding in the masks). The logit scale is not gathered; its
    gradient is divided by the world size because every rank computes the full
    loss with it and the gradients are later summed. Single process: returned as is.
    """
    if not is_dist() or get_world_size() == 1:
        return inputs
    world = get_world_size()
    _check_same_fields(inputs)
    updates: dict[str, Tensor] = {}
    for f in fields(inputs):
        value = getattr(inputs, f.name)
        if value is None:
            continue
        if f.name == "logit_scale":
            updates[f.name] = scale_grad(value, 1.0 / world)
        else:
            updates[f.name] = gather_with_grad(value)
    return replace(inputs, **updates)


def _check_same_fields(inputs: LossInputs) -> None:
    """Raise on every rank (instead of hanging) if ranks set different fields."""
    names = [f.name for f in fields(inputs)]
    present = torch.tensor(
        [getattr(inputs, n) is not None for n in names],
        dtype=torch.int32,
        device=inputs.image_fused.device,
    )
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    differ = [n for n, count in zip(names, present.tolist()) if 0 < count < world]
    if differ:
        raise RuntimeError(
            "gather_loss_inputs: fields set on some ranks and None on others: " + ", ".join(differ)
        )
