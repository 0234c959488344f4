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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from regionmed.data.loader import Batch
from regionmed.losses import LOSS_NAMES, LossInputs, compute_losses, text_ids
from regionmed.model.clip import RegionMedCLIP

__all__ = ["TrainingTask", "REGION_LOSSES"]

REGION_LOSSES = ("region", "hard_negative")


class TrainingTask(nn.Module):
    """``forward(batch) -> {term: Tensor, ..., "total": Tensor}`` for one rank's batch.

    ``max_negatives`` / ``max_image_negatives``: the negative slots per ROI / per
    image (the data config's values; a batch holding more raises ``ValueError``).
    """

    def __init__(self, model: RegionMedCLIP, max_negatives: int, max_image_negatives: int):
        super().__init__()
        if max_negatives < 0 or max_image_negatives < 0:
            raise ValueError("max_negatives and max_image_negatives must be >= 0")
        self.model = model
        self.max_negatives = max_negatives
        self.max_image_negatives = max_image_negatives
        self.weights: dict[str, float] = {"global": 1.0}
        self.use_rois = False

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

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        return compute_losses(self.loss_inputs(batch), self.weights)

    # ------------------------------------------------------------------------------
    def loss_inputs(self, batch: Batch) -> LossInputs:
        """Encode ``batch`` and lay out what the active terms need, at fixed shapes."""
        model, active = self.model, self.active
        use_rois = self.use_rois
        img = model.encode_image(batch.images, batch.boxes, batch.roi_mask, batch.roi_crops, use_rois=use_rois)
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
        unique = list(dict.fromkeys(texts))
        row = {t: i for i, t in enumerate(unique)}
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
        return inputs


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
