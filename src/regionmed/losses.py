"""All training losses, each a named term; the total is their weighted sum.

Terms (see docs METHOD.md, "Losses"):

* ``global``        symmetric InfoNCE, fused image embedding <-> report;
* ``summary``       symmetric InfoNCE, global image embedding <-> summary;
* ``region``        symmetric InfoNCE, every valid ROI of the batch <-> its caption;
* ``hard_negative`` image->text only: each ROI's own negative captions (and each
  image's own negative reports) are extra logit columns, so the true text must
  beat its near-miss variants as well as the rest of the batch; the term is the
  mean of the ROI part and the image part, of those that have rows and at least
  one negative slot (with no slot a part would be plain InfoNCE, not a hard-negative
  term, so it is left out);
* ``grounding``     dense, per image: each boxed phrase against the cells of its own
  image's projected feature grid, so that the cells inside its box win
  (:func:`grounding_loss`; it trains the grid that the patch map, ``align`` ROIs and
  ``regionmed ground`` read).

Identical texts in a batch are positives, not negatives: texts carry ids
(:func:`text_ids`, a stable hash), and every column whose text id equals the
row's own text id shares the target probability (multi-positive InfoNCE).

Data parallel, *local loss* (as open_clip's ``local_loss=True``): each rank scores
its own rows against the columns gathered from every rank (with gradient) plus
its own hard negatives, and divides by the *global* number of rows. The terms
returned on each rank therefore sum over ranks to the single-process terms on the
union batch, and so do their gradients (see :mod:`regionmed.distributed`). Every
field has a fixed shape (``B`` images, ``K`` ROI slots, ``N`` / ``M`` negative
slots, padding marked in masks), so each field is gathered by one collective.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from regionmed.distributed import gather_tensor, gather_with_grad, get_rank, get_world_size

__all__ = [
    "LOSS_NAMES",
    "LossInputs",
    "multi_positive_infonce",
    "compute_losses",
    "local_infonce",
    "grounding_loss",
    "GROUNDING_MODES",
    "text_ids",
]

LOSS_NAMES = ("global", "summary", "region", "hard_negative", "grounding")
GROUNDING_MODES = ("softmax", "binary")

_ID_MASK = (1 << 63) - 1


@dataclass
class LossInputs:
    """One rank's embeddings (all L2-normalised), padded to fixed shapes, and text ids.

    ``B`` images, ``K`` ROI slots per image, ``N`` negative slots per ROI, ``M`` per
    image, ``D`` the embedding size. Padding slots are False in their mask (their
    embeddings may hold anything finite). Text ids: equal ids = identical texts.
    """

    logit_scale: Tensor  # scalar, already exp()'d and clamped
    image_fused: Tensor  # (B, D)
    image_global: Tensor  # (B, D)
    report: Tensor  # (B, D)
    report_ids: Tensor  # (B,) int64
    summary: Tensor | None = None  # (B, D)
    summary_ids: Tensor | None = None  # (B,)
    roi: Tensor | None = None  # (B, K, D)
    roi_mask: Tensor | None = None  # (B, K) bool, True = a real ROI
    caption: Tensor | None = None  # (B, K, D): each ROI's region caption
    caption_ids: Tensor | None = None  # (B, K)
    roi_negatives: Tensor | None = None  # (B, K, N, D): each ROI's own negative captions
    roi_negatives_mask: Tensor | None = None  # (B, K, N) bool, True = a real negative
    image_negatives: Tensor | None = None  # (B, M, D): each image's own negative reports
    image_negatives_mask: Tensor | None = None  # (B, M) bool
    # grounding: the projected grid, which cells lie inside the image (not letterbox padding),
    # P phrase slots per image with their cell targets (the share of each cell their boxes cover)
    cells: Tensor | None = None  # (B, h, w, D)
    cell_valid: Tensor | None = None  # (B, h, w) bool
    phrases: Tensor | None = None  # (B, P, D)
    phrase_mask: Tensor | None = None  # (B, P) bool, True = a real phrase slot
    phrase_target: Tensor | None = None  # (B, P, h, w) in [0, 1]
    grounding_scale: Tensor | None = None  # scalar, the grid head's temperature (already exp()'d)
    grounding_mode: str = "softmax"  # one of GROUNDING_MODES (not a tensor: the same for every part)


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


def local_infonce(
    a: Tensor,
    b: Tensor,
    ids: Tensor,
    a_all: Tensor,
    b_all: Tensor,
    ids_all: Tensor,
    offset: int,
    n_total: Tensor | float,
    scale: Tensor | float,
    valid: Tensor | None = None,
    valid_all: Tensor | None = None,
    extra_negatives: Tensor | None = None,
    extra_mask: Tensor | None = None,
    symmetric: bool = True,
) -> Tensor:
    """One rank's share of multi-positive InfoNCE: its rows against all columns.

    ``a``, ``b`` (n, D) are this rank's rows (pair i <-> i), ``ids`` (n,) the text
    ids of ``b``; ``a_all``, ``b_all`` (m, D) and ``ids_all`` (m,) the rows of every
    rank, this rank's at ``offset .. offset + n``. ``valid`` (n,) / ``valid_all``
    (m,) mark real rows (padding: False; None = all real). Row i's positives are the
    valid columns j with ``ids_all[j] == ids[i]``, and j = offset + i.

    Returns ``sum over valid local rows of CE / n_total`` for the a->b direction
    (with ``extra_negatives`` (n, K, D) as extra columns of row i, -inf where
    ``extra_mask`` (n, K) is False), averaged with the b->a direction when
    ``symmetric``. With one rank, ``offset = 0`` and ``n_total`` = the number of
    valid rows, this equals :func:`multi_positive_infonce` (tested); summed over
    ranks it equals it on the union batch.
    """
    n, m = a.shape[0], a_all.shape[0]
    col = torch.arange(m, device=a.device)
    pos = (ids.to(a.device)[:, None] == ids_all.to(a.device)[None, :]) | (col[None, :] == (offset + torch.arange(n, device=a.device))[:, None])
    col_ok = None
    if valid_all is not None:
        col_ok = valid_all.to(a.device).bool()
        pos = pos & col_ok[None, :]
    row_w = valid.to(a.dtype) if valid is not None else a.new_ones(n)

    def direction(rows: Tensor, cols: Tensor, extra: Tensor | None, emask: Tensor | None) -> Tensor:
        logits = scale * (rows @ cols.t())
        if col_ok is not None:
            logits = logits.masked_fill(~col_ok[None, :], -math.inf)
        if extra is not None:
            more = scale * torch.einsum("id,ikd->ik", rows, extra)
            if emask is not None:
                more = more.masked_fill(~emask.bool(), -math.inf)
            logits = torch.cat([logits, more], dim=1)
        log_prob = logits.log_softmax(dim=1)[:, :m]
        target = pos.to(log_prob.dtype)
        target = target / target.sum(dim=1, keepdim=True).clamp_min(1.0)
        # where() rather than a product: 0 * -inf would give NaN for masked columns.
        per_row = -torch.where(pos, target * log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        return (per_row * row_w).sum()

    loss = direction(a, b_all, extra_negatives, extra_mask)
    if symmetric:
        loss = 0.5 * (loss + direction(b, a_all, None, None))
    return loss / n_total


def grounding_loss(cells: Tensor, cell_valid: Tensor, phrases: Tensor, phrase_mask: Tensor, target: Tensor,
                   scale: Tensor | float, n_total: Tensor | float, mode: str = "softmax") -> Tensor:
    """The dense grounding term: each phrase against the cells of its own image.

    ``cells`` (B, h, w, D) and ``phrases`` (B, P, D) L2-normalised; ``cell_valid`` (B, h, w)
    the cells inside the image (letterbox padding False: never a target, never a competitor);
    ``phrase_mask`` (B, P) the real phrase slots; ``target`` (B, P, h, w) the share of each
    cell that the phrase's boxes cover (:func:`regionmed.model.dense.cell_coverage`). A slot
    counts when it is real and covers some valid cell. Returns ``sum over counted slots /
    n_total`` (``n_total``: the counted slots of the whole batch, all ranks: the local loss).

    ``mode``:

    * ``"softmax"`` (default): cross-entropy between the spatial softmax of ``scale x cos`` over
      the image's valid cells and the target normalised to a distribution (the box's cells
      share the mass by their covered area). It trains *where* in the image the phrase is,
      which is what the pointing game and a map's arg-max read, and it is indifferent to the
      phrase's overall similarity level (which the contrastive terms own). Each row involves one
      image only: no collective is needed, and the local loss is exact.
    * ``"binary"``: mean over valid cells of the binary cross-entropy of ``scale x cos - scale / 2``
      against the covered share (a cell-level presence term, as segmentation heads use): it
      also pushes cells outside the box down in absolute terms, at the cost of a fixed
      threshold (cosine 0.5 is even odds).

    A presence term against other images' cells (GLoRIA/FILIP-style) needs their cells
    gathered; it would be a third mode here. Raises ``ValueError`` for an unknown mode.
    """
    if mode not in GROUNDING_MODES:
        raise ValueError(f"grounding mode {mode!r} is not one of {list(GROUNDING_MODES)}")
    valid = cell_valid.to(torch.bool)[:, None]  # (B, 1, h, w)
    tgt = target.to(cells.dtype) * valid
    counted = phrase_mask.to(torch.bool) & (tgt.flatten(2).sum(-1) > 0)  # (B, P)
    logits = scale * torch.einsum("bhwd,bpd->bphw", cells, phrases)
    if mode == "softmax":
        flat = logits.masked_fill(~valid, -math.inf).flatten(2)
        log_prob = flat.log_softmax(-1)
        q = tgt.flatten(2)
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)
        # where() rather than a product: 0 * -inf (a padding cell) would give NaN.
        per_row = -torch.where(q > 0, q * log_prob, torch.zeros_like(log_prob)).sum(-1)
    else:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits - 0.5 * scale, tgt.clamp(0, 1), reduction="none")
        per_row = (bce * valid).flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp_min(1)
    per_row = torch.where(counted, per_row, torch.zeros_like(per_row))
    return per_row.sum() / n_total


def _flat(x: Tensor | None) -> Tensor | None:
    """(B, K, ...) -> (B*K, ...)."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def compute_losses(inputs: LossInputs, weights: Mapping[str, float], distributed: bool = True) -> dict[str, Tensor]:
    """This rank's named loss terms and their weighted sum, under the local loss.

    Gathers what the active terms need from every rank (one collective per field;
    with one process nothing is gathered) and returns one entry per *active* term
    (weight > 0 and rows somewhere in the union batch), keyed by its name in
    :data:`LOSS_NAMES`, plus ``"total"`` = sum of weight * term. Summed over ranks,
    each entry equals the single-process value on the union batch; in one process
    it *is* that value. Which terms are active depends only on gathered data, so it
    is the same on every rank. When no term is active, ``"total"`` is a zero that
    still backpropagates (to the logit scale). Raises ``ValueError`` for an unknown
    name or a negative weight. ``distributed=False`` computes the single-process loss even
    inside a process group (a reference, or the old union-batch scheme in benchmarks).
    """
    _check_weights(weights)
    w = {name: float(weights.get(name, 0.0)) for name in LOSS_NAMES}
    s = inputs.logit_scale
    b = inputs.image_fused.shape[0]
    if distributed:
        rank, world, gather, gather_ids = get_rank(), get_world_size(), gather_with_grad, gather_tensor
    else:
        rank, world, gather, gather_ids = 0, 1, (lambda x: x), (lambda x: x)
    offset = rank * b
    n_images = b * world
    terms: dict[str, Tensor] = {}

    need_reports = w["global"] > 0 or (w["hard_negative"] > 0 and inputs.image_negatives is not None)
    if need_reports:
        fused_all = gather(inputs.image_fused)
        report_all = gather(inputs.report)
        report_ids_all = gather_ids(inputs.report_ids)
    if w["global"] > 0:
        terms["global"] = local_infonce(
            inputs.image_fused, inputs.report, inputs.report_ids, fused_all, report_all, report_ids_all,
            offset, n_images, s,
        )
    if w["summary"] > 0 and inputs.summary is not None:
        terms["summary"] = local_infonce(
            inputs.image_global, inputs.summary, inputs.summary_ids,
            gather(inputs.image_global), gather(inputs.summary), gather_ids(inputs.summary_ids),
            offset, n_images, s,
        )

    need_rois = inputs.roi is not None and (w["region"] > 0 or w["hard_negative"] > 0)
    if need_rois:
        k = inputs.roi.shape[1]
        roi, caption, caption_ids, roi_mask = (_flat(inputs.roi), _flat(inputs.caption), _flat(inputs.caption_ids),
                                               _flat(inputs.roi_mask))
        roi_all, caption_all = gather(roi), gather(caption)
        caption_ids_all, roi_mask_all = gather_ids(caption_ids), gather_ids(roi_mask)
        n_rois = roi_mask_all.sum()
        has_rois = bool(n_rois > 0)  # the same on every rank: it comes from gathered data

        def region_part(extra: Tensor | None, emask: Tensor | None, symmetric: bool) -> Tensor:
            return local_infonce(roi, caption, caption_ids, roi_all, caption_all, caption_ids_all,
                                 offset * k, n_rois, s, roi_mask, roi_mask_all, extra, emask, symmetric)

        if w["region"] > 0 and has_rois:
            terms["region"] = region_part(None, None, True)

    if w["hard_negative"] > 0:
        parts = []
        if need_rois and has_rois and inputs.roi_negatives is not None and inputs.roi_negatives.shape[2] > 0:
            parts.append(region_part(_flat(inputs.roi_negatives), _flat(inputs.roi_negatives_mask), False))
        if inputs.image_negatives is not None and inputs.image_negatives.shape[1] > 0:
            parts.append(local_infonce(
                inputs.image_fused, inputs.report, inputs.report_ids, fused_all, report_all, report_ids_all,
                offset, n_images, s, extra_negatives=inputs.image_negatives,
                extra_mask=inputs.image_negatives_mask, symmetric=False,
            ))
        if parts:
            terms["hard_negative"] = torch.stack(parts).mean()

    if w["grounding"] > 0 and inputs.cells is not None and inputs.phrases is not None:
        valid = inputs.cell_valid.to(torch.bool)[:, None]
        counted = inputs.phrase_mask.to(torch.bool) & ((inputs.phrase_target * valid).flatten(2).sum(-1) > 0)
        n_phrases = gather_ids(counted.sum().reshape(1)).sum()  # every rank's counted slots: the local loss
        if bool(n_phrases > 0):  # the same on every rank: it comes from gathered data
            terms["grounding"] = grounding_loss(inputs.cells, inputs.cell_valid, inputs.phrases, inputs.phrase_mask,
                                                inputs.phrase_target, inputs.grounding_scale, n_phrases, inputs.grounding_mode)

    # A zero tied to the graph, so backward() works even when no term is active.
    total = s.sum() * 0.0
    for name, value in terms.items():
        total = total + w[name] * value
    terms["total"] = total
    return terms
