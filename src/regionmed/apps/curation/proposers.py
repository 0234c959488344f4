"""ROI proposers, chosen by name in the build config (``proposer.name``).

* ``annotation`` — the boxes given with the data (masks → boxes is the source's job; pixel
  boxes are scaled to the stored image, normalised ones — YOLO — multiplied by its size);
* ``unsupervised`` — no weights: Felzenszwalb segments and multi-Otsu
  intensity components and bands (scikit-image), filtered by size, ranked by
  contrast × fill × size and de-duplicated with non-maximum suppression;
* ``detector`` — an external model with a local checkpoint: ``backend: yolo``
  (ultralytics) or ``backend: sam`` / ``medsam`` (segment-anything). Imported
  lazily; a missing package or checkpoint is a clear :class:`ProposerError`.

``fallback`` (e.g. ``annotation`` with ``fallback: unsupervised``) is used for
images where the main proposer finds nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from regionmed.apps.curation.items import RawItem
from regionmed.data.boxes import box_iou, nms
from regionmed.errors import RegionmedError

PROPOSERS = ("annotation", "unsupervised", "detector", "none")


class ProposerError(RegionmedError, RuntimeError):
    """A proposer that cannot run (unknown name, missing package or checkpoint)."""


@dataclass
class ProposerConfig:
    """The ``proposer:`` block of a build config."""

    name: str = "annotation"
    fallback: str | None = None
    max_proposals: int = 8
    # unsupervised
    work_size: int = 256
    min_area_frac: float = 0.004
    max_area_frac: float = 0.6
    scales: list[int] = field(default_factory=lambda: [300])  # Felzenszwalb scales
    otsu_classes: int = 4
    # detector
    backend: str = "yolo"
    checkpoint: str | None = None
    model_type: str = "vit_b"
    confidence: float = 0.25
    device: str = "cpu"
    label: str = "region"  # label for boxes without a class name
    options: dict[str, Any] = field(default_factory=dict)


class Proposer:
    name = "base"

    def __init__(self, cfg: ProposerConfig):
        self.cfg = cfg

    def propose(self, item: RawItem, image: Image.Image, scale: float = 1.0) -> list[tuple[str, list[float], str]]:
        """``[(label, [x0, y0, x1, y1] in pixels of ``image``, source)]``; ``scale`` maps source boxes to ``image``."""
        raise NotImplementedError


class NoProposer(Proposer):
    name = "none"

    def propose(self, item, image, scale=1.0):
        return []


class AnnotationProposer(Proposer):
    name = "annotation"

    def propose(self, item, image, scale=1.0):
        w, h = image.size
        return [(b.label, [b.box[0] * w, b.box[1] * h, b.box[2] * w, b.box[3] * h] if b.normalized
                 else [v * scale for v in b.box], "annotation") for b in item.boxes]


class UnsupervisedProposer(Proposer):
    """Weight-free boxes from image structure (scikit-image)."""

    name = "unsupervised"

    def __init__(self, cfg: ProposerConfig):
        super().__init__(cfg)
        try:
            self._seg = importlib.import_module("skimage.segmentation")
            self._measure = importlib.import_module("skimage.measure")
            self._filters = importlib.import_module("skimage.filters")
            self._morph = importlib.import_module("skimage.morphology")
            self._ndi = importlib.import_module("scipy.ndimage")
        except ImportError as err:
            raise ProposerError("the 'unsupervised' proposer needs scikit-image: pip install 'regionmed[build]'") from err

    def boxes(self, image: Image.Image) -> list[list[float]]:
        cfg = self.cfg
        gray = image.convert("L")
        factor = max(gray.size) / cfg.work_size if max(gray.size) > cfg.work_size else 1.0
        if factor > 1:
            gray = gray.resize((max(1, round(gray.width / factor)), max(1, round(gray.height / factor))), Image.BILINEAR)
        arr = np.asarray(gray, dtype=np.float64) / 255.0
        h, w = arr.shape
        area = float(h * w)
        cands: list[list[float]] = []
        scores: list[float] = []
        mean_all = float(arr.mean())

        def add(bbox, mask_mean, region_area):
            y0, x0, y1, x1 = bbox
            bw, bh = x1 - x0, y1 - y0
            frac = bw * bh / area
            if frac < cfg.min_area_frac or frac > cfg.max_area_frac or bw < 3 or bh < 3:
                return
            fill = region_area / max(1.0, bw * bh)
            cands.append([x0 * factor, y0 * factor, x1 * factor, y1 * factor])
            scores.append(abs(mask_mean - mean_all) * (0.5 + fill) * np.sqrt(frac))

        for scale in cfg.scales:
            seg = self._seg.felzenszwalb(arr, scale=scale, sigma=0.8, min_size=max(8, int(area * cfg.min_area_frac)))
            for r in self._measure.regionprops(seg + 1, intensity_image=arr):
                add(r.bbox, float(r.intensity_mean), float(r.area))
        try:
            thresholds = list(self._filters.threshold_multiotsu(arr, classes=cfg.otsu_classes))
        except ValueError:
            thresholds = []
        # components above each threshold, and of each intensity band (opened to split touching organs)
        masks = [arr > t for t in thresholds]
        edges = [-1.0, *thresholds, 2.0]
        footprint = self._morph.disk(2).astype(bool)
        masks += [self._ndi.binary_opening((arr > a) & (arr <= b), structure=footprint) for a, b in zip(edges[:-1], edges[1:])]
        for mask in masks:
            for r in self._measure.regionprops(self._measure.label(mask), intensity_image=arr):
                add(r.bbox, float(r.intensity_mean), float(r.area))
        keep = nms(cands, scores, 0.6)[: cfg.max_proposals]
        return [cands[i] for i in keep]

    def propose(self, item, image, scale=1.0):
        return [(self.cfg.label, b, "unsupervised") for b in self.boxes(image)]


def _need(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pkg = {"ultralytics": "ultralytics", "segment_anything": "segment-anything"}.get(module, module)
        raise ProposerError(f"{what} needs the '{pkg}' package, which is not installed: pip install {pkg}") from err


def _need_checkpoint(cfg: ProposerConfig, what: str) -> Path:
    if not cfg.checkpoint:
        raise ProposerError(f"{what} needs a local checkpoint: set proposer.checkpoint in the build config")
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise ProposerError(f"{what}: checkpoint {path} not found")
    return path


class YoloProposer(Proposer):
    """ultralytics YOLO with local weights; class names become region labels."""

    name = "detector"

    def __init__(self, cfg: ProposerConfig):
        super().__init__(cfg)
        what = "the 'detector' proposer (backend 'yolo')"
        path = _need_checkpoint(cfg, what)
        ultralytics = _need("ultralytics", what)
        self.model = ultralytics.YOLO(str(path))

    def propose(self, item, image, scale=1.0):
        res = self.model.predict(image.convert("RGB"), conf=self.cfg.confidence, device=self.cfg.device, verbose=False)[0]
        names = getattr(res, "names", {}) or {}
        out = []
        for xyxy, cls in zip(res.boxes.xyxy.tolist(), res.boxes.cls.tolist()):
            out.append((str(names.get(int(cls), self.cfg.label)), [float(v) for v in xyxy], "detector"))
        return out[: self.cfg.max_proposals]


class SamProposer(Proposer):
    """segment-anything / MedSAM automatic masks → boxes (local checkpoint)."""

    name = "detector"

    def __init__(self, cfg: ProposerConfig):
        super().__init__(cfg)
        what = f"the 'detector' proposer (backend '{cfg.backend}')"
        path = _need_checkpoint(cfg, what)
        sam = _need("segment_anything", what)
        model = sam.sam_model_registry[cfg.model_type](checkpoint=str(path))
        model.to(cfg.device)
        self.generator = sam.SamAutomaticMaskGenerator(model, **cfg.options)

    def propose(self, item, image, scale=1.0):
        masks = self.generator.generate(np.asarray(image.convert("RGB")))
        masks.sort(key=lambda m: -float(m.get("predicted_iou", 0)))
        out = []
        for m in masks[: self.cfg.max_proposals]:
            x, y, w, h = m["bbox"]
            out.append((self.cfg.label, [float(x), float(y), float(x + w), float(y + h)], "detector"))
        return out


class WithFallback(Proposer):
    def __init__(self, main: Proposer, fallback: Proposer):
        super().__init__(main.cfg)
        self.main, self.fallback = main, fallback
        self.name = f"{main.name}+{fallback.name}"

    def propose(self, item, image, scale=1.0):
        return self.main.propose(item, image, scale) or self.fallback.propose(item, image, scale)


def _single(name: str, cfg: ProposerConfig) -> Proposer:
    if name == "annotation":
        return AnnotationProposer(cfg)
    if name == "unsupervised":
        return UnsupervisedProposer(cfg)
    if name == "none":
        return NoProposer(cfg)
    if name == "detector":
        if cfg.backend == "yolo":
            return YoloProposer(cfg)
        if cfg.backend in ("sam", "medsam"):
            return SamProposer(cfg)
        raise ProposerError(f"unknown detector backend {cfg.backend!r}; choose 'yolo', 'sam' or 'medsam'")
    raise ProposerError(f"unknown proposer {name!r}; choose one of {PROPOSERS}")


def make_proposer(cfg: ProposerConfig) -> Proposer:
    main = _single(cfg.name, cfg)
    if cfg.fallback and cfg.fallback != cfg.name:
        return WithFallback(main, _single(cfg.fallback, cfg))
    return main


def proposal_recall(
    pairs, proposer: Proposer, thresholds=(0.3, 0.5)
) -> dict[str, Any]:
    """Recall of ground-truth boxes by proposals: ``pairs`` yields ``(image, [gt xyxy boxes])``.

    Returns ``{"images", "gt_boxes", "proposals_per_image", "recall@0.3", "recall@0.5", ...}``.
    """
    hits = {t: 0 for t in thresholds}
    n_gt = n_img = n_prop = 0
    for image, gts in pairs:
        if not gts:
            continue
        props = [b for _, b, _ in proposer.propose(None, image)]
        n_img += 1
        n_prop += len(props)
        for g in gts:
            n_gt += 1
            best = max((box_iou(g, p) for p in props), default=0.0)
            for t in thresholds:
                hits[t] += best >= t
    out: dict[str, Any] = {"images": n_img, "gt_boxes": n_gt, "proposals_per_image": n_prop / max(1, n_img)}
    for t in thresholds:
        out[f"recall@{t}"] = hits[t] / max(1, n_gt)
    return out
