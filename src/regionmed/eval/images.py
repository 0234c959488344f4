"""Embed a list of images (files or PIL images) with test-time ROIs: none / given / self.

* ``none``: the whole image only (fused == global);
* ``given``: the boxes that come with the images (e.g. SLAKE ``detection.json``);
* ``self``: boxes the model proposes itself: for each phrase of the prompt file's
  ``proposal_phrases`` the patch–text similarity map gives a box
  (:mod:`.grounding`); boxes are ranked by their map's peak, NMS'd, at most
  ``max_rois``.

A model without an ROI path always runs as ``none``; the effective mode is stated in
:attr:`ImageSetEmbeddings.rois`. Images that cannot be read are skipped, counted and
named in ``missing`` (never a crash halfway through).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from regionmed.data.decode import decode_image
from regionmed.data.loader import ImageBatch
from regionmed.data.schema import sanitize_box
from regionmed.data.transforms import Preprocessor, to_rgb
from regionmed.eval.grounding import Geometry, propose_from_maps, similarity_maps

log = logging.getLogger(__name__)
ROI_MODES = ("none", "given", "self")


@dataclass
class ImageRef:
    key: str
    path: str | None = None
    image: Image.Image | None = None
    boxes: list[list[float]] = field(default_factory=list)  # pixel xyxy, given boxes
    box_labels: list[str] = field(default_factory=list)
    opener: object = None  # picklable callable returning a PIL image (e.g. a MedRegion sample)
    # per box, "anatomy" | "finding" | "" (unknown): the region's label kind (regionmed.data.schema.REGION_KINDS)
    box_kinds: list[str] = field(default_factory=list)
    source: str = ""  # the dataset an image comes from (a MedRegion record's ``source``), "" when unknown


@dataclass
class ImageSetEmbeddings:
    keys: list[str]
    global_: torch.Tensor  # (N, D)
    fused: torch.Tensor  # (N, D)
    roi_pooled: torch.Tensor  # (N, D): mean of the ROI embeddings, re-normalised; == fused without ROIs
    n_rois: torch.Tensor  # (N,)
    rois: str  # effective test-time ROI mode
    missing: list[tuple[str, str]] = field(default_factory=list)
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)  # the boxes each image was embedded with
    box_problems: list[tuple[str, str]] = field(default_factory=list)  # (key, given boxes that were not used and why)

    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def get(self, kind: str) -> torch.Tensor:
        _check_feature(kind)
        return {"global": self.global_, "fused": self.fused, "roi": self.roi_pooled}[kind]


IMAGE_FEATURES = ("fused", "global", "roi")


def _check_feature(kind: str) -> None:
    if kind not in IMAGE_FEATURES:
        raise ValueError(f"image embedding {kind!r} is not one of {list(IMAGE_FEATURES)}")


def feature_of(emb, kind: str) -> torch.Tensor:
    """(B, D) image feature ``kind`` of a model's ImageEmbeddings, as :meth:`ImageSetEmbeddings.get` names them."""
    _check_feature(kind)
    if kind == "roi":
        return pool_rois(emb)[0]
    return emb.global_ if kind == "global" else emb.fused


def pool_rois(emb) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) mean of an ImageEmbeddings' ROI embeddings, re-normalised (the fused
    embedding for an image without ROIs), and (B,) the ROI counts."""
    if emb.roi is not None and emb.roi_mask is not None and emb.roi_mask.shape[1] > 0:
        m = emb.roi_mask.unsqueeze(-1).to(emb.roi.dtype)
        n = emb.roi_mask.sum(1)
        pooled = (emb.roi * m).sum(1) / n.clamp_min(1).unsqueeze(-1)
        return torch.where((n > 0).unsqueeze(-1), F.normalize(pooled, dim=-1), emb.fused), n
    return emb.fused, torch.zeros(emb.fused.shape[0], dtype=torch.long, device=emb.fused.device)


def open_image(ref: ImageRef) -> Image.Image:
    """8-bit RGB pixels of ``ref``: its PIL image or opener (already decoded: mode conversion
    only), else its file through :func:`regionmed.data.decode.decode_image` (EXIF orientation
    applied). Raises ``FileNotFoundError`` without a path, ``ImageDecodeError`` for a bad file."""
    if ref.image is not None:
        return to_rgb(ref.image)
    if ref.opener is not None:
        return to_rgb(ref.opener())
    if not ref.path:
        raise FileNotFoundError("no image path")
    return to_rgb(decode_image(ref.path)[0])  # the one decoder: EXIF orientation applied, 8-bit


class _Images(Dataset):
    def __init__(self, refs: list[ImageRef], pre: Preprocessor, boxes: dict[str, list] | None):
        self.refs, self.pre, self.boxes = refs, pre, boxes

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        ref = self.refs[i]
        try:
            image = open_image(ref)
        except Exception as err:  # noqa: BLE001 - a bad file is reported, not fatal
            return {"key": ref.key, "error": f"{type(err).__name__}: {err}"}
        boxes, notes = [], []
        if self.boxes is not None:
            w, h = image.size
            given = self.boxes.get(ref.key, [])
            boxes = [b for b in (sanitize_box(list(b), w, h)[0] for b in given) if b is not None]
            if len(boxes) < len(given):
                notes.append(f"{len(given) - len(boxes)} of its {len(given)} boxes lie outside the {w}x{h} image or have "
                             "no area; not used")
            if len(boxes) > self.pre.max_rois:
                notes.append(f"{len(boxes) - self.pre.max_rois} box(es) beyond the model's max_rois = {self.pre.max_rois} "
                             "not used")
                boxes = boxes[: self.pre.max_rois]
        out = self.pre(image, boxes)
        return {"key": ref.key, "image": out["image"], "boxes": out["boxes"], "crops": out["crops"], "size": image.size,
                "pixel_boxes": [list(b) for b in boxes], "box_notes": notes}


@dataclass
class PreparedImages:
    """One loader step of :class:`_Images`: the readable images as an :class:`ImageBatch`
    (``None`` when none was readable), their prepared samples in the same order (``key``,
    ``size``, ``pixel_boxes``, ``box_notes``) and the unreadable ones ``(key, why)``."""

    batch: ImageBatch | None
    samples: list[dict]
    bad: list[tuple[str, str]]


def _collate(samples: list[dict]) -> PreparedImages:
    ok = [s for s in samples if "error" not in s]
    bad = [(s["key"], s["error"]) for s in samples if "error" in s]
    return PreparedImages(ImageBatch.from_samples(ok) if ok else None, ok, bad)


def _loader(refs, pre, boxes, batch_size, num_workers):
    return DataLoader(_Images(refs, pre, boxes), batch_size=batch_size, shuffle=False, collate_fn=_collate,
                      num_workers=num_workers)


@torch.no_grad()
def propose_boxes(model, refs: list[ImageRef], phrases: list[str], k: int | None = None, batch_size: int = 32,
                  num_workers: int = 0, threshold: float = 0.5) -> dict[str, list[list[float]]]:
    """Self-proposed boxes (original pixels) per image key, from patch–text similarity."""
    if not phrases:
        raise ValueError("self-proposed ROIs need at least one proposal phrase")
    pre = Preprocessor.from_model(model)
    k = k or pre.max_rois
    text = model.encode_text(phrases)
    device = model.logit_scale.device
    out: dict[str, list[list[float]]] = {}
    for step in _loader(refs, pre, None, batch_size, num_workers):
        if step.batch is None:
            continue
        maps = similarity_maps(model, step.batch.images.to(device), text)
        for s, m in zip(step.samples, maps):
            out[s["key"]] = propose_from_maps(m, Geometry(*s["size"], pre.image_size), k, threshold)
    return out


@dataclass
class RoiPlan:
    """How a set of images gets its test-time ROIs (see :func:`resolve_rois`)."""

    effective: str  # the ROI mode that runs: none / given / self
    label: str  # the mode as results state it (says when a model without an ROI path ran as none)
    pre: Preprocessor  # the model's preprocessing (no crops prepared when effective == none)
    boxes: dict[str, list] | None  # pixel boxes per image key, None for none

    @property
    def use_rois(self) -> bool:
        return self.effective != "none"


def resolve_rois(model, refs: list[ImageRef], rois: str, phrases: list[str] | None = None, batch_size: int = 32,
                 num_workers: int = 0) -> RoiPlan:
    """The effective test-time ROIs of ``refs``: a model without an ROI path runs as
    ``none``; ``given`` takes the refs' boxes; ``self`` proposes them (:func:`propose_boxes`)."""
    if rois not in ROI_MODES:
        raise ValueError(f"test-time ROIs {rois!r} is not one of {ROI_MODES}")
    effective = rois if model.roi_processor is not None else "none"
    pre = Preprocessor.from_model(model)
    boxes = None
    if effective == "none":
        pre = replace(pre, roi_mode="none")  # no crops to prepare
    elif effective == "given":
        boxes = {r.key: r.boxes for r in refs}
    else:
        boxes = propose_boxes(model, refs, phrases or [], batch_size=batch_size, num_workers=num_workers)
    label = effective + ("" if effective == rois else f" (asked {rois}; the model has no ROI path)")
    return RoiPlan(effective, label, pre, boxes)


def prepare_all(refs: list[ImageRef], plan: RoiPlan) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Read and preprocess every image once: ({key: prepared sample}, [(key, why unreadable)])."""
    data = _Images(refs, plan.pre, plan.boxes)
    cache, missing = {}, []
    for i in range(len(data)):
        s = data[i]
        if "error" in s:
            missing.append((s["key"], s["error"]))
        else:
            cache[s["key"]] = s
    return cache, missing


@torch.no_grad()
def embed_images(model, refs: list[ImageRef], rois: str = "none", batch_size: int = 32, num_workers: int = 0,
                 phrases: list[str] | None = None, progress: bool = False) -> ImageSetEmbeddings:
    """Embed ``refs`` with ``model`` (eval mode, no gradients) using test-time ROIs ``rois``."""
    model.eval()
    plan = resolve_rois(model, refs, rois, phrases, batch_size, num_workers)
    keys, g, f, rp, nr, missing, used, box_problems = [], [], [], [], [], [], {}, []
    for step in tqdm(_loader(refs, plan.pre, plan.boxes, batch_size, num_workers), desc="embed images", disable=not progress, leave=False):
        missing += step.bad
        if step.batch is None:
            continue
        emb = model.encode_batch(step.batch, plan.use_rois)
        g.append(emb.global_.cpu())
        f.append(emb.fused.cpu())
        pooled, n = pool_rois(emb)
        rp.append(pooled.cpu())
        nr.append(n.cpu())
        for s in step.samples:
            keys.append(s["key"])
            used[s["key"]] = s["pixel_boxes"]
            box_problems += [(s["key"], note) for note in s.get("box_notes", [])]
    for key, why in missing:
        log.warning("image %s skipped: %s", key, why)
    if box_problems:
        log.warning("%d image(s) had given boxes that were not used, e.g. %s: %s", len(box_problems), *box_problems[0])
    d = model.cfg.embed_dim
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, d)  # noqa: E731
    return ImageSetEmbeddings(keys, cat(g), cat(f), cat(rp), torch.cat(nr) if nr else torch.zeros(0, dtype=torch.long),
                              plan.label, missing, used, box_problems)


@torch.no_grad()
def window_scores(model, pre, image, boxes: list[list[float]], text_emb: torch.Tensor) -> torch.Tensor:
    """(K, T) cosine similarity of each window's region embedding with each phrase
    (``pre``: the model's own :class:`~regionmed.data.transforms.Preprocessor`)."""
    if model.roi_processor is not None:
        regions = model.encode_batch(ImageBatch.from_samples([pre(image, boxes)]), use_rois=True).roi[0]
    else:  # no ROI path: each window's crop as a whole image
        xs = torch.stack([pre(image.crop(tuple(int(round(v)) for v in b)))["image"] for b in boxes]).to(model.logit_scale.device)
        regions = torch.cat([model.encode_image(xs[i : i + 64], use_rois=False).global_ for i in range(0, len(xs), 64)])
    return regions.float() @ text_emb.float().T
