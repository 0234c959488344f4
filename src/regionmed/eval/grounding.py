"""Grounding: phrase → similarity map → a point and a box.

Two read-outs of the same model, each scored against the same boxes:

* ``patch``: the patch–text map described below;
* ``windows``: region-level scoring. Square windows at several scales slide over
  the image; each is embedded the way the model embeds a region (its ROI path:
  crop or RoIAlign feature + box geometry + context attention; a model without an
  ROI path embeds the window's crop as a whole image) and scored against the
  phrase. The **box** is the best-scoring window and the **point** the maximum of
  the map that gives every pixel the mean score of the windows covering it. This
  reads out what the region loss trains (region embeddings against region
  captions); the patch grid is never trained directly by any loss.

The map is the cosine similarity between the phrase embedding and every cell of
the image tower's patch grid projected into the joint space
(:meth:`RegionMedCLIP.patch_embeddings`). It is upsampled (bilinear) to the
letterboxed input, the padding is excluded, and it is mapped back to the pixels of
the original image. The **point** is the map's maximum; the **box** bounds the
connected component (8-connectivity) around the maximum of the map thresholded at
``min + threshold * (max - min)``.

Metrics against annotated boxes (SLAKE ``detection.json``, or the given regions of a
MedRegion split): pointing game (the point falls inside a box of the phrase's class)
and IoU ≥ 0.3 / 0.5 of the box with the best-matching box of that class, each with a
bootstrap 95% CI over phrases. Two references that see no pixels are scored
alongside: a fixed centre point / whole-image box, and a location prior (the
phrase's mean relative box over the same dataset's *training* boxes,
:func:`location_prior`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from regionmed.data.boxes import box_iou, nms
from regionmed.data.metadata import save_png
from regionmed.eval.overlay import display_scale, render_overlay
from regionmed.eval.stats import bootstrap_counts, mean_with_ci


@dataclass
class Geometry:
    """Letterbox placement of an original ``width`` x ``height`` image in a ``size`` square."""

    width: int
    height: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.width, self.height)

    @property
    def content(self) -> tuple[int, int, int, int]:
        nw, nh = max(1, round(self.width * self.scale)), max(1, round(self.height * self.scale))
        ox, oy = (self.size - nw) // 2, (self.size - nh) // 2
        return ox, oy, nw, nh

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        ox, oy, _, _ = self.content
        return (x - ox) / self.scale, (y - oy) / self.scale


@torch.no_grad()
def similarity_maps(model, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised images, (T, D) text embeddings → (B, T, h, w) cosine maps."""
    patches = model.patch_embeddings(images)  # (B, h, w, D)
    return torch.einsum("bhwd,td->bthw", patches, text_emb.to(patches.dtype))


def locate(sim: torch.Tensor, geom: Geometry, threshold: float = 0.5) -> dict:
    """One (h, w) map → {"point": (x, y), "box": [x0, y0, x1, y1] (original pixels), "peak"}."""
    size = geom.size
    up = F.interpolate(sim[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    ox, oy, nw, nh = geom.content
    content = up[oy : oy + nh, ox : ox + nw]
    peak_idx = np.unravel_index(int(np.argmax(content)), content.shape)
    lo, hi = float(content.min()), float(content.max())
    mask = content >= lo + threshold * (hi - lo)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    comp = labels == labels[peak_idx]
    ys, xs = np.nonzero(comp)
    s = geom.scale
    point = ((peak_idx[1] + 0.5) / s, (peak_idx[0] + 0.5) / s)
    box = [xs.min() / s, ys.min() / s, (xs.max() + 1) / s, (ys.max() + 1) / s]
    box = [min(max(v, 0.0), float(geom.width if i % 2 == 0 else geom.height)) for i, v in enumerate(box)]
    return {"point": point, "box": box, "peak": hi, "map": content}


def window_boxes(width: int, height: int, scales=(0.25, 0.4, 0.6), stride: float = 0.5) -> list[list[float]]:
    """Square sliding windows (original pixels): side ``scale * max(width, height)``,
    moved by ``stride`` of the side, clipped to the image, duplicates removed."""
    side_ref = max(width, height)
    out, seen = [], set()
    for sc in scales:
        side = max(2.0, sc * side_ref)
        step = max(1.0, stride * side)

        def starts(extent):
            if side >= extent:
                return [0.0]
            n = int(np.ceil((extent - side) / step)) + 1
            return list(np.linspace(0.0, extent - side, n))

        for y in starts(height):
            for x in starts(width):
                b = [round(x, 1), round(y, 1), round(min(x + side, width), 1), round(min(y + side, height), 1)]
                if tuple(b) not in seen:
                    seen.add(tuple(b))
                    out.append(b)
    return out


def locate_windows(scores: torch.Tensor, boxes: list[list[float]], width: int, height: int, cells: int = 64) -> dict:
    """One phrase's (K,) window scores → {"point", "box", "peak", "map"} (map: mean score per pixel)."""
    sx, sy = cells / width, cells / height
    acc = np.zeros((cells, cells))
    cnt = np.zeros((cells, cells))
    sc = scores.cpu().numpy()
    for v, b in zip(sc, boxes):
        x0, y0 = int(np.floor(b[0] * sx)), int(np.floor(b[1] * sy))
        x1, y1 = max(x0 + 1, int(np.ceil(b[2] * sx))), max(y0 + 1, int(np.ceil(b[3] * sy)))
        acc[y0:y1, x0:x1] += v
        cnt[y0:y1, x0:x1] += 1
    m = np.where(cnt > 0, acc / np.maximum(cnt, 1), sc.min())
    py, px = np.unravel_index(int(np.argmax(m)), m.shape)
    best = int(np.argmax(sc))
    return {"point": ((px + 0.5) / sx, (py + 0.5) / sy), "box": list(boxes[best]), "peak": float(sc[best]), "map": m}


def location_prior(refs) -> dict[str, list[float]]:
    """Per phrase, the mean of its training boxes in relative coordinates [0, 1].
    ``refs``: ``(pixel boxes, labels, (width, height))`` per training image."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for boxes, labels, (w, h) in refs:
        for b, lab in zip(boxes, labels):
            rel = np.array([b[0] / w, b[1] / h, b[2] / w, b[3] / h], dtype=np.float64)
            sums[lab] = sums.get(lab, 0) + rel
            counts[lab] = counts.get(lab, 0) + 1
    return {lab: list(sums[lab] / counts[lab]) for lab in sums}


def point_in_box(p, box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def score_prediction(point, box, gt_boxes: list) -> dict:
    best = max((box_iou(box, g) for g in gt_boxes), default=0.0)
    return {"hit": any(point_in_box(point, g) for g in gt_boxes), "iou": best}


def propose_from_maps(maps: torch.Tensor, geom: Geometry, k: int, threshold: float = 0.5, min_side: float = 2.0) -> list[list[float]]:
    """Self-proposed ROIs: one box per phrase map (T, h, w), ranked by the map's peak,
    de-duplicated by NMS, at most ``k``."""
    cands, scores = [], []
    for t in range(maps.shape[0]):
        loc = locate(maps[t], geom, threshold)
        b = loc["box"]
        if b[2] - b[0] >= min_side and b[3] - b[1] >= min_side:
            cands.append(b)
            scores.append(loc["peak"])
    keep = nms(cands, scores)[:k]
    return [cands[i] for i in keep]


def summarise(rows: list[dict], n_boot: int = 0, seed: int = 0) -> dict:
    """Pointing game and IoU hit rates over scored phrases (+ the centre and prior references).

    With ``n_boot > 0``, ``"intervals"`` holds a percentile bootstrap 95% interval of each rate
    (and of the mean IoU): phrases are resampled with replacement, ``n_boot`` times with
    ``seed`` (:mod:`regionmed.eval.stats`); the prior's rates use the same resamples
    restricted to the phrases that have a prior."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    out = {
        "n": n,
        "pointing_game": float(sum(bool(r["hit"]) for r in rows) / n),
        "iou@0.3": float(sum(r["iou"] >= 0.3 for r in rows) / n),
        "iou@0.5": float(sum(r["iou"] >= 0.5 for r in rows) / n),
        "mean_iou": float(np.mean([r["iou"] for r in rows])),
        "baseline_centre_pointing": float(sum(bool(r["base_hit"]) for r in rows) / n),
        "baseline_whole_image_iou@0.3": float(sum(r["base_iou"] >= 0.3 for r in rows) / n),
        "baseline_whole_image_iou@0.5": float(sum(r["base_iou"] >= 0.5 for r in rows) / n),
    }
    prior = [r for r in rows if r.get("prior_hit") is not None]
    if prior:  # the phrase's mean training box (a location prior that sees no pixels)
        out.update({
            "baseline_prior_n": len(prior),
            "baseline_prior_pointing": float(sum(bool(r["prior_hit"]) for r in prior) / len(prior)),
            "baseline_prior_iou@0.3": float(sum(r["prior_iou"] >= 0.3 for r in prior) / len(prior)),
            "baseline_prior_iou@0.5": float(sum(r["prior_iou"] >= 0.5 for r in prior) / len(prior)),
        })
    if n_boot > 0:
        counts = bootstrap_counts(n, n_boot, seed)
        cols = {
            "pointing_game": [float(bool(r["hit"])) for r in rows],
            "iou@0.3": [float(r["iou"] >= 0.3) for r in rows],
            "iou@0.5": [float(r["iou"] >= 0.5) for r in rows],
            "mean_iou": [float(r["iou"]) for r in rows],
            "baseline_centre_pointing": [float(bool(r["base_hit"])) for r in rows],
        }
        ci = {k: mean_with_ci(v, counts)["ci"] for k, v in cols.items()}
        has = [i for i, r in enumerate(rows) if r.get("prior_hit") is not None]
        if has:
            sub = counts[:, has]
            ci["baseline_prior_pointing"] = mean_with_ci([float(bool(rows[i]["prior_hit"])) for i in has], sub)["ci"]
            ci["baseline_prior_iou@0.3"] = mean_with_ci([float(rows[i]["prior_iou"] >= 0.3) for i in has], sub)["ci"]
        out["intervals"] = ci  # {rate: [lo, hi]}
        out["n_boot"] = n_boot
    return out


def heatmap_at(values, width: int, height: int) -> np.ndarray:
    """A read-out's map (any (h, w) grid covering the whole image: :func:`locate`'s or
    :func:`locate_windows`' ``"map"``) as (height, width) float32 in [0, 1]: resized
    (bilinear) to the image, then min–max scaled (a constant map gives zeros)."""
    from PIL import Image

    m = Image.fromarray(np.asarray(values, dtype=np.float32), "F").resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(m, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return np.zeros_like(arr) if hi <= lo else np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def save_overlay(image, result: dict, gt_boxes: list, phrase: str, path, max_side: int = 512) -> None:
    """A PNG at ``path``: the image in grey, the similarity map (jet, opacity 0.35), the
    annotated box(es) in green, the predicted box and point in red, ``phrase`` above the
    predicted box; long side at most ``max_side`` pixels
    (:func:`regionmed.eval.overlay.render_overlay`)."""
    w, h = image.size
    s = display_scale(w, h, max_side)
    heat = heatmap_at(result["map"], max(1, round(w * s)), max(1, round(h * s)))  # at the overlay's size
    save_png(render_overlay(image, heat, box=result["box"], peak=result["point"], label=phrase,
                            threshold=0.0, opacity=0.35, cmap="jet", gray=True, color=(255, 0, 0), max_side=max_side,
                            reference_boxes=gt_boxes, reference_color=(0, 255, 0)), path)
