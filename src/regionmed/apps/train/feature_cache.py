"""Locked towers in training: their eval mode, and their outputs read from a feature cache.

:func:`attach_feature_caches` builds (or finds) the caches of :mod:`regionmed.features` for
the training datasets and hands them to the datasets (image features in place of pixels)
and to the training task (text features in place of the text tower). Every rank builds
its own chunks of the image cache, then waits for the others; rank 0 marks it complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from regionmed.apps.train.config import LockConfig
from regionmed.config import to_dict
from regionmed.data.loader import MixedSampleDataset, RegionSampleDataset
from regionmed.data.shards import SampleError
from regionmed.distributed import DistInfo
from regionmed.features import ImageFeatureCache, TextFeatureCache, module_digest, split_identity
from regionmed.model.clip import RegionMedCLIP
from regionmed.task import TrainingTask, grounding_phrase

log = logging.getLogger(__name__)

__all__ = ["attach_feature_caches", "cache_root", "set_locked_modes", "split_texts"]


def cache_root(lock: LockConfig, output_dir: str | Path) -> Path:
    """Where the caches live: ``lock.cache_dir``, else ``.feature-cache`` beside the run folder
    (so that runs of an ablation, side by side, share them)."""
    return Path(lock.cache_dir) if lock.cache_dir else Path(output_dir).resolve().parent / ".feature-cache"


def set_locked_modes(model: RegionMedCLIP, lock: LockConfig) -> None:
    """Put the locked towers in eval mode (after ``model.train()``): frozen BatchNorm statistics
    and no dropout, as their cached outputs were computed."""
    if lock.image:
        model.image_tower.eval()
    if lock.text:
        model.text_tower.eval()


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()


def _encoder(model: RegionMedCLIP, ds: RegionSampleDataset, batch: int = 32):
    """``rows -> (per-row features or None, [(row, where, reason)])`` through the image tower, in eval mode."""
    device = model.logit_scale.device

    def encode(rows):
        feats: list[dict | None] = [None] * len(rows)
        bad = []
        with torch.no_grad():
            for s in range(0, len(rows), batch):
                part = rows[s : s + batch]
                samples = {}
                for j, i in enumerate(part):
                    try:
                        samples[s + j] = ds.load(i)
                    except SampleError as err:
                        bad.append((i, err.where, err.reason))
                if not samples:
                    continue
                keys = list(samples)
                pooled, grid = model.image_tower(torch.stack([samples[k]["image"] for k in keys]).to(device))
                crops = [samples[k]["crops"] for k in keys]
                crop_feats = None
                if crops[0] is not None:
                    n = [c.shape[0] for c in crops]
                    crop_feats = model.image_tower.encode_crops(torch.cat(crops).to(device)).split(n)
                for j, k in enumerate(keys):
                    feats[k] = {"pooled": pooled[j].cpu(), "grid": grid[j].cpu(),
                                "crops": None if crop_feats is None else crop_feats[j].cpu()}
        return feats, bad

    return encode


def split_texts(ds: RegionSampleDataset, max_negatives: int, max_image_negatives: int) -> list[str]:
    """Every text training may encode for ``ds`` (reports, summaries, region captions, label
    phrases, negatives), from the records (no image decoded); unreadable records are skipped."""
    texts: set[str] = set()
    for i in range(len(ds)):
        try:
            rec = ds.data.record(i)
        except Exception:  # noqa: BLE001 - an unreadable record is the readers' business, not the cache's
            continue
        texts.update((rec["report"], rec["summary"]))
        texts.update(n["text"] for n in rec.get("negatives", [])[:max_image_negatives])
        for r in rec.get("regions", []):
            texts.add(r["caption"])
            if r.get("label"):
                texts.add(grounding_phrase(r["label"]))
            texts.update(n["text"] for n in r.get("negatives", [])[:max_negatives])
    return sorted(texts)


def attach_feature_caches(model: RegionMedCLIP, data: RegionSampleDataset | MixedSampleDataset, task: TrainingTask,
                          lock: LockConfig, output_dir: str | Path, dist: DistInfo, max_negatives: int,
                          max_image_negatives: int, progress: bool = True) -> list[str]:
    """Build or find the caches of the locked towers for ``data`` and attach them; returns notes
    (what was built or reused). Does nothing unless ``lock.cache`` and a tower is locked."""
    if not lock.cache or not (lock.image or lock.text):
        return []
    root = cache_root(lock, output_dir)
    parts = data.datasets if isinstance(data, MixedSampleDataset) else [data]
    notes = []
    was_training = model.training
    model.eval()
    try:
        if lock.image:
            tower = {"tower": to_dict(model.cfg.image), "weights": module_digest(model.image_tower),
                     "preprocess": model.preprocessor.to_dict()}
            for ds in parts:
                cache = ImageFeatureCache(root, {**tower, "use_rois": ds.use_rois, "data": split_identity(ds.data)}, len(ds),
                                          dtype=lock.cache_dtype, max_bytes=int(lock.cache_max_gb * 2**30))
                if cache.is_complete():
                    notes.append(f"image feature cache: reusing {cache.folder}")
                else:
                    bar = tqdm(total=len(ds), desc="feature cache (image)", disable=not (progress and dist.is_main), leave=False)
                    cache.build(_encoder(model, ds), dist.rank, dist.world_size, bar.update)
                    bar.close()
                    _barrier(dist)
                    if dist.is_main:
                        cache.finish()
                    _barrier(dist)
                    notes.append(f"image feature cache: built {cache.folder} ({len(ds)} samples)")
                cache.touch()
                ds.features = cache
        if lock.text:
            texts = sorted({t for ds in parts for t in split_texts(ds, max_negatives, max_image_negatives)})
            key = {"tower": to_dict(model.cfg.text), "weights": module_digest(model.text_tower)}
            cache = TextFeatureCache(root, key, texts, dtype=lock.cache_dtype)
            with torch.no_grad():
                cache.build(lambda t: model.text_features(t))
            task.text_cache = cache
            notes.append(f"text feature cache: {cache.folder} ({len(texts)} texts)")
    finally:
        model.train(was_training)
    for note in notes:
        log.info(note)
    return notes
