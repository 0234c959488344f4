"""Synthetic, region-annotated, radiograph-like chest images ("phantoms").

Each phantom is a frontal chest "radiograph": a dark background, a body outline,
two dark lung fields, a bright mediastinum and heart, faint rib arcs, lung
texture, smooth intensity variation and noise. Zero to a few findings (nodule,
mass, opacity, effusion) are drawn inside named lung zones, and every text of the
record (region captions, report, summary, negatives) is built from the same
list of facts that drew the pixels, so text and image never disagree.

Conventions:

* **side** is the patient's side, in the radiological convention: the patient's
  RIGHT lung is on the IMAGE LEFT;
* **level** (upper / middle / lower) is a third of the lung field's height
  (apex to the lowest point of the lung outline);
* at most one finding per zone; an effusion is only ever in a lower zone.

An image depends only on ``(index, seed, split, config)``: it is drawn from
``np.random.default_rng([seed, split_code, index])``, so image ``i`` is the same
whatever the size of the dataset it is written into.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from regionmed.data.schema import SCHEMA_VERSION, validate_record
from regionmed.data.shards import MedRegionWriter, write_manifest

__all__ = [
    "PhantomConfig",
    "NODULE_RADIUS",
    "PhantomRender",
    "Finding",
    "KNOWN_FINDINGS",
    "SIDES",
    "LEVELS",
    "NORMAL_REPORT",
    "NORMAL_SUMMARY",
    "generate_phantom",
    "render_phantom",
    "write_phantom_dataset",
    "caption_for",
    "finding_contrast",
]

GENERATOR = "regionmed.data.phantoms"
GENERATOR_VERSION = 1

KNOWN_FINDINGS = ("nodule", "mass", "opacity", "effusion")
SIDES = ("right", "left")  # the patient's side; the patient's right is on the image left
LEVELS = ("upper", "middle", "lower")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
REGION_RULES = ("laterality", "zone", "finding", "size", "severity", "negation")
IMAGE_RULES = ("laterality", "negation")

HEART_SENTENCE = "The heart size is normal."
NORMAL_REPORT = f"The lungs are clear. No focal abnormality. {HEART_SENTENCE}"
NORMAL_SUMMARY = "No acute findings."

# Finding kinds a radiologist could mistake for one another (for "finding" negatives).
CONFUSABLE = {
    "nodule": ("mass",),
    "mass": ("nodule",),
    "opacity": ("effusion", "mass"),  # effusion only where one can be (a lower zone)
    "effusion": ("opacity",),
}
# The descriptor(s) a swapped finding takes: size words for nodule/mass, severity for opacity.
_SWAP_WORDS = {
    ("nodule", "mass"): lambda w: (w,),
    ("mass", "nodule"): lambda w: (w,),
    ("opacity", "mass"): lambda w: ("small" if w == "patchy" else "large",),
    ("effusion", "opacity"): lambda w: ("dense", "patchy"),
    ("opacity", "effusion"): lambda w: (None,),
}
_OTHER_WORD = {"small": "large", "large": "small", "patchy": "dense", "dense": "patchy"}

# Sizes as fractions of the image size.
NODULE_RADIUS = (0.018, 0.030)
NODULE_SMALL_BELOW = 0.024  # radius under this: "small"
MASS_RADIUS = (0.050, 0.080)
MASS_SMALL_BELOW = 0.065
OPACITY_RADIUS = (0.060, 0.100)


@dataclass
class PhantomConfig:
    """What the phantom generator draws.

    ``normal_fraction`` of the images have no finding (only when
    ``min_findings == 0``); the others have ``max(1, min_findings)`` to
    ``max_findings`` findings, each of a kind from ``findings`` in a free zone.
    ``finding_scale`` scales the nodule, mass and opacity sizes (not effusions).
    """

    image_size: int = 256
    min_findings: int = 0  # per image
    max_findings: int = 3
    normal_fraction: float = 0.15  # share of images with no finding
    negatives_per_region: int = 3
    findings: tuple[str, ...] = ("nodule", "mass", "opacity", "effusion")
    # Multiplies the nodule, mass and opacity radii and their small/large thresholds (so the
    # size words still follow the pixels); effusions are unchanged. The random draws are the
    # same whatever the scale: 1.0 gives exactly the images of a config without this field.
    finding_scale: float = 1.0

    def __post_init__(self) -> None:
        self.findings = tuple(self.findings)
        if isinstance(self.finding_scale, bool) or not isinstance(self.finding_scale, (int, float)) \
                or not math.isfinite(self.finding_scale) or not (0.0 < self.finding_scale <= 2.0):
            raise ValueError(f"finding_scale must be a number in (0, 2], got {self.finding_scale!r}")
        self.finding_scale = float(self.finding_scale)
        if not isinstance(self.image_size, int) or self.image_size < 64:
            raise ValueError(f"image_size must be an integer >= 64, got {self.image_size!r}")
        if not self.findings:
            raise ValueError("findings must name at least one finding kind")
        unknown = [f for f in self.findings if f not in KNOWN_FINDINGS]
        if unknown:
            raise ValueError(f"unknown finding kind(s) {unknown}; known: {KNOWN_FINDINGS}")
        if len(set(self.findings)) != len(self.findings):
            raise ValueError(f"findings has duplicates: {self.findings}")
        capacity = 2 if self.findings == ("effusion",) else len(SIDES) * len(LEVELS)
        if not (0 <= self.min_findings <= self.max_findings <= capacity):
            raise ValueError(
                f"need 0 <= min_findings <= max_findings <= {capacity} (one finding per zone), "
                f"got min_findings={self.min_findings}, max_findings={self.max_findings}"
            )
        if not (0.0 <= self.normal_fraction <= 1.0):
            raise ValueError(f"normal_fraction must be in [0, 1], got {self.normal_fraction}")
        if self.negatives_per_region < 0:
            raise ValueError(f"negatives_per_region must be >= 0, got {self.negatives_per_region}")


# ---------------------------------------------------------------------------
# Facts and the texts built from them (the single source of truth)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One finding as a fact: its kind, zone and descriptor word.

    ``word`` is a size ("small"/"large") for nodule and mass, a severity
    ("patchy"/"dense") for opacity, ``None`` for effusion.
    """

    kind: str
    side: str
    level: str
    word: str | None = None

    @property
    def zone(self) -> tuple[str, str]:
        return (self.side, self.level)

    def replace(self, **changes) -> "Finding":
        values = {"kind": self.kind, "side": self.side, "level": self.level, "word": self.word}
        values.update(changes)
        return Finding(**values)


def _order_key(f: Finding) -> tuple[int, int]:
    return (SIDES.index(f.side), LEVELS.index(f.level))


def caption_for(f: Finding) -> str:
    """The region caption of a finding (one fixed phrasing per kind)."""
    if f.kind == "effusion":
        return f"{f.side} {f.level} zone pleural effusion"
    return f"{f.word} {f.kind} in the {f.side} {f.level} zone"


def _negated_caption(f: Finding) -> str:
    if f.kind == "effusion":
        return f"no {f.side} pleural effusion"
    return f"no {f.kind} in the {f.side} {f.level} zone"


def _report_for(findings: list[Finding]) -> str:
    if not findings:
        return NORMAL_REPORT
    sentences = [f"There is a {caption_for(f)}." for f in sorted(findings, key=_order_key)]
    return " ".join(sentences + [HEART_SENTENCE])


def _summary_for(findings: list[Finding]) -> str:
    if not findings:
        return NORMAL_SUMMARY
    items = []
    for f in sorted(findings, key=_order_key):
        items.append(f"{f.side} pleural effusion" if f.kind == "effusion" else f"{f.side} {f.level} zone {f.kind}")
    text = "; ".join(items) + "."
    return text[0].upper() + text[1:]


def _other_side(side: str) -> str:
    return SIDES[1 - SIDES.index(side)]


def _region_negatives(f: Finding, present: list[Finding], n: int, rng: np.random.Generator) -> list[dict]:
    """Near-miss captions that are false for region ``f`` (and for the image at that place).

    Order: the first valid candidate of each rule in ``laterality, zone, finding,
    size/severity, negation``, then any further valid candidates in that order.
    """
    if n <= 0:
        return []
    others = [g for g in present if g != f]
    own = caption_for(f)
    taken_texts = {caption_for(g) for g in present}

    def valid(cand: Finding) -> bool:
        if cand.kind == "effusion" and cand.level != "lower":
            return False
        # false at that place: no other finding of that kind in that zone
        if any(g.kind == cand.kind and g.zone == cand.zone for g in others):
            return False
        text = caption_for(cand)
        return text != own and text not in taken_texts

    other_levels = [lv for lv in LEVELS if lv != f.level]
    other_levels = [other_levels[i] for i in rng.permutation(len(other_levels))]
    flipped = _other_side(f.side)

    candidates: dict[str, list[Finding | str]] = {rule: [] for rule in REGION_RULES}
    candidates["laterality"].append(f.replace(side=flipped))
    if f.kind != "effusion":
        candidates["zone"].extend(f.replace(level=lv) for lv in other_levels)
        # laterality fallback: other side and another zone (when the mirror zone is taken)
        candidates["laterality"].extend(f.replace(side=flipped, level=lv) for lv in other_levels)
    for kind in CONFUSABLE[f.kind]:
        candidates["finding"].extend(f.replace(kind=kind, word=w) for w in _SWAP_WORDS[(f.kind, kind)](f.word))
    if f.kind in ("nodule", "mass"):
        candidates["size"].append(f.replace(word=_OTHER_WORD[f.word]))
    elif f.kind == "opacity":
        candidates["severity"].append(f.replace(word=_OTHER_WORD[f.word]))
    candidates["negation"].append(_negated_caption(f))

    chosen: list[dict] = []
    seen: set[str] = {own}

    def take(rule: str, cand: Finding | str) -> bool:
        if isinstance(cand, Finding):
            if not valid(cand):
                return False
            text = caption_for(cand)
        else:
            text = cand
        if text in seen or text in taken_texts:
            return False
        seen.add(text)
        chosen.append({"text": text, "rule": rule})
        return True

    leftovers: list[tuple[str, Finding | str]] = []
    for rule in REGION_RULES:
        found = False
        for cand in candidates[rule]:
            if not found:
                found = take(rule, cand)
            else:
                leftovers.append((rule, cand))
    for rule, cand in leftovers:
        if len(chosen) >= n:
            break
        take(rule, cand)
    return chosen[:n]


def _image_negatives(findings: list[Finding], config: PhantomConfig, rng: np.random.Generator) -> list[dict]:
    """At most two near-miss reports: a side flipped (laterality) and a finding removed or added (negation)."""
    report = _report_for(findings)
    out: list[dict] = []
    if findings:
        ordered = sorted(findings, key=_order_key)
        for k, f in enumerate(ordered):
            moved = f.replace(side=_other_side(f.side))
            rest = ordered[:k] + ordered[k + 1 :]
            if any(g.zone == moved.zone for g in rest):
                continue  # keep one finding per zone
            text = _report_for(rest + [moved])
            if text != report:
                out.append({"text": text, "rule": "laterality"})
                break
        else:  # every single flip lands in a taken zone: mirror the whole report
            text = _report_for([g.replace(side=_other_side(g.side)) for g in ordered])
            if text != report:
                out.append({"text": text, "rule": "laterality"})
        drop = int(rng.integers(len(ordered)))
        out.append({"text": _report_for(ordered[:drop] + ordered[drop + 1 :]), "rule": "negation"})
    else:
        kinds = list(config.findings)
        lesions = [k for k in kinds if k != "effusion"]
        picks = []
        if lesions:
            picks.append(lesions[int(rng.integers(len(lesions)))])
        if "effusion" in kinds:
            picks.append("effusion")
        elif lesions:
            picks.append(lesions[int(rng.integers(len(lesions)))])
        used: set[tuple[str, str]] = set()
        for kind in picks[:2]:
            side = SIDES[int(rng.integers(2))]
            level = "lower" if kind == "effusion" else LEVELS[int(rng.integers(3))]
            if (side, level) in used:
                side = _other_side(side)
            used.add((side, level))
            word = {"nodule": "small", "mass": "large", "opacity": "patchy"}.get(kind)
            out.append({"text": _report_for([Finding(kind, side, level, word)]), "rule": "negation"})
    return [neg for neg in out if neg["text"] != report][:2]


# ---------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _coords(size: int) -> np.ndarray:
    """Pixel-centre coordinates 0.5 .. size-0.5 (pixel i covers [i, i+1])."""
    c = np.arange(size, dtype=np.float32) + 0.5
    c.setflags(write=False)
    return c


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation weights from a coarse grid spanning the image."""
    u = (np.arange(size, dtype=np.float64) + 0.5) / size * (grid - 1)
    j0 = np.minimum(np.floor(u).astype(int), grid - 2)
    frac = u - j0
    w = np.zeros((size, grid), dtype=np.float32)
    w[np.arange(size), j0] = 1.0 - frac
    w[np.arange(size), j0 + 1] = frac
    w.setflags(write=False)
    return w


def _smooth_field(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """A smooth random field (about -1..1) from a coarse random grid, bilinearly upsampled."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    w = _upsample_matrix(size, grid)
    return w @ coarse @ w.T


def _soft(v, edge: float):
    """Smooth step from 0 (v <= -edge/2) to 1 (v >= edge/2); ``v`` is a signed distance in pixels."""
    t = np.clip(0.5 + np.asarray(v, dtype=np.float32) / np.float32(edge), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _Lung:
    side: str
    cx: float
    cy: float
    ax: float  # half-width
    ay: float  # half-height
    p: float  # super-ellipse exponent
    dome: float  # depth of the diaphragm dome cut into the base
    dome_x: float  # x of the dome's peak
    sign: int  # -1: image left (patient right), +1: image right

    @property
    def top(self) -> float:
        return self.cy - self.ay

    @property
    def bottom(self) -> float:
        return self.cy + self.ay

    def zone(self, level: str) -> tuple[float, float]:
        h = (self.bottom - self.top) / 3.0
        k = LEVELS.index(level)
        return (self.top + k * h, self.top + (k + 1) * h)

    def half_width(self, y: float) -> float:
        t = min(abs((y - self.cy) / self.ay), 1.0)
        return self.ax * (1.0 - t**self.p) ** (1.0 / self.p)

    def dome_y(self, x):
        return self.bottom - self.dome * np.exp(-(((x - self.dome_x) / (0.8 * self.ax)) ** 2))

    def mask(self, xs, ys, edge: float):
        """Soft mask on the grid ``xs`` (1-D, columns) x ``ys`` (1-D, rows)."""
        xs = np.asarray(xs, dtype=np.float32)
        ys = np.asarray(ys, dtype=np.float32)
        sx = np.abs((xs - self.cx) / self.ax) ** self.p
        sy = np.abs((ys - self.cy) / self.ay) ** self.p
        s = sy[:, None] + sx[None, :]
        # near the outline s ~ 1 + p * (d - 1): scale the pixel edge accordingly
        inside = _soft((1.0 - s) * (min(self.ax, self.ay) / self.p), edge)
        below_dome = _soft(self.dome_y(xs)[None, :].astype(np.float32) - ys[:, None], edge)
        return inside * below_dome

    def bounds(self, size: int, margin: float) -> tuple[int, int, int, int]:
        r0 = max(0, int(math.floor(self.top - margin)))
        r1 = min(size, int(math.ceil(self.bottom + margin)) + 1)
        c0 = max(0, int(math.floor(self.cx - self.ax - margin)))
        c1 = min(size, int(math.ceil(self.cx + self.ax + margin)) + 1)
        return r0, r1, c0, c1


@dataclass
class _Anatomy:
    cx: float
    cy: float
    body_ax: float
    body_ay: float
    lungs: dict[str, _Lung]
    heart: tuple[float, float, float, float]  # cx, cy, ax, ay
    mediastinum: tuple[float, float, float, float]  # cx, half-width, y0, y1

    def central(self, xs, ys, edge: float):
        """Soft mask of mediastinum + heart on the grid ``xs`` x ``ys``."""
        xs = np.asarray(xs, dtype=np.float32)
        ys = np.asarray(ys, dtype=np.float32)
        hx, hy, hax, hay = self.heart
        d = np.sqrt(((ys[:, None] - hy) / hay) ** 2 + ((xs[None, :] - hx) / hax) ** 2)
        heart = _soft((1.0 - d) * min(hax, hay), edge)
        mx, mw, my0, my1 = self.mediastinum
        band_x = _soft(mw - np.abs(xs - mx), edge)
        band_y = _soft(np.minimum(ys - my0, my1 - ys), 3 * edge)
        return np.maximum(heart, band_y[:, None] * band_x[None, :])


@dataclass
class PhantomRender:
    """A rendered phantom with the layers that made it (for tests and previews)."""

    image: np.ndarray
    record: dict
    findings: list[Finding]
    lung_mask: np.ndarray | None = None  # soft mask of both lung fields
    central_mask: np.ndarray | None = None  # soft mask of mediastinum + heart
    finding_masks: list[np.ndarray] = field(default_factory=list)  # per region, in region order
    zones: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (side, level) -> (y0, y1)


def _draw_anatomy(rng: np.random.Generator, s: int) -> _Anatomy:
    cx = s * (0.5 + rng.uniform(-0.015, 0.015))
    cy = s * (0.54 + rng.uniform(-0.02, 0.02))
    body_ax = s * rng.uniform(0.40, 0.45)
    body_ay = s * rng.uniform(0.47, 0.53)
    lungs = {}
    base_cy = s * (0.45 + rng.uniform(-0.02, 0.02))
    for side, sign in (("right", -1), ("left", 1)):
        dx = s * rng.uniform(0.17, 0.20)
        ax = s * rng.uniform(0.11, 0.13) * (0.96 if side == "left" else 1.0)
        ay = s * rng.uniform(0.27, 0.31)
        lcy = base_cy + s * rng.uniform(-0.01, 0.01) + (0.01 * s if side == "left" else 0.0)
        lcx = cx + sign * dx
        lungs[side] = _Lung(
            side=side,
            cx=lcx,
            cy=lcy,
            ax=ax,
            ay=ay,
            p=rng.uniform(2.2, 2.8),
            dome=ay * rng.uniform(0.08, 0.15),
            dome_x=lcx - sign * ax * rng.uniform(0.0, 0.3),
            sign=sign,
        )
    # the heart sits low and towards the patient's left (the image right)
    heart = (
        cx + s * rng.uniform(0.035, 0.065),
        s * rng.uniform(0.57, 0.61),
        s * rng.uniform(0.14, 0.17),
        s * rng.uniform(0.11, 0.13),
    )
    inner_r = lungs["right"].cx + lungs["right"].ax
    inner_l = lungs["left"].cx - lungs["left"].ax
    mediastinum = (
        0.5 * (inner_r + inner_l),
        max(0.5 * (inner_l - inner_r), 0.03 * s) * rng.uniform(0.9, 1.15),
        s * rng.uniform(0.02, 0.06),
        s * 0.68,
    )
    return _Anatomy(cx, cy, body_ax, body_ay, lungs, heart, mediastinum)


def _choose_findings(rng: np.random.Generator, config: PhantomConfig) -> list[tuple[str, str, str]]:
    """(kind, side, level) for each finding of one image, in drawing order."""
    normal = config.min_findings == 0 and rng.random() < config.normal_fraction
    if normal or config.max_findings == 0:
        return []
    n = int(rng.integers(max(1, config.min_findings), config.max_findings + 1))
    free = [(side, level) for side in SIDES for level in LEVELS]
    chosen = []
    for _ in range(n):
        kinds = [k for k in config.findings if any(k != "effusion" or lv == "lower" for _, lv in free)]
        if not kinds:
            break
        kind = kinds[int(rng.integers(len(kinds)))]
        zones = [z for z in free if kind != "effusion" or z[1] == "lower"]
        zone = zones[int(rng.integers(len(zones)))]
        free.remove(zone)
        chosen.append((kind, *zone))
    return chosen


def _place(rng: np.random.Generator, anat: _Anatomy, lung: _Lung, level: str, r: float, edge: float) -> tuple[float, float]:
    """A centre inside ``lung``'s ``level`` zone, clear of the heart and mediastinum."""
    y0, y1 = lung.zone(level)
    h = y1 - y0
    best, best_score = None, -1.0
    for _ in range(24):
        y = rng.uniform(y0 + 0.25 * h, y1 - 0.25 * h)
        w = lung.half_width(y)
        margin = min(r, 0.5 * w)
        x = lung.cx + rng.uniform(-1.0, 1.0) * max(w - margin, 0.0)
        inside = float(lung.mask([x], [y], edge)[0, 0])
        # keep the whole finding off the heart and mediastinum: mean cover over a 5x5 probe grid
        probe = np.linspace(-0.9 * r, 0.9 * r, 5)
        central = float(anat.central(x + probe, y + probe, edge).mean())
        score = inside * (1.0 - central)
        if score > best_score:
            best, best_score = (x, y), score
        if inside > 0.99 and central < 0.01:
            break
    return best


def _add_density(window: np.ndarray, amount: np.ndarray, lung_val: float) -> None:
    """Add a finding's density in place: full contrast over aerated lung, less over denser tissue."""
    scale = np.clip((1.0 - window) / np.float32(1.0 - lung_val), 0.0, 1.2)
    window += amount * scale


def _window(s: int, x: float, y: float, rad: float) -> tuple[int, int, int, int]:
    r0 = max(0, int(math.floor(y - rad)))
    r1 = min(s, int(math.ceil(y + rad)) + 1)
    c0 = max(0, int(math.floor(x - rad)))
    c1 = min(s, int(math.ceil(x + rad)) + 1)
    return r0, r1, c0, c1


def _box_from(alpha: np.ndarray, r0: int, c0: int, threshold: float, pad: int, s: int, fallback) -> list[float]:
    mask = alpha > threshold
    if mask.any():
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x0, x1 = c0 + cols[0], c0 + cols[-1] + 1
        y0, y1 = r0 + rows[0], r0 + rows[-1] + 1
    else:
        x0, y0, x1, y1 = fallback
    box = [max(0, int(x0) - pad), max(0, int(y0) - pad), min(s, int(x1) + pad), min(s, int(y1) + pad)]
    return [float(v) for v in box]


def render_phantom(
    index: int, seed: int, split: str, config: PhantomConfig | None = None, keep_layers: bool = False
) -> PhantomRender:
    """Render one phantom; with ``keep_layers`` also return the full-size masks."""
    config = config or PhantomConfig()
    if split not in SPLIT_CODES:
        raise ValueError(f"split {split!r} is not one of {tuple(SPLIT_CODES)}")
    if int(index) != index or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    index, seed = int(index), int(seed)
    s = config.image_size
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    text_rng = np.random.default_rng([seed, SPLIT_CODES[split], index, 1])
    coords = _coords(s)
    edge = max(1.0, 0.008 * s)
    pad = 2 if s >= 128 else 1
    # finding_scale: x 1.0 leaves every value (and so every image) exactly as without it. A finding is
    # placed for its unscaled size (the number of random draws _place makes depends on the size it is
    # given), so every scale draws the same numbers: the same facts and centres, only smaller or larger.
    fs = config.finding_scale

    # -- anatomy ------------------------------------------------------------
    anat = _draw_anatomy(rng, s)
    bg = rng.uniform(0.02, 0.06)
    tissue = rng.uniform(0.40, 0.48)
    lung_val = rng.uniform(0.14, 0.21)
    central_val = rng.uniform(0.56, 0.64)

    d_body = np.sqrt(((coords[:, None] - anat.cy) / anat.body_ay) ** 2 + ((coords[None, :] - anat.cx) / anat.body_ax) ** 2)
    body = _soft((1.0 - d_body) * min(anat.body_ax, anat.body_ay), 2.0 * edge)
    img = np.float32(bg) + np.float32(tissue - bg) * body

    lung_mask = np.zeros((s, s), dtype=np.float32)
    lung_side_masks = {}
    for side, lung in anat.lungs.items():
        r0, r1, c0, c1 = lung.bounds(s, 2 * edge)
        m = lung.mask(coords[c0:c1], coords[r0:r1], edge)
        lung_side_masks[side] = ((r0, r1, c0, c1), m)
        np.maximum(lung_mask[r0:r1, c0:c1], m, out=lung_mask[r0:r1, c0:c1])
    img += (np.float32(lung_val) - img) * lung_mask
    # lung markings: a medium-frequency texture inside the lungs
    texture = _smooth_field(rng, s, max(8, s // 10))
    img += np.float32(rng.uniform(0.015, 0.03)) * texture * lung_mask

    # ribs: periodic arcs, apex medial, curving down laterally
    spacing = s * rng.uniform(0.065, 0.08)
    bend = rng.uniform(0.4, 0.7)
    phase0 = rng.uniform(0.0, 1.0)
    right, left = anat.lungs["right"], anat.lungs["left"]
    on_right = coords < anat.mediastinum[0]
    apex_x = np.where(on_right, right.cx + right.ax * 0.6, left.cx - left.ax * 0.6)
    half = np.where(on_right, right.ax, left.ax)
    curve = (bend * ((coords - apex_x) / half) ** 2 - phase0).astype(np.float32)  # in rib spacings
    frac = coords[:, None] / np.float32(spacing) - curve[None, :]
    frac -= np.floor(frac)
    ribs = np.clip(1.0 - np.abs(frac - 0.5) / 0.2, 0.0, 1.0)
    cage_d = np.sqrt(
        ((coords[:, None] - (right.cy + left.cy) / 2) / (max(right.ay, left.ay) + 0.03 * s)) ** 2
        + ((coords[None, :] - anat.mediastinum[0]) / (0.5 * (left.cx + left.ax - right.cx + right.ax) + 0.03 * s)) ** 2
    )
    cage = _soft((1.0 - cage_d) * 0.2 * s, 4 * edge)
    img += np.float32(rng.uniform(0.025, 0.045)) * ribs * ribs * (3 - 2 * ribs) * cage

    central = anat.central(coords, coords, edge)
    img += (np.float32(central_val) - img) * central
    # trachea: a dark air column in the upper mediastinum
    tx = anat.mediastinum[0] + s * rng.uniform(-0.005, 0.005)
    tw = s * rng.uniform(0.018, 0.025)
    trachea = _soft(tw - np.abs(coords - tx), edge)[None, :] * _soft(
        np.minimum(coords - anat.mediastinum[2], s * rng.uniform(0.30, 0.34) - coords), 3 * edge
    )[:, None]
    img -= np.float32(rng.uniform(0.12, 0.2)) * trachea

    # -- findings -----------------------------------------------------------
    facts: list[Finding] = []
    boxes: list[list[float]] = []
    masks: list[np.ndarray] = []
    for kind, side, level in _choose_findings(rng, config):
        lung = anat.lungs[side]
        if kind == "nodule":
            full_r = s * rng.uniform(*NODULE_RADIUS)
            r = full_r * fs
            word = "small" if r < NODULE_SMALL_BELOW * fs * s else "large"
            amp = rng.uniform(0.14, 0.22)
            x, y = _place(rng, anat, lung, level, full_r, edge)
            r0, r1, c0, c1 = _window(s, x, y, r + 3 * edge)
            dy = coords[r0:r1, None] - y
            dx = coords[None, c0:c1] - x
            d = np.sqrt(dy * dy + dx * dx)
            alpha = _soft(r - d, edge)
            _add_density(img[r0:r1, c0:c1], np.float32(amp) * alpha * (1.0 - 0.25 * np.minimum(d / r, 1.0) ** 2), lung_val)
            box = _box_from(alpha, r0, c0, 0.5, pad, s, (x - r, y - r, x + r, y + r))
        elif kind == "mass":
            full_r = s * rng.uniform(*MASS_RADIUS)
            r = full_r * fs
            word = "small" if r < MASS_SMALL_BELOW * fs * s else "large"
            amp = rng.uniform(0.2, 0.3)
            harmonics = [(k, rng.uniform(0.05, 0.12), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5, 7)]
            x, y = _place(rng, anat, lung, level, full_r, edge)
            r0, r1, c0, c1 = _window(s, x, y, 1.45 * r + 3 * edge)
            dy = coords[r0:r1, None] - y
            dx = coords[None, c0:c1] - x
            d = np.sqrt(dy * dy + dx * dx)
            theta = np.arctan2(dy, dx)
            radius = np.float32(r) * (1.0 + sum(np.float32(a) * np.cos(k * theta + np.float32(ph)) for k, a, ph in harmonics))
            alpha = _soft(radius - d, edge)
            _add_density(img[r0:r1, c0:c1], np.float32(amp) * alpha * (1.0 - 0.2 * np.minimum(d / radius, 1.0) ** 2), lung_val)
            box = _box_from(alpha, r0, c0, 0.5, pad, s, (x - r, y - r, x + r, y + r))
        elif kind == "opacity":
            full_r = s * rng.uniform(*OPACITY_RADIUS)
            big_r = full_r * fs
            word = "dense" if rng.random() < 0.5 else "patchy"
            amp = rng.uniform(0.22, 0.3) if word == "dense" else rng.uniform(0.14, 0.19)
            sx, sy = (big_r / 2) * rng.uniform(0.8, 1.2), (big_r / 2) * rng.uniform(0.8, 1.2)
            x, y = _place(rng, anat, lung, level, full_r * 0.6, edge)
            r0, r1, c0, c1 = _window(s, x, y, 3.0 * max(sx, sy))
            dy = (coords[r0:r1, None] - y) / np.float32(sy)
            dx = (coords[None, c0:c1] - x) / np.float32(sx)
            haze = np.exp(-0.5 * (dy * dy + dx * dx))
            if word == "patchy":  # mottled, not uniform
                mottle = _smooth_field(rng, s, max(8, s // 8))[r0:r1, c0:c1]
                haze = haze * np.clip(1.0 + 0.35 * mottle, 0.3, 1.7)
            (lr0, lr1, lc0, lc1), lm = lung_side_masks[side]
            lung_local = np.zeros((r1 - r0, c1 - c0), dtype=np.float32)
            ir0, ir1, ic0, ic1 = max(r0, lr0), min(r1, lr1), max(c0, lc0), min(c1, lc1)
            if ir0 < ir1 and ic0 < ic1:
                lung_local[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0] = lm[ir0 - lr0 : ir1 - lr0, ic0 - lc0 : ic1 - lc0]
            alpha = haze * lung_local
            _add_density(img[r0:r1, c0:c1], np.float32(amp) * alpha, lung_val)
            box = _box_from(alpha, r0, c0, 0.15, pad, s, (x - big_r, y - big_r, x + big_r, y + big_r))
        else:  # effusion: fills the lung base below a meniscus that climbs laterally
            word = None
            amp = rng.uniform(0.24, 0.32)
            z0, z1 = lung.zone("lower")
            h = z1 - z0
            y_medial = lung.bottom - h * rng.uniform(0.35, 0.6)
            rise = h * rng.uniform(0.2, 0.35)
            (r0, r1, c0, c1), lm = lung_side_masks[side]
            xs = coords[c0:c1]
            t_lat = np.clip(0.5 + 0.5 * lung.sign * (xs - lung.cx) / lung.ax, 0.0, 1.0)
            y_e = y_medial - rise * t_lat * t_lat
            below = coords[r0:r1, None] - y_e[None, :]
            alpha = lm * _soft(below, 1.5 * edge)
            grade = 0.85 + 0.15 * np.clip(below / np.float32(h), 0.0, 1.0)
            _add_density(img[r0:r1, c0:c1], np.float32(amp) * alpha * grade, lung_val)
            box = _box_from(alpha, r0, c0, 0.5, pad, s, (lung.cx - lung.ax, y_medial, lung.cx + lung.ax, lung.bottom))
        facts.append(Finding(kind, side, level, word))
        boxes.append(box)
        if keep_layers:
            full = np.zeros((s, s), dtype=np.float32)
            full[r0:r1, c0:c1] = alpha
            masks.append(full)

    # -- acquisition: smooth exposure variation, gain, noise ---------------------
    img *= 1.0 + np.float32(rng.uniform(0.04, 0.08)) * _smooth_field(rng, s, 4)
    img = img * np.float32(rng.uniform(0.92, 1.08)) + np.float32(rng.uniform(-0.02, 0.02))
    img += rng.standard_normal((s, s), dtype=np.float32) * np.float32(rng.uniform(0.008, 0.016))
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)

    # -- record ---------------------------------------------------------------
    order = sorted(range(len(facts)), key=lambda i: _order_key(facts[i]))
    facts = [facts[i] for i in order]
    boxes = [boxes[i] for i in order]
    masks = [masks[i] for i in order] if keep_layers else []
    regions = []
    for f, box in zip(facts, boxes):
        regions.append(
            {
                "box": box,
                "label": f.kind,
                "caption": caption_for(f),
                "negatives": _region_negatives(f, facts, config.negatives_per_region, text_rng),
                "source": "annotation",
                "side": f.side,
                "level": f.level,
            }
        )
    sample_id = f"phantom-{split}-{index:06d}"
    record = {
        "schema_version": SCHEMA_VERSION,
        "id": sample_id,
        "split": split,
        "source": "phantom",
        "modality": "xray",
        "width": s,
        "height": s,
        "summary": _summary_for(facts),
        "report": _report_for(facts),
        "negatives": _image_negatives(facts, config, text_rng),
        "regions": regions,
        "labels": {kind: int(any(f.kind == kind for f in facts)) for kind in config.findings},
        "group": sample_id,
        "meta": {"generator": GENERATOR, "generator_version": GENERATOR_VERSION, "seed": seed, "index": index},
    }
    validate_record(record)
    render = PhantomRender(image=image, record=record, findings=facts)
    if keep_layers:
        render.lung_mask = lung_mask
        render.central_mask = central
        render.finding_masks = masks
        render.zones = {(side, lv): anat.lungs[side].zone(lv) for side in SIDES for lv in LEVELS}
    return render


def _resize_float(values: np.ndarray, size: int, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A float layer (optionally cropped to ``window``) resized as the model's Preprocessor resizes an image (PIL bilinear)."""
    layer = Image.fromarray(np.asarray(values, dtype=np.float32), mode="F")
    if window is not None:
        layer = layer.crop(window)
    return np.asarray(layer.resize((size, size), Image.BILINEAR), dtype=np.float32)


def finding_contrast(render: PhantomRender, region: int, image_size: int = 128, roi_size: int = 64,
                     context_margin: float = 0.25) -> dict[str, float]:
    """How visible region ``region`` of a square phantom (rendered with ``keep_layers``) is in the two
    views a region-aware model gets: the whole image resized to ``image_size`` (the global input) and
    the ROI crop (its box grown by ``context_margin``, squared, cut from the full-resolution image and
    resized to ``roi_size``, exactly as :class:`regionmed.data.transforms.Preprocessor` does).

    In each view (pixel values in [0, 1]): the finding's **peak contrast** is its brightest pixel
    (where its own mask is at least half its maximum) minus the median of the pixels around it (the
    crop's window, the finding's mask < 0.02); the **texture/noise level** is a standard deviation of
    finding-free pixels: in the global view, of the lung-field pixels (lung mask > 0.9, no finding)
    within four crop half-widths of the finding, so lung markings, ribs and noise all count (the crop
    window itself holds too few pixels at the global size); in the crop, of its own pixels around the
    finding. Returns ``{"global_cnr", "crop_cnr"}`` (peak contrast / texture-noise level) and the
    parts (``global_peak``, ``global_noise``, ``crop_peak``, ``crop_noise``)."""
    from regionmed.data.transforms import Preprocessor

    if render.lung_mask is None or not render.finding_masks:
        raise ValueError("finding_contrast needs a render with keep_layers=True and at least one finding")
    s = render.image.shape[0]
    if render.image.shape != (s, s):
        raise ValueError(f"finding_contrast needs a square phantom, got {render.image.shape}")
    img = render.image.astype(np.float32) / 255.0
    mask = render.finding_masks[region]
    window = Preprocessor(context_margin=context_margin).crop_box(tuple(render.record["regions"][region]["box"]), s, s)

    crop, crop_mask = _resize_float(img, roi_size, window), _resize_float(mask, roi_size, window)
    around = crop_mask < 0.02
    crop_peak = float(crop[crop_mask >= 0.5 * crop_mask.max()].max() - np.median(crop[around]))
    crop_noise = float(crop[around].std())

    view, view_mask = _resize_float(img, image_size), _resize_float(mask, image_size)
    lung = _resize_float(render.lung_mask, image_size)
    any_finding = _resize_float(np.maximum.reduce(render.finding_masks), image_size)
    f = image_size / s
    x0, y0, x1, y1 = (v * f for v in window)
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    dist = np.maximum(np.abs(xs - cx), np.abs(ys - cy))
    near = (dist <= half) & (view_mask < 0.02)
    neighbourhood = (dist <= 4 * half) & (any_finding < 0.02) & (lung > 0.9)
    global_peak = float(view[view_mask >= 0.5 * view_mask.max()].max() - np.median(view[near]))
    global_noise = float(view[neighbourhood].std())
    return {"global_cnr": global_peak / max(global_noise, 1e-6), "crop_cnr": crop_peak / max(crop_noise, 1e-6),
            "global_peak": global_peak, "global_noise": global_noise, "crop_peak": crop_peak, "crop_noise": crop_noise}


def generate_phantom(index: int, seed: int, split: str, config: PhantomConfig | None = None) -> tuple[np.ndarray, dict]:
    """uint8 grayscale HxW image and a schema-v1 record. Depends only on (index, seed, split, config)."""
    render = render_phantom(index, seed, split, config)
    return render.image, render.record


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of a uint8 grayscale image (lossless: the pixels read back exactly)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_phantom_dataset(
    out_dir,
    n_train: int,
    n_test: int,
    seed: int = 0,
    config: PhantomConfig | None = None,
    n_val: int = 0,
    shard_max_count: int = 500,
    progress: bool = True,
) -> dict:
    """Write shards (MedRegionWriter) + manifest (write_manifest, provenance: source='phantom', generator config, seed).

    Returns the manifest dict (as written to ``<out_dir>/manifest.json``). Splits
    with zero samples are left out of the manifest. Uses a tqdm progress bar when
    ``progress`` is true.
    """
    config = config or PhantomConfig()
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    if sum(counts.values()) == 0:
        raise ValueError("nothing to write: n_train, n_val and n_test are all 0")
    if shard_max_count < 1:
        raise ValueError(f"shard_max_count must be >= 1, got {shard_max_count}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    splits: dict[str, dict] = {}
    with tqdm(total=sum(counts.values()), desc="phantoms", unit="img", disable=not progress) as bar:
        for split, n in counts.items():
            if n == 0:
                continue
            with MedRegionWriter(out_dir, split, max_count=shard_max_count) as writer:
                for i in range(n):
                    image, record = generate_phantom(i, seed, split, config)
                    writer.write(record, encode_png(image), "png")
                    bar.update(1)
            splits[split] = writer.summary()
    provenance = {
        "source": "phantom",
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "config": asdict(config),
        "counts": counts,
    }
    path = write_manifest(out_dir, splits, provenance)
    return json.loads(path.read_text(encoding="utf-8"))
