"""The training task: a batch in, the named loss terms out (the role of open_clip's ``TrainingTask``).

:class:`TrainingTask` wraps a :class:`~regionmed.model.clip.RegionMedCLIP` and owns
everything between a collated :class:`~regionmed.data.loader.Batch` and the loss:

* which texts are encoded (reports always; summaries, region captions and
  negatives only when an active term needs them), each distinct text once, with
  bounded padding (:meth:`RegionMedCLIP.encode_text`);
* padding to fixed shapes — ``K = roi.max_rois`` ROI slots per image,
  ``N = max_negatives`` per ROI, ``M = max_image_negatives`` per image — with
  masks, by index tensors built once per batch (no per-row tensor loops), so that
  under data parallelism every field is gathered by one collective of a known shape;
* the loss (:func:`regionmed.losses.compute_losses`, the local loss).

It is an ``nn.Module`` whose parameters are the model's, so the trainer wraps it
in ``DistributedDataParallel`` directly (anew at each stage, after
``set_trainable``). The active terms and whether ROIs are used are set per stage
with :meth:`set_stage`.

Under DDP (which averages gradients over ``W`` ranks), back-propagate
``W × terms["total"]``: the result is then the gradient of the single-process loss
on the union batch. :class:`regionmed.optim.GuardedStep` does that.

Gradient accumulation (:func:`accumulate`, the trainer's ``train.accum_freq``): a
batch of ``A × B`` rows split into ``A`` micro-batches gives the loss and gradient
of the one large batch, with the activation memory of one micro-batch — the
contrastive loss couples every row with every other, so it cannot be summed over
micro-batches. As open_clip's ``accum_freq``: the loss inputs (embeddings) of every
micro-batch are first computed without gradient and cached; then each micro-batch
is encoded again with gradient and the loss of the whole batch is computed with
that micro-batch's rows fresh and the others' cached, and back-propagated. The
gradients of the ``A`` passes sum to the large batch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from regionmed.data.loader import Batch
from regionmed.data.schema import label_words
from regionmed.losses import GROUNDING_MODES, LOSS_NAMES, LossInputs, compute_losses, text_ids
from regionmed.model.clip import RegionMedCLIP
from regionmed.model.dense import cell_centres_inside, cell_coverage

__all__ = ["TrainingTask", "REGION_LOSSES", "GROUNDING_TEXTS", "Accumulation", "accumulate", "concat_loss_inputs",
           "grounding_phrase", "split_batch"]

REGION_LOSSES = ("region", "hard_negative")
GROUNDING_TEXTS = ("label", "caption")


def grounding_phrase(label: str) -> str:
    """The phrase a region label is grounded as, in training and in evaluation alike: the label as
    lower-case words (:func:`regionmed.data.schema.label_words`: ``"Left Lung"`` -> ``"left lung"``,
    ``"ActiveTuberculosis"`` -> ``"active tuberculosis"``), the rule of the builder's captions."""
    return label_words(label)


class TrainingTask(nn.Module):
    """``forward(batch) -> {term: Tensor, ..., "total": Tensor}`` for one rank's batch.

    ``max_negatives`` / ``max_image_negatives``: the negative slots per ROI / per
    image (the data config's values; a batch holding more raises ``ValueError``).

    ``grounding_text``: what the ``grounding`` term grounds for each boxed region: ``"label"``
    (:func:`grounding_phrase` of its label; a region without a label uses its caption) or
    ``"caption"``. Regions of one image with the same phrase are one target (the union of their
    boxes). ``grounding_mode``: see :func:`regionmed.losses.grounding_loss`.
    """

    def __init__(self, model: RegionMedCLIP, max_negatives: int, max_image_negatives: int,
                 grounding_text: str = "label", grounding_mode: str = "softmax"):
        super().__init__()
        if max_negatives < 0 or max_image_negatives < 0:
            raise ValueError("max_negatives and max_image_negatives must be >= 0")
        if grounding_text not in GROUNDING_TEXTS:
            raise ValueError(f"grounding_text {grounding_text!r} is not one of {list(GROUNDING_TEXTS)}")
        if grounding_mode not in GROUNDING_MODES:
            raise ValueError(f"grounding_mode {grounding_mode!r} is not one of {list(GROUNDING_MODES)}")
        self.model = model
        self.max_negatives = max_negatives
        self.max_image_negatives = max_image_negatives
        self.grounding_text = grounding_text
        self.grounding_mode = grounding_mode
        self.weights: dict[str, float] = {"global": 1.0}
        self.use_rois = False
        # A locked text tower's features (regionmed.features.TextFeatureCache): texts are projected
        # from it instead of running the tower.
        self.text_cache = None

    def set_stage(self, losses: Mapping[str, float], use_rois: bool) -> None:
        """The active loss terms (name → weight) and whether the ROI processor runs."""
        unknown = set(losses) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown loss name(s) {sorted(unknown)}; known: {', '.join(LOSS_NAMES)}")
        self.weights = {k: float(v) for k, v in losses.items()}
        self.use_rois = bool(use_rois) and self.model.roi_processor is not None

    @property
    def active(self) -> set[str]:
        return {k for k, w in self.weights.items() if w > 0}

    def forward(self, batch: Batch, mode: str = "loss", cache: Sequence[LossInputs] | None = None,
                part: int | None = None) -> dict[str, Tensor] | LossInputs:
        """The loss terms of ``batch`` (``mode="loss"``), or, for :func:`accumulate`:

        * ``mode="features"``: the batch's :class:`LossInputs` (call under ``torch.no_grad()``);
        * ``mode="accumulate"``: the loss terms of the whole accumulated batch, with
          micro-batch ``part`` (= ``batch``) encoded afresh and the other micro-batches
          taken from ``cache`` (their ``"features"`` outputs, without gradient). The
          temperature carries gradient in part 0 only, so the passes' gradients sum to
          the large batch's once.

        Modes go through ``forward`` (not separate methods) so that a
        ``DistributedDataParallel`` wrapper sees every pass that builds a graph.
        """
        if mode == "loss":
            return compute_losses(self.loss_inputs(batch), self.weights)
        if mode == "features":
            return self.loss_inputs(batch)
        if mode == "accumulate":
            if cache is None or part is None or not 0 <= part < len(cache):
                raise ValueError("mode 'accumulate' needs cache (the micro-batches' features) and part (an index into it)")
            fresh = self.loss_inputs(batch)
            parts = [fresh if i == part else c for i, c in enumerate(cache)]
            # The temperatures carry gradient in part 0 only, so the passes' gradients sum to the large batch's once.
            scale = fresh.logit_scale if part == 0 else fresh.logit_scale.detach()
            g_scale = fresh.grounding_scale
            if g_scale is not None and part != 0:
                g_scale = g_scale.detach()
            return compute_losses(concat_loss_inputs(parts, logit_scale=scale, grounding_scale=g_scale), self.weights)
        raise ValueError(f"unknown mode {mode!r}: 'loss', 'features' or 'accumulate'")

    def loss_from_cache(self, cache: Sequence[LossInputs]) -> dict[str, Tensor]:
        """The loss terms of the concatenated cached micro-batches (values; no gradient)."""
        with torch.no_grad():
            return compute_losses(concat_loss_inputs(cache), self.weights)

    # ------------------------------------------------------------------------------
    def loss_inputs(self, batch: Batch) -> LossInputs:
        """Encode ``batch`` and lay out what the active terms need, at fixed shapes."""
        model, active = self.model, self.active
        use_rois = self.use_rois
        need_grounding = "grounding" in active
        if need_grounding and batch.content is None:
            raise ValueError("the grounding term needs each image's content box (Batch.content): batches from "
                             "regionmed.data.loader.collate carry it")
        # a non-finite loss is skipped by the step
        img = model.encode_batch(batch, use_rois=use_rois, check_finite=False, cells=need_grounding)
        need_region = use_rois and bool(active & set(REGION_LOSSES))
        need_hn = "hard_negative" in active
        b = len(batch)

        texts = list(batch.reports)
        if "summary" in active:
            texts += batch.summaries
        if need_region:
            texts += batch.captions
            if need_hn:
                texts += [t for neg in batch.roi_negatives for t in neg]
        if need_hn:
            texts += [t for neg in batch.image_negatives for t in neg]
        phrases = self._grounding_phrases(batch) if need_grounding else []
        texts += phrases
        unique = list(dict.fromkeys(texts))
        row = {t: i for i, t in enumerate(unique)}
        if self.text_cache is not None:  # a locked text tower's cached features
            emb = model.project_text(self.text_cache.lookup(unique, model.text_features).to(model.logit_scale.device))
        else:
            emb = model.encode_text(unique)  # (U, D), each distinct text once
        device = emb.device
        ids = text_ids(unique).to(device)
        # One zero row (id -1) at index U stands for every padding slot.
        emb_pad = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])
        ids_pad = torch.cat([ids, ids.new_full((1,), -1)])
        pad = len(unique)

        def index(strings: list[str]) -> Tensor:
            return torch.tensor([row[t] for t in strings], dtype=torch.long, device=device)

        report_idx = index(batch.reports)
        inputs = LossInputs(
            logit_scale=model.scale(),
            image_fused=img.fused,
            image_global=img.global_,
            report=emb[report_idx],
            report_ids=ids[report_idx],
        )
        if "summary" in active:
            summary_idx = index(batch.summaries)
            inputs.summary, inputs.summary_ids = emb[summary_idx], ids[summary_idx]

        if need_region and img.roi is not None:
            roi_mask = img.roi_mask.to(device)
            k = roi_mask.shape[1]
            slots = roi_mask.nonzero(as_tuple=True)  # valid ROIs in batch order = caption order
            if len(batch.captions) != int(slots[0].numel()):
                raise ValueError(f"batch has {len(batch.captions)} region captions for {int(slots[0].numel())} valid boxes")
            caption_idx = torch.full((b, k), pad, dtype=torch.long, device=device)
            caption_idx[slots] = index(batch.captions)
            inputs.roi, inputs.roi_mask = img.roi, roi_mask
            inputs.caption, inputs.caption_ids = emb_pad[caption_idx], ids_pad[caption_idx]
            if need_hn:
                neg_idx = _slot_indices(batch.roi_negatives, self.max_negatives, row, pad, device, "negatives per region")
                full = torch.full((b, k, self.max_negatives), pad, dtype=torch.long, device=device)
                full[slots] = neg_idx
                inputs.roi_negatives, inputs.roi_negatives_mask = emb_pad[full], full != pad
        if need_hn:
            img_idx = _slot_indices(batch.image_negatives, self.max_image_negatives, row, pad, device, "negatives per image")
            inputs.image_negatives, inputs.image_negatives_mask = emb_pad[img_idx], img_idx != pad
        if need_grounding:
            self._grounding_inputs(inputs, batch, img.cells, phrases, index(phrases), emb_pad, pad)
        return inputs

    def _grounding_phrases(self, batch: Batch) -> list[str]:
        """The phrase of every valid ROI of ``batch`` (``roi_mask.nonzero()`` order)."""
        if len(batch.captions) != int(batch.roi_mask.sum()):
            raise ValueError(f"batch has {len(batch.captions)} region captions for {int(batch.roi_mask.sum())} valid boxes")
        if self.grounding_text == "caption":
            return list(batch.captions)
        labels = batch.region_labels or [""] * len(batch.captions)
        return [grounding_phrase(lab) or cap for lab, cap in zip(labels, batch.captions)]

    def _grounding_inputs(self, inputs: LossInputs, batch: Batch, cells: Tensor, phrases: list[str], phrase_rows: Tensor,
                          emb_pad: Tensor, pad: int) -> None:
        """Fill the grounding fields of ``inputs``: one phrase slot per ROI slot, ``K`` per image;
        slots of one image with the same phrase merge into its first (the union of their boxes,
        as the cell-wise maximum of their coverages), the others are masked."""
        device = cells.device
        roi_mask = batch.roi_mask.to(device).bool()
        bsz, k = roi_mask.shape
        h, w = cells.shape[1:3]
        idx = torch.full((bsz, k), pad, dtype=torch.long, device=device)
        idx[roi_mask.nonzero(as_tuple=True)] = phrase_rows
        same = (idx[:, :, None] == idx[:, None, :]) & roi_mask[:, :, None] & roi_mask[:, None, :]  # (B, K, K)
        cover = cell_coverage(batch.boxes.to(device).to(cells.dtype), h, w)  # (B, K, h, w)
        merged = (same[..., None, None].to(cover.dtype) * cover[:, None]).amax(2)  # (B, K, h, w)
        earlier = torch.ones(k, k, dtype=torch.bool, device=device).tril(-1)  # [a, b]: b comes before a
        duplicate = (same & earlier).any(-1)
        inputs.cells = cells
        inputs.cell_valid = cell_centres_inside(batch.content.to(device).to(cells.dtype), h, w)
        inputs.phrases = emb_pad[idx]
        inputs.phrase_mask = roi_mask & ~duplicate
        inputs.phrase_target = merged * inputs.phrase_mask[..., None, None]
        inputs.grounding_scale = self.model.dense_head.scale() if self.model.dense_head is not None else self.model.scale()
        inputs.grounding_mode = self.grounding_mode


def _slot_indices(lists: list[list[str]], slots: int, row: dict[str, int], pad: int, device, what: str) -> Tensor:
    """(len(lists), slots) row indices of each list's texts, ``pad`` in empty slots."""
    longest = max((len(x) for x in lists), default=0)
    if longest > slots:
        raise ValueError(f"a batch row has {longest} {what}, more than the {slots} configured")
    flat = [row[t] for x in lists for t in x]
    out = torch.full((len(lists), slots), pad, dtype=torch.long)
    if flat:
        lengths = torch.tensor([len(x) for x in lists])
        rows = torch.repeat_interleave(torch.arange(len(lists)), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        cols = torch.arange(len(flat)) - torch.repeat_interleave(starts, lengths)
        out[rows, cols] = torch.tensor(flat, dtype=torch.long)
    return out.to(device)


# ----------------------------------------------------------------------------------
# Gradient accumulation


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split ``batch`` into ``parts`` consecutive micro-batches of equal size.

    Per-image fields are cut by rows; per-ROI fields (``roi_crops``, ``captions``,
    ``roi_negatives``, ``roi_negative_rules``), which list the valid ROIs in
    ``roi_mask.nonzero()`` order, are cut at the rows' ROI counts. Concatenating the
    parts gives ``batch`` back (batch-level records, ``bad_samples`` and any reader
    state, stay with the first part). Raises ``ValueError`` when ``len(batch)`` is not a
    multiple of ``parts``.
    """
    n = len(batch)
    if parts < 1 or n % parts:
        raise ValueError(f"a batch of {n} rows cannot be split into {parts} equal micro-batches")
    if parts == 1:
        return [batch]
    size = n // parts
    per_row = batch.roi_mask.sum(dim=1).tolist()
    out = []
    for p in range(parts):
        r0, r1 = p * size, (p + 1) * size
        k0, k1 = int(sum(per_row[:r0])), int(sum(per_row[:r1]))
        out.append(dataclasses.replace(
            batch,
            images=None if batch.images is None else batch.images[r0:r1], boxes=batch.boxes[r0:r1], roi_mask=batch.roi_mask[r0:r1],
            features=None if batch.features is None else type(batch.features)(
                batch.features.pooled[r0:r1], batch.features.grid[r0:r1],
                None if batch.features.crops is None else batch.features.crops[k0:k1]),
            roi_crops=None if batch.roi_crops is None else batch.roi_crops[k0:k1],
            reports=batch.reports[r0:r1], summaries=batch.summaries[r0:r1], captions=batch.captions[k0:k1],
            roi_negatives=batch.roi_negatives[k0:k1], image_negatives=batch.image_negatives[r0:r1], ids=batch.ids[r0:r1],
            roi_negative_rules=batch.roi_negative_rules[k0:k1] if batch.roi_negative_rules else [],
            region_labels=batch.region_labels[k0:k1] if batch.region_labels else [],
            content=None if batch.content is None else batch.content[r0:r1],
            bad_samples=list(batch.bad_samples) if p == 0 else [],
            **({"sources": batch.sources[r0:r1]} if getattr(batch, "sources", None) else {}),
        ))
    return out


def concat_loss_inputs(parts: Sequence[LossInputs], logit_scale: Tensor | None = None,
                       grounding_scale: Tensor | None = None) -> LossInputs:
    """Row-wise concatenation of micro-batches' :class:`LossInputs` (every tensor field is
    ``(B, ...)`` with fixed trailing shapes). The temperatures are ``logit_scale`` /
    ``grounding_scale`` when given, else the first part's. Raises ``ValueError`` when parts
    disagree on which fields they hold."""
    if not parts:
        raise ValueError("no micro-batch to concatenate")
    values = {"grounding_scale": parts[0].grounding_scale if grounding_scale is None else grounding_scale,
              "grounding_mode": parts[0].grounding_mode}
    for f in dataclasses.fields(LossInputs):
        if f.name in ("logit_scale", "grounding_scale", "grounding_mode"):
            continue
        items = [getattr(p, f.name) for p in parts]
        present = [x is not None for x in items]
        if not any(present):
            values[f.name] = None
        elif not all(present):
            raise ValueError(f"micro-batches disagree on field {f.name!r} (present in some, absent in others)")
        else:
            values[f.name] = items[0] if len(items) == 1 else torch.cat(items)
    return LossInputs(logit_scale=parts[0].logit_scale if logit_scale is None else logit_scale, **values)


@dataclass
class Accumulation:
    """What :func:`accumulate` returns.

    ``terms``: the loss terms of the whole accumulated batch (detached; on each rank the
    local-loss share, as :meth:`TrainingTask.forward` returns them). ``backward(factor)``
    runs the recomputing passes and back-propagates ``factor × total`` of the whole batch
    (``factor`` = the world size under DDP, see :class:`regionmed.optim.GuardedStep`).
    ``pass_totals``: the total of each recomputing pass, filled by ``backward`` (each
    equals ``terms["total"]`` up to float rounding when the forward pass is reproducible).
    """

    terms: dict[str, Tensor]
    backward: Callable[[float], None]
    pass_totals: list[float] = dataclasses.field(default_factory=list)


def _batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    return [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulate(runner: nn.Module, task: TrainingTask, micro_batches: Sequence[Batch],
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Accumulation:
    """Loss and gradient of the concatenation of ``micro_batches``, one micro-batch's
    activations at a time (gradient accumulation for contrastive losses).

    ``runner`` is ``task`` or its ``DistributedDataParallel`` wrapper; every pass goes
    through it, and every pass but the last runs under ``runner.no_sync()`` (one
    gradient all-reduce per step). ``autocast`` returns the precision context.

    Exactness: the random-number state before each micro-batch's first encoding is
    restored before it is encoded again (same dropout masks), and BatchNorm running
    statistics are rolled back after the caching pass (updated once per micro-batch).
    Loss and gradient then equal those of one batch of the concatenated rows
    (:func:`torch.testing.assert_close` in ``tests/test_accumulation.py``: loss 1e-5,
    gradients 1e-4) for towers without batch statistics (ViT, BERT). A BatchNorm tower
    in training mode normalises each micro-batch with its own statistics, as each rank
    does under CPU data parallelism. Reference: open_clip's ``accum_freq``; Gao et al.,
    "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (GradCache, 2021).
    """
    if not micro_batches:
        raise ValueError("no micro-batch to accumulate")
    device = micro_batches[0].device
    buffers = _batchnorm_buffers(task)
    saved_buffers = [b.detach().clone() for b in buffers]
    rng: list[tuple] = []
    cache: list[LossInputs] = []
    with torch.no_grad():
        for mb in micro_batches:
            rng.append(_rng_state(device))
            with autocast():
                cache.append(runner(mb, mode="features"))
    after = _rng_state(device)
    with torch.no_grad():
        for b, saved in zip(buffers, saved_buffers):
            b.copy_(saved)
    terms = task.loss_from_cache(cache)
    result = Accumulation(terms={k: v.detach() for k, v in terms.items()}, backward=lambda factor: None)

    def backward(factor: float) -> None:
        last = len(micro_batches) - 1
        no_sync = getattr(runner, "no_sync", None)
        for j, mb in enumerate(micro_batches):
            _set_rng_state(rng[j], device)
            context = no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext()
            with context:
                with autocast():
                    part_terms = runner(mb, mode="accumulate", cache=cache, part=j)
                (part_terms["total"] * factor).backward()
            result.pass_totals.append(float(part_terms["total"].detach()))
        _set_rng_state(after, device)

    result.backward = backward
    return result
