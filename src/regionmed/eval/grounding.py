"""Grounding: phrase → similarity map → a point and a box, and how they are scored.

Two read-outs of the same model:

* ``patch``: the cosine similarity between the phrase embedding and every cell of the
  feature grid projected into the joint space (:meth:`RegionMedCLIP.patch_embeddings`,
  after the grid head that the ``grounding`` loss term trains), :func:`locate`;
* ``windows``: region-level scoring. Square windows at several scales, centred on an
  equally spaced lattice, are embedded the way the model embeds a region (its ROI path;
  a model without one embeds the window's crop as a whole image) and scored against the
  phrase, :func:`window_boxes` / :func:`locate_windows`.

Both read-outs take their **point** at the centre of the maximum of an equally spaced
lattice (cells inside the image, or window centres), so under random scores the point is
uniform over the image at the lattice's resolution: no read-out prefers a place whatever
the model says (``tests/test_grounding_readouts.py``). Equal maxima are all kept
(``ties``) and scored by their share inside a box.

Metrics against annotated boxes (:func:`summarise`): the pointing game; IoU hit rates at
0.1, 0.3 and 0.5 of the predicted box with the best-matching annotated box; the
contrast-to-noise ratio of the map inside vs outside the boxes (:func:`contrast_to_noise`,
BioViL's CNR), each with a bootstrap 95% CI over phrases, beside references that see no
pixels (the centre point; the phrase's mean training box, :func:`location_prior`; the point
its training boxes cover most often, :func:`coverage_prior`) or no phrase (the model's mean
map over the split's phrases), with paired differences.
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


def _tied_cells(values: np.ndarray, valid: np.ndarray) -> list[tuple[int, int]]:
    """Every valid cell at the maximum of ``values`` (row-major order)."""
    masked = np.where(valid, values, -np.inf)
    peak = masked.max()
    ys, xs = np.nonzero(masked == peak)
    return list(zip(ys.tolist(), xs.tolist()))


def locate(sim: torch.Tensor, geom: Geometry, threshold: float = 0.5) -> dict:
    """One ``(h, w)`` patch–text map -> ``{"point", "ties", "box", "peak", "map"}`` in original pixels.

    The **point** is the centre of the map's largest cell among the cells whose centre lies inside
    the image (the letterbox padding is masked before the arg-max, as BioViL's NaN and RadZero's
    -999 do). Valid cells are an equally spaced lattice over the image, so under random scores
    the point is uniform over it: no position is favoured (``tests/test_grounding_readouts.py``).
    The map is not smoothed before the arg-max: a Gaussian (BioViL's sigma = 1.5 cells), even
    renormalised at the border, sends the arg-max of random maps to the border (measured: 68% in
    the outer eighth of an 8x8 grid, against 44% uniform). ``ties``: every maximal cell's centre
    (more than one only for maps with exactly equal values); the scorer counts their share inside
    a box (:func:`score_prediction`), so a tie is never a free hit.

    The **box** bounds the 8-connected component around the point of the map upsampled
    (bilinear) to the letterboxed input, over the image's part only, thresholded at
    ``min + threshold * (max - min)``; it is never empty (it holds the point). ``map``: that
    upsampled map over the image's part (the input's resolution, bounded by the model's size)."""
    h, w = sim.shape[-2:]
    grid = sim.detach().float().cpu().numpy()
    size = geom.size
    ox, oy, nw, nh = geom.content
    cy = (np.arange(h) + 0.5) * size / h
    cx = (np.arange(w) + 0.5) * size / w
    valid = ((cy >= oy) & (cy <= oy + nh))[:, None] & ((cx >= ox) & (cx <= ox + nw))[None, :]
    if not valid.any():  # an image thinner than a cell: its nearest cells
        valid = ((np.abs(cy - (oy + nh / 2)) <= size / h / 2 + 1e-9)[:, None]
                 & (np.abs(cx - (ox + nw / 2)) <= size / w / 2 + 1e-9)[None, :])
    ties = _tied_cells(grid, valid)
    s = geom.scale
    tie_points = [((float(cx[j]) - ox) / s, (float(cy[i]) - oy) / s) for i, j in ties]
    up = F.interpolate(torch.from_numpy(grid)[None, None], size=(size, size), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    content = up[oy : oy + nh, ox : ox + nw]
    lo, hi = float(content.min()), float(content.max())
    py = min(max(int(cy[ties[0][0]] - oy), 0), nh - 1)
    px = min(max(int(cx[ties[0][1]] - ox), 0), nw - 1)
    mask = content >= min(lo + threshold * (hi - lo), float(content[py, px]))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    comp = labels == labels[py, px]
    ys, xs = np.nonzero(comp)
    box = [xs.min() / s, ys.min() / s, (xs.max() + 1) / s, (ys.max() + 1) / s]
    box = [min(max(v, 0.0), float(geom.width if i % 2 == 0 else geom.height)) for i, v in enumerate(box)]
    return {"point": tie_points[0], "ties": tie_points, "box": box, "peak": float(grid[ties[0]]), "map": content}


def window_lattice(width: int, height: int, lattice: int = 8) -> tuple[int, int]:
    """``(n_x, n_y)``: the window centres per row and per column, ``lattice`` along the long side."""
    long = max(width, height)
    return max(1, round(lattice * width / long)), max(1, round(lattice * height / long))


def window_boxes(width: int, height: int, scales=(0.25, 0.4, 0.6), lattice: int = 8) -> list[list[float]]:
    """Square windows (original pixels) centred on an ``n_x x n_y`` lattice of equally spaced
    centres (:func:`window_lattice`; centre ``(i + 0.5) / n_x`` of the width, likewise down), one
    window per centre and scale, of side ``scale * max(width, height)``, clipped to the image.
    Order: scale, then row, then column (``len(scales) * n_x * n_y`` windows). Every centre has
    the same number of windows, which is what keeps :func:`locate_windows` unbiased."""
    nx, ny = window_lattice(width, height, lattice)
    side_ref = max(width, height)
    out = []
    for sc in scales:
        half = max(1.0, sc * side_ref / 2)
        for j in range(ny):
            cy = (j + 0.5) * height / ny
            for i in range(nx):
                cx = (i + 0.5) * width / nx
                out.append([round(max(0.0, cx - half), 1), round(max(0.0, cy - half), 1),
                            round(min(float(width), cx + half), 1), round(min(float(height), cy + half), 1)])
    return out


def locate_windows(scores: torch.Tensor, boxes: list[list[float]], width: int, height: int, lattice: int = 8) -> dict:
    """One phrase's window scores (``(K,)``, the windows of :func:`window_boxes` with the same
    ``lattice``) -> ``{"point", "ties", "box", "peak", "map"}`` in original pixels.

    ``map``: the ``(n_y, n_x)`` lattice, each centre's best score over the scales. The **point**
    is the centre of the lattice's maximum: every centre has the same number of windows, so under
    random scores it is uniform over the equally spaced centres (an earlier read-out that averaged
    each pixel's covering windows favoured the border: pixels there are covered by fewer windows;
    measured 3.1% of points in the central 40% square instead of 16%). ``ties``: every maximal
    centre. The **box** is the best-scoring window."""
    nx, ny = window_lattice(width, height, lattice)
    sc = scores.detach().float().cpu().numpy()
    if sc.size != len(boxes) or sc.size % (nx * ny):
        raise ValueError(f"{sc.size} window scores for {len(boxes)} windows on a {nx}x{ny} lattice")
    grid = sc.reshape(-1, ny, nx).max(0)
    ties = _tied_cells(grid, np.ones_like(grid, dtype=bool))
    tie_points = [((i + 0.5) * width / nx, (j + 0.5) * height / ny) for j, i in ties]
    best = int(np.argmax(sc))
    return {"point": tie_points[0], "ties": tie_points, "box": list(boxes[best]), "peak": float(sc[best]), "map": grid}


def location_prior(refs) -> dict[str, list[float]]:
    """Per phrase, the mean of its training boxes in relative coordinates [0, 1] (the
    "mean-box" prior; its point is the box's centre).
    ``refs``: ``(pixel boxes, labels, (width, height))`` per training image."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for boxes, labels, (w, h) in refs:
        for b, lab in zip(boxes, labels):
            rel = np.array([b[0] / w, b[1] / h, b[2] / w, b[3] / h], dtype=np.float64)
            sums[lab] = sums.get(lab, 0) + rel
            counts[lab] = counts.get(lab, 0) + 1
    return {lab: list(sums[lab] / counts[lab]) for lab in sums}


def coverage_prior(refs, cells: int = 64) -> dict[str, list[float]]:
    """Per phrase, the point its training boxes cover most often (the "most-covered point"
    prior), relative ``[x, y]`` in [0, 1]: each box is drawn on a ``cells x cells`` grid of the
    image in relative coordinates (a cell counts when its centre lies inside), and the prior is
    the centre of the most covered cell; equally covered cells give the mean of their centres
    when that centre is itself one of them, else the first of them (row-major).

    Unlike the mean box, it stays on a finding that occurs on either side (the mean of left and
    right lesions lies on the mediastinum). ``refs`` as for :func:`location_prior`."""
    grids: dict[str, np.ndarray] = {}
    centres = (np.arange(cells) + 0.5) / cells
    for boxes, labels, (w, h) in refs:
        for b, lab in zip(boxes, labels):
            g = grids.setdefault(lab, np.zeros((cells, cells)))
            inside_x = (centres >= b[0] / w) & (centres <= b[2] / w)
            inside_y = (centres >= b[1] / h) & (centres <= b[3] / h)
            g += inside_y[:, None] & inside_x[None, :]
    out = {}
    for lab, g in grids.items():
        ys, xs = np.nonzero(g == g.max())
        my, mx = int(round(ys.mean() - 0.5 + 1e-9)), int(round(xs.mean() - 0.5 + 1e-9))
        if g[my, mx] == g.max():
            y, x = my, mx
        else:
            y, x = ys[0], xs[0]
        out[lab] = [float(centres[x]), float(centres[y])]
    return out


def point_in_box(p, box) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def score_prediction(point, box, gt_boxes: list, ties: list | None = None) -> dict:
    """``{"hit", "iou"}`` of a predicted point and box against a phrase's annotated boxes.

    ``hit``: 1.0 when the point lies in one of ``gt_boxes`` (the pointing game), else 0.0; with
    ``ties`` (every point at the map's maximum), the share of them that lies in one: the
    expected hit of a random pick among equal maxima, so a flat map scores what a random point
    would, never a free hit. ``iou``: the best IoU of ``box`` with ``gt_boxes`` (0 without any)."""
    best = max((box_iou(box, g) for g in gt_boxes), default=0.0)
    points = ties if ties else [point]
    hit = sum(any(point_in_box(p, g) for g in gt_boxes) for p in points) / len(points)
    return {"hit": float(hit), "iou": float(best)}


def contrast_to_noise(values: np.ndarray, gt_boxes: list, width: int, height: int) -> float:
    """The contrast-to-noise ratio of a map inside vs outside a phrase's boxes (Boecking et al.,
    "Making the Most of Text Semantics to Improve Biomedical Vision–Language Processing",
    ECCV 2022, the BioViL CNR): ``(mean_in - mean_out) / sqrt(var_in + var_out)`` over the map's
    pixels, the map (any grid over the whole ``width x height`` image) resized to the image's
    aspect at a bounded size (long side 256). Signed, where BioViL takes the absolute value: a
    map that is low on the box is not rewarded. 0.0 for a flat map; NaN when the boxes cover
    all of the image or none of it."""
    long = 256
    sw, sh = max(1, round(long * width / max(width, height))), max(1, round(long * height / max(width, height)))
    m = heatmap_at(values, sw, sh, scale=False)
    inside = np.zeros((sh, sw), dtype=bool)
    for b in gt_boxes:
        x0, y0 = int(np.floor(b[0] / width * sw)), int(np.floor(b[1] / height * sh))
        x1, y1 = int(np.ceil(b[2] / width * sw)), int(np.ceil(b[3] / height * sh))
        inside[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)] = True
    if inside.all() or not inside.any():
        return float("nan")
    a, o = m[inside].astype(np.float64), m[~inside].astype(np.float64)
    den = np.sqrt(a.var() + o.var())
    return 0.0 if den == 0 else float((a.mean() - o.mean()) / den)


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


IOU_LEVELS = (0.1, 0.3, 0.5)
# The references scored beside the model: (key in a row, name in the results)
REFERENCES = (("base", "centre"), ("prior", "mean_box_prior"), ("cover", "most_covered_prior"), ("blind", "phrase_blind"))


def summarise(rows: list[dict], n_boot: int = 0, seed: int = 0) -> dict:
    """Pointing game, IoU hit rates at 0.1 / 0.3 / 0.5, mean IoU and mean CNR over scored phrases,
    with the references that see no pixels or no phrase beside them.

    A row: ``hit`` (0–1, :func:`score_prediction`), ``iou``, ``cnr`` (NaN = undefined, left out of
    the CNR mean and counted in ``cnr_undefined``), and per reference ``<key>_hit`` (``base``: the
    centre point; ``prior``: the phrase's mean training box, also ``prior_iou``; ``cover``: the
    point its training boxes cover most; ``blind``: the model's mean map over all phrases of the
    split, what the phrase itself adds) — None where the reference has nothing for the phrase.
    Every row is counted: nothing is dropped for an empty or flat map.

    With ``n_boot > 0``, ``"intervals"`` holds percentile bootstrap 95% intervals (phrases
    resampled with replacement, ``n_boot`` times with ``seed``, :mod:`regionmed.eval.stats`) of
    every rate, and ``"differences"`` the model's pointing minus each reference's, paired on the
    same resamples over the phrases that reference covers. The keys of earlier versions
    (``baseline_centre_pointing``, ``baseline_prior_*``) are kept."""
    n = len(rows)
    if n == 0:
        return {"n": 0}
    hit = np.array([float(r["hit"]) for r in rows])
    iou = np.array([float(r["iou"]) for r in rows])
    cnr = np.array([float(r.get("cnr", np.nan)) for r in rows])
    out: dict = {"n": n, "pointing_game": float(hit.mean())}
    for t in IOU_LEVELS:
        out[f"iou@{t}"] = float((iou >= t).mean())
    out["mean_iou"] = float(iou.mean())
    defined = np.isfinite(cnr)
    out["cnr"] = float(cnr[defined].mean()) if defined.any() else None
    out["cnr_undefined"] = int((~defined).sum())
    out["baseline_centre_pointing"] = float(np.mean([float(r["base_hit"]) for r in rows]))
    out["baseline_whole_image_iou@0.3"] = float(np.mean([r["base_iou"] >= 0.3 for r in rows]))
    out["baseline_whole_image_iou@0.5"] = float(np.mean([r["base_iou"] >= 0.5 for r in rows]))
    references: dict = {}
    cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (row indices, values)
    for key, name in REFERENCES:
        has = np.array([i for i, r in enumerate(rows) if r.get(f"{key}_hit") is not None], dtype=int)
        if not len(has):
            continue
        vals = np.array([float(rows[i][f"{key}_hit"]) for i in has])
        references[name] = {"n": int(len(has)), "pointing_game": float(vals.mean()),
                            "model_pointing_game": float(hit[has].mean())}
        cols[name] = (has, vals)
    if "mean_box_prior" in references:
        has = cols["mean_box_prior"][0]
        piou = np.array([float(rows[i]["prior_iou"]) for i in has])
        references["mean_box_prior"].update({f"iou@{t}": float((piou >= t).mean()) for t in IOU_LEVELS})
        out.update({"baseline_prior_n": int(len(has)), "baseline_prior_pointing": references["mean_box_prior"]["pointing_game"],
                    "baseline_prior_iou@0.3": float((piou >= 0.3).mean()), "baseline_prior_iou@0.5": float((piou >= 0.5).mean())})
    out["references"] = references
    if n_boot > 0:
        counts = bootstrap_counts(n, n_boot, seed)
        ci = {"pointing_game": mean_with_ci(hit, counts)["ci"], "mean_iou": mean_with_ci(iou, counts)["ci"],
              "baseline_centre_pointing": mean_with_ci([float(r["base_hit"]) for r in rows], counts)["ci"]}
        for t in IOU_LEVELS:
            ci[f"iou@{t}"] = mean_with_ci((iou >= t).astype(float), counts)["ci"]
        if defined.any():
            ci["cnr"] = mean_with_ci(cnr[defined], counts[:, defined])["ci"]
        differences = {}
        for name, (has, vals) in cols.items():
            sub = counts[:, has]
            ci[f"{name}_pointing"] = mean_with_ci(vals, sub)["ci"]
            diff = mean_with_ci(hit[has] - vals, sub)
            differences[name] = {"pointing_game": diff["value"], "ci": diff["ci"], "n": int(len(has))}
        if "mean_box_prior" in cols:
            has = cols["mean_box_prior"][0]
            sub = counts[:, has]
            ci["baseline_prior_pointing"] = ci["mean_box_prior_pointing"]
            ci["baseline_prior_iou@0.3"] = mean_with_ci([float(rows[i]["prior_iou"] >= 0.3) for i in has], sub)["ci"]
        out["intervals"] = ci  # {rate: [lo, hi]}
        out["differences"] = differences  # model minus reference, paired
        out["n_boot"] = n_boot
    return out


def heatmap_at(values, width: int, height: int, scale: bool = True) -> np.ndarray:
    """A read-out's map (any (h, w) grid covering the whole image: :func:`locate`'s or
    :func:`locate_windows`' ``"map"``) as (height, width) float32: resized (bilinear) to the
    image, then (``scale``) min–max scaled to [0, 1] (a constant map gives zeros)."""
    from PIL import Image

    m = Image.fromarray(np.asarray(values, dtype=np.float32), "F").resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(m, dtype=np.float32)
    if not scale:
        return arr
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
