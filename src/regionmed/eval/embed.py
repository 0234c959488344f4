"""Embed one split of a MedRegion dataset with a model (no gradients, batched)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from regionmed.data.loader import RegionSampleDataset, collate
from regionmed.data.shards import DatasetError, MedRegionDataset
from regionmed.data.transforms import Preprocessor
from regionmed.finite import require_finite
from regionmed.model.clip import RegionMedCLIP


@dataclass
class SplitEmbeddings:
    ids: list[str]
    image_global: torch.Tensor  # (N, D)
    image_fused: torch.Tensor  # (N, D); == image_global without ROIs
    reports: list[str]
    report_emb: torch.Tensor  # (N, D)
    region_image: torch.Tensor  # (R,) index of each region's image
    region_emb: torch.Tensor | None  # (R, D) ROI embeddings (given boxes), None without an ROI path
    crop_emb: torch.Tensor | None  # (R, D) each ROI crop embedded as a whole image (crop mode data)
    captions: list[str]
    caption_emb: torch.Tensor  # (R, D)
    region_labels: list[str]  # R region labels ("" when a region has none)
    negatives: list[list[str]]  # R lists
    negative_rules: list[list[str]]
    negative_emb: list[torch.Tensor]  # R tensors (n_r, D)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable samples: ("<shard>:<key>", reason)


@torch.no_grad()
def embed_split(
    model: RegionMedCLIP, root: str | MedRegionDataset, split: str = "test", batch_size: int = 64, max_negatives: int = 8,
    crop_size: int = 64, progress: bool = True,
) -> SplitEmbeddings:
    """Read ``root``'s ``split`` (or the opened split ``root``); boxes come from the records (given boxes).

    ROI crops are prepared for every model (``crop_size`` when the model has no ROI
    path) so a global-only model can also be scored on the crop as an image.

    A sample that cannot be read (an image that does not decode, a broken record) is left
    out and listed in :attr:`SplitEmbeddings.skipped` with its shard, key and reason; the
    other samples are embedded. Raises :class:`~regionmed.data.shards.DatasetError` when
    no sample of the split can be read."""
    model.eval()
    device = model.logit_scale.device
    pre = Preprocessor.from_model(model)
    if pre.roi_mode != "crop":
        pre = dataclasses.replace(pre, roi_mode="crop", roi_size=pre.roi_size if model.roi_processor is not None else crop_size)
    data = RegionSampleDataset(root, split, pre, max_negatives=max_negatives, use_rois=True, on_bad="drop")
    split = data.data.split
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out = {k: [] for k in ("g", "f", "roi", "crop", "rimg")}
    ids, reports, captions, negatives, rules, labels = [], [], [], [], [], []
    offset = 0
    skipped: list[tuple[str, str]] = []
    for batch in tqdm(loader, desc=f"embed {split}", disable=not progress, leave=False):
        skipped += [(where, why) for _, where, why in batch.bad_samples]
        if not len(batch):
            continue
        batch = batch.to(device)
        img = model.encode_batch(batch, use_rois=model.roi_processor is not None)
        out["g"].append(img.global_.cpu())
        out["f"].append(img.fused.cpu())
        if img.roi is not None:
            out["roi"].append(img.roi[img.roi_mask].cpu())
        if batch.roi_crops is not None and batch.roi_crops.shape[0]:
            out["crop"].append(model.encode_image(batch.roi_crops, use_rois=False).global_.cpu())
        b_idx = batch.roi_mask.nonzero(as_tuple=True)[0]
        out["rimg"].append(b_idx.cpu() + offset)
        offset += len(batch)
        ids += batch.ids
        reports += batch.reports
        captions += batch.captions
        labels += batch.region_labels or [""] * len(batch.captions)
        negatives += batch.roi_negatives
        rules += batch.roi_negative_rules
    if not ids:
        raise DatasetError(f"{data.data.root}: no sample of split {split!r} can be read ({len(skipped)} unreadable, "
                           f"e.g. {skipped[0][0]}: {skipped[0][1]})")
    report_emb = require_finite(model.encode_text(reports, batch_size=256), "text").cpu()
    caption_emb = require_finite(model.encode_text(captions, batch_size=256), "text").cpu()
    flat = [t for negs in negatives for t in negs]
    flat_emb = model.encode_text(flat, batch_size=256).cpu()
    negative_emb, start = [], 0
    for negs in negatives:
        negative_emb.append(flat_emb[start : start + len(negs)])
        start += len(negs)
    return SplitEmbeddings(
        ids=ids,
        image_global=torch.cat(out["g"]),
        image_fused=torch.cat(out["f"]),
        reports=reports,
        report_emb=report_emb,
        region_image=torch.cat(out["rimg"]) if out["rimg"] else torch.zeros(0, dtype=torch.long),
        region_emb=torch.cat(out["roi"]) if out["roi"] else None,
        crop_emb=torch.cat(out["crop"]) if out["crop"] else None,
        captions=captions,
        caption_emb=caption_emb,
        region_labels=labels,
        negatives=negatives,
        negative_rules=rules,
        negative_emb=negative_emb,
        skipped=skipped,
    )
