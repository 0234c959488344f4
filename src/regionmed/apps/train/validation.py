"""Validation in the training loop: loss terms and retrieval R@1 on a held-out split.

Every ``validation.every`` steps (and after the last step) the trainer scores a fixed
subset of a held-out MedRegion split with the current weights and the current stage's
active terms, and logs one ``val`` record in ``metrics.jsonl`` beside the training
records (``loss_curve.png`` draws ``val.loss.total`` over the training losses):

* ``val.loss.<term>``: each active loss term, averaged over full batches of
  ``validation.batch_size`` rows (default: ``train.accum_freq × train.batch_size``, the
  rows one training loss is computed over, so the contrastive terms — whose chance level
  is ln(rows) — are on the training loss's scale); a split smaller than one batch
  is scored as one batch of what it has (said in the record's ``loss_batch``);
* ``val.i2t_R@1`` / ``val.t2i_R@1``: image ↔ report retrieval over the whole subset
  (the fused embedding in stages with ROIs, else the global one; identical reports
  merged, see :func:`regionmed.eval.retrieval.retrieval_recall`);
* ``val.region_i2t_R@1`` / ``val.region_t2i_R@1``: ROI ↔ region caption retrieval over
  every valid ROI of the subset, in stages with ROIs when the split has regions.

It runs on the main process only, with the model in eval mode, under ``torch.no_grad``,
and restores every random-number state it could touch, so a run with validation
trains exactly as one without (and resumes exactly). Unreadable samples are left
out and counted (``val.bad_samples``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from regionmed.config import ConfigError
from regionmed.data.loader import RegionSampleDataset, collate
from regionmed.data.transforms import Preprocessor
from regionmed.eval.retrieval import retrieval_recall
from regionmed.losses import compute_losses
from regionmed.task import TrainingTask

__all__ = ["ValidationConfig", "Validator", "validate_validation_config"]


@dataclass
class ValidationConfig:
    """``validation:`` in a run config."""

    every: int = 0  # steps between validations; 0 = no validation in the loop
    data: str = ""  # a MedRegion dataset folder; "" = the training dataset (data.train)
    split: str = "val"  # its held-out split
    max_samples: int = 512  # a fixed, evenly spread subset of the split (0 = all of it)
    batch_size: int = 0  # rows per loss batch; 0 = train.accum_freq x train.batch_size


def validate_validation_config(cfg: ValidationConfig, source: str = "the run config") -> None:
    """Raise :class:`~regionmed.config.ConfigError` naming the field for a bad value."""
    for name in ("every", "max_samples", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{source}: validation.{name} must be an integer >= 0, got {value!r}")
    if cfg.every and not cfg.split.strip():
        raise ConfigError(f"{source}: validation.split is empty: name the held-out split (e.g. val)")


def _subset(n: int, max_samples: int) -> list[int]:
    """``max_samples`` indices spread evenly over ``range(n)`` (all when 0 or n is smaller):
    the same subset at every validation, drawn from every shard rather than the first."""
    if not max_samples or n <= max_samples:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, max_samples).round()})


class Validator:
    """Scores a held-out split with a :class:`~regionmed.task.TrainingTask`'s model.

    ``root``/``cfg.split``: the MedRegion dataset and split; ``batch_size``: rows per
    loss batch; ``max_rois`` / ``max_negatives`` / ``max_image_negatives``: the
    training run's slots. Raises :class:`~regionmed.data.shards.DatasetError` when the
    split cannot be opened (the trainer turns that into an error naming
    ``validation.split`` before step 0).
    """

    def __init__(self, cfg: ValidationConfig, root: str, preprocessor: Preprocessor, batch_size: int, max_rois: int,
                 max_negatives: int, max_image_negatives: int, use_rois: bool = True):
        self.cfg = cfg
        self.batch_size = max(1, batch_size)
        self.max_rois = max_rois
        self.data = RegionSampleDataset(root, cfg.split, preprocessor, max_negatives, use_rois=use_rois,
                                        max_image_negatives=max_image_negatives, on_bad="drop")
        self.indices = _subset(len(self.data), cfg.max_samples)

    def __len__(self) -> int:
        return len(self.indices)

    def run(self, task: TrainingTask) -> dict[str, float | int]:
        """The ``val.*`` figures of the module docstring for ``task``'s current stage."""
        model = task.model
        was_training = model.training
        states = (random.getstate(), np.random.get_state())
        device = next(model.parameters()).device
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                model.eval()
                return self._run(task, device)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            model.train(was_training)

    def _run(self, task: TrainingTask, device: torch.device) -> dict[str, float | int]:
        sums: dict[str, float] = {}
        loss_batches = 0
        images, reports, report_texts = [], [], []
        rois, captions, caption_texts = [], [], []
        bad = 0
        n = len(self.indices)
        full = n // self.batch_size * self.batch_size or n  # whole batches only for the losses
        for start in range(0, n, self.batch_size):
            chunk = self.indices[start : start + self.batch_size]
            batch = collate([self.data[i] for i in chunk], max_rois=self.max_rois)
            bad += len(batch.bad_samples)
            if not len(batch):
                continue
            inputs = task.loss_inputs(batch.to(device))
            if start + len(chunk) <= full and len(batch) == len(chunk):
                terms = compute_losses(inputs, task.weights, distributed=False)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                loss_batches += 1
            images.append((inputs.image_fused if task.use_rois else inputs.image_global).float().cpu())
            reports.append(inputs.report.float().cpu())
            report_texts += batch.reports
            if inputs.roi is not None and inputs.caption is not None:
                mask = inputs.roi_mask.bool()
                rois.append(inputs.roi[mask].float().cpu())
                captions.append(inputs.caption[mask].float().cpu())
                caption_texts += batch.captions
        out: dict[str, float | int] = {"samples": n - bad, "bad_samples": bad, "loss_batch": min(self.batch_size, n)}
        out.update({f"loss.{k}": v / loss_batches for k, v in sums.items()} if loss_batches else {})
        if images:
            img = torch.cat(images)
            r = retrieval_recall(img, torch.cat(reports), list(range(img.shape[0])), texts=report_texts, ks=(1,))
            out.update({"i2t_R@1": r["i2t_R@1"], "t2i_R@1": r["t2i_R@1"]})
        if caption_texts:
            roi = torch.cat(rois)
            r = retrieval_recall(roi, torch.cat(captions), list(range(roi.shape[0])), texts=caption_texts, ks=(1,))
            out.update({"region_i2t_R@1": r["i2t_R@1"], "region_t2i_R@1": r["t2i_R@1"], "regions": roi.shape[0]})
        return out
