"""Captions: summary, cleaned report, region captions, and rule-based hard negatives.

Location phrases come from the box position. ``left``/``right`` name the
*patient's* side: under the ``radiological`` convention (the default for X-ray,
CT and MRI) the image's left half shows the patient's right; under the
``image`` convention the image's left is "left". The convention is set per
modality (:class:`CaptionConfig.laterality`).

Hard negatives change one clinically meaningful element (laterality, zone, a
finding swapped for a confusable one, size/severity, negation). Each negative
records the rule that made it and is never equal to its positive after
:func:`normalize`; a rule that cannot change the text is skipped.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from regionmed.apps.curation.tables import is_missing

# Confusable findings / organs: each term may be swapped for one of its list.
DEFAULT_CONFUSABLES: dict[str, list[str]] = {
    "pleural effusion": ["pneumothorax", "pleural thickening"],
    "effusion": ["pneumothorax", "consolidation"],
    "pneumothorax": ["pleural effusion", "emphysema"],
    "consolidation": ["atelectasis", "pleural effusion"],
    "atelectasis": ["consolidation", "pneumothorax"],
    "pneumonia": ["atelectasis", "pulmonary edema"],
    "pulmonary edema": ["pneumonia", "pulmonary fibrosis"],
    "edema": ["hemorrhage", "infarction"],
    "nodule": ["mass", "cyst"],
    "nodules": ["masses", "cysts"],
    "mass": ["nodule", "cyst"],
    "cardiomegaly": ["pericardial effusion", "pneumomediastinum"],
    "opacity": ["lucency", "cavity"],
    "opacities": ["lucencies", "cavities"],
    "ground-glass": ["reticular", "cavitary"],
    "ground glass": ["reticular", "cavitary"],
    "infiltrate": ["effusion", "mass"],
    "infiltrates": ["effusions", "masses"],
    "infiltration": ["effusion", "fibrosis"],
    "fibrosis": ["emphysema", "edema"],
    "emphysema": ["fibrosis", "pneumothorax"],
    "fracture": ["dislocation", "lytic lesion"],
    "brain edema": ["brain enhancing tumor", "brain non-enhancing tumor"],
    "brain enhancing tumor": ["brain non-enhancing tumor", "brain edema"],
    "brain non-enhancing tumor": ["brain enhancing tumor", "brain edema"],
    "liver cancer": ["liver cyst", "hepatic hemangioma"],
    "liver": ["spleen", "stomach"],
    "spleen": ["liver", "left kidney"],
    "kidney": ["spleen", "liver"],
    "heart": ["aorta", "esophagus"],
    "stomach": ["colon", "liver"],
    "colon": ["small bowel", "stomach"],
    "small bowel": ["colon", "stomach"],
    "bladder": ["rectum", "uterus"],
    "hemorrhage": ["infarction", "edema"],
    "infarction": ["hemorrhage", "tumor"],
    "tumor": ["cyst", "abscess"],
    "covid-19": ["bacterial pneumonia", "pulmonary edema"],
}

LATERALITY_SWAP = {"left": "right", "right": "left", "rul": "lul", "lul": "rul", "rll": "lll", "lll": "rll"}
VERTICAL_SWAP = {"upper": "lower", "lower": "upper", "middle": "upper", "apical": "basal", "basal": "apical",
                 "superior": "inferior", "inferior": "superior"}
RADIAL_SWAP = {"central": "peripheral", "peripheral": "central", "perihilar": "peripheral"}
SIZE_SWAP = {
    "small": "large", "large": "small", "tiny": "large", "big": "small", "mild": "severe", "mildly": "severely",
    "severe": "mild", "severely": "mildly", "moderate": "severe", "moderately": "severely", "minimal": "extensive",
    "extensive": "minimal", "slight": "marked", "slightly": "markedly", "marked": "slight", "markedly": "slightly",
    "massive": "small", "focal": "diffuse", "diffuse": "focal", "enlarged": "normal-sized", "normal-sized": "enlarged",
    "increased": "decreased", "decreased": "increased", "worsening": "improving", "improving": "worsening",
}
NEGATION_CUES = re.compile(r"\b(no|not|without|negative for|free of|absence of|absent)\b", re.I)
FINDING_VERBS = re.compile(r"\b(shows|showed|show|demonstrates|demonstrated|reveals|revealed|reveal|with|has|had)\s+", re.I)

RULES = ("laterality", "zone", "finding", "size", "negation")


@dataclass
class CaptionConfig:
    """How captions and negatives are made (the ``captions:`` block of a build config)."""

    summary_max_chars: int = 200
    summary_max_sentences: int = 2
    negatives_per_region: int = 3
    negatives_per_image: int = 3
    rules: list[str] = field(default_factory=lambda: list(RULES))
    # Patient-side convention per modality: "radiological" (image left = patient right) or "image".
    laterality: dict[str, str] = field(
        default_factory=lambda: {"xray": "radiological", "ct": "radiological", "mri": "radiological", "default": "radiological"}
    )
    midline_band: float = 0.08  # |cx - 0.5| below this (fraction of width) is "midline"
    central_radius: float = 0.25  # distance of the box centre from the image centre (fraction of the diagonal / 2)
    confusables: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_CONFUSABLES.items()})
    scrub_dates: bool = True


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (for comparing captions)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s-]", " ", text)
    return " ".join(text.split())


# --------------------------------------------------------------------------- text cleaning

_DATE_PATTERNS = [
    re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b"),
    re.compile(
        r"\b(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|jun(e)?|jul(y)?|aug(ust)?|sep(t(ember)?)?|oct(ober)?|nov(ember)?|dec(ember)?)"
        r"\.?\s+\d{1,2}(st|nd|rd|th)?,?\s+\d{4}\b",
        re.I,
    ),
    re.compile(r"\b\d{1,2}(st|nd|rd|th)?\s+(jan(uary)?|feb(ruary)?|mar(ch)?|apr(il)?|may|jun(e)?|jul(y)?|aug(ust)?|sep(t(ember)?)?|oct(ober)?|nov(ember)?|dec(ember)?)\.?,?\s+\d{4}\b", re.I),
]


# A missing-value artifact standing as a whole section ("Findings: nan Impression: ...") or a
# sentence of its own; programs write these when they format a missing cell as text. ("None"
# is kept inside text: "Complications: None." is clinical language.)
_HEADER = r"(?:[A-Z][A-Za-z]*(?: [a-z]+)?|[A-Z]+(?: [A-Z]+)*)\s*:"
_ARTIFACT_SECTION = re.compile(
    r"(?:\b" + _HEADER + r"\s*|(?:^|(?<=[.!?;]))\s*)(?i:nan|null|\#n/a)(?![\w/-])"
    r"(?:\s*[.;]\s*|\s*(?=$|" + _HEADER + "))"
)


def clean_report(text: str, scrub_dates: bool = True) -> str:
    """Cleaned full text: Unicode normalised, control characters and runs of spaces removed,
    panel markers like "(a)" dropped, calendar dates replaced by "[date]".

    Missing values are no text: a cell spelled like one (``nan``, ``N/A``, ``None``, ...;
    :func:`regionmed.apps.curation.tables.is_missing`) gives ``""``, and so does a section
    or sentence that is only ``nan``/``null``/``#N/A`` ("Findings: nan" is removed)."""
    if not text or is_missing(text):
        return ""
    text = unicodedata.normalize("NFKC", str(text))
    text = "".join(c if (c.isprintable() or c in "\n\t") else " " for c in text)
    text = re.sub(r"\(\s*[a-h]\s*\)\s*", "", text)
    if scrub_dates:
        for pat in _DATE_PATTERNS:
            text = pat.sub("[date]", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+", " ", _ARTIFACT_SECTION.sub(" ", text)).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return "" if is_missing(text) else text


def report_text(report: str, facts=(), summary: str = "", scrub_dates: bool = True) -> str:
    """The cleaned report of an item: its report, else its facts, else its summary
    (each through :func:`clean_report`, so ``nan`` and the like count as nothing).
    ``""`` when nothing is left (the builder rejects the item as ``empty_report``)."""
    return (clean_report(report, scrub_dates) or clean_report(" ".join(facts), scrub_dates)
            or clean_report(summary, scrub_dates))


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[(\"'])")
_IMAGING_WORDS = re.compile(
    r"\b(radiograph|x-?ray|cxr|chest film|\bct\b|mri|imaging|opacit|consolidat|effusion|infiltrat|ground.glass|"
    r"nodul|atelecta|pneumothora|cardiomegal|impression)",
    re.I,
)
_FINDING_WORDS = re.compile(
    r"\b(opacit|consolidat|effusion|infiltrat|nodul|mass|lesion|pneumo|atelecta|edema|fibros|ground.glass|"
    r"cardiomegal|enlarg|fractur|tumou?r|hemorrhag|infarct|cyst|normal|clear|shows?|showed|demonstrat|reveal|"
    r"findings?|impression|radiograph|x-ray|ct\b|mri\b)",
    re.I,
)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text) if s.strip()]


def _bound(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0].rstrip(",;: ")
    return cut + ("." if not cut.endswith(".") else "")


def make_summary(report: str, cfg: CaptionConfig) -> str:
    """Short summary: the impression if there is one, else the first finding sentences (bounded)."""
    if not report:
        return ""
    m = re.search(r"\b(impression|conclusion)s?\s*:\s*(.+)", report, re.I)
    if m and m.group(2).strip():
        picked = sentences(m.group(2).strip())[: cfg.summary_max_sentences]
    else:
        sents = sentences(report)
        picked = ([s for s in sents if _IMAGING_WORDS.search(s)] or [s for s in sents if _FINDING_WORDS.search(s)]
                  or sents[:1])[: cfg.summary_max_sentences]
    return _bound(" ".join(picked), cfg.summary_max_chars)


# --------------------------------------------------------------------------- region captions


def convention_for(modality: str, cfg: CaptionConfig) -> str:
    return cfg.laterality.get(modality, cfg.laterality.get("default", "radiological"))


def location(box, width: int, height: int, modality: str, cfg: CaptionConfig) -> dict[str, str]:
    """Side (patient's left/right or midline), vertical third and central/peripheral of a box."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    if abs(cx - 0.5) < cfg.midline_band:
        side = "midline"
    else:
        image_left = cx < 0.5
        if convention_for(modality, cfg) == "radiological":
            side = "right" if image_left else "left"
        else:
            side = "left" if image_left else "right"
    vertical = "upper" if cy < 1 / 3 else ("middle" if cy < 2 / 3 else "lower")
    r = ((cx - 0.5) ** 2 + (cy - 0.5) ** 2) ** 0.5 / (0.5 * 2**0.5)
    radial = "central" if r < cfg.central_radius else "peripheral"
    return {"side": side, "vertical": vertical, "radial": radial}


def _label_text(label: str) -> str:
    label = " ".join(label.replace("_", " ").split())
    return label[:1].upper() + label[1:].lower() if label else "Region"


def region_caption(
    label: str,
    box,
    width: int,
    height: int,
    modality: str,
    body: str,
    cfg: CaptionConfig,
    pixel_spacing: tuple[float, float] | None = None,
) -> tuple[str, dict[str, str]]:
    """``"<Label> in the <side> <upper|middle|lower> <zone|region>, <central|peripheral>[, about W x H cm]."``"""
    loc = location(box, width, height, modality, cfg)
    zone = "zone" if body in ("chest", "lung") else "region"
    where = f"{loc['vertical']} {zone}" if loc["side"] == "midline" else f"{loc['side']} {loc['vertical']} {zone}"
    if loc["side"] == "midline":
        where = f"midline {where}"
    text = f"{_label_text(label)} in the {where}, {loc['radial']}"
    if pixel_spacing:
        w_cm = (box[2] - box[0]) * pixel_spacing[1] / 10
        h_cm = (box[3] - box[1]) * pixel_spacing[0] / 10
        text += f", about {w_cm:.1f} x {h_cm:.1f} cm"
    return text + ".", loc


# --------------------------------------------------------------------------- hard negatives


def _match_case(src: str, new: str) -> str:
    if src.isupper() and len(src) > 1:
        return new.upper()
    if src[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def _swap_words(text: str, table: dict[str, str], count: int = 0) -> str | None:
    """Swap every (``count=0``) or the first ``count`` words of ``table``, at once."""
    pat = re.compile(r"\b(" + "|".join(sorted(map(re.escape, table), key=len, reverse=True)) + r")\b", re.I)
    if not pat.search(text):
        return None
    return pat.sub(lambda m: _match_case(m.group(0), table[m.group(0).lower()]), text, count=count)


def rule_laterality(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    out = _swap_words(text, LATERALITY_SWAP)
    if out is None:
        out = _swap_words(text, {"bilateral": "unilateral", "bilaterally": "unilaterally", "unilateral": "bilateral"})
    return out


def rule_zone(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    return _swap_words(text, VERTICAL_SWAP, count=1) or _swap_words(text, RADIAL_SWAP, count=1)


def rule_size(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    out = _swap_words(text, SIZE_SWAP)
    if out is not None:
        return out
    m = re.search(r"\b(\d+(?:\.\d+)?)\s*(mm|cm)\b", text)
    if m:
        value = float(m.group(1)) * (2.5 if seed % 2 == 0 else 0.4)
        return text[: m.start()] + f"{value:.1f} {m.group(2)}" + text[m.end() :]
    return None


def rule_finding(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    vocab = cfg.confusables
    if not vocab:
        return None
    pat = re.compile(r"\b(" + "|".join(sorted(map(re.escape, vocab), key=len, reverse=True)) + r")\b", re.I)
    m = pat.search(text)
    if not m:
        return None
    term = m.group(0)
    lowered = normalize(text)
    options = [o for o in vocab[term.lower()] if normalize(o) not in lowered] or vocab[term.lower()]
    new = options[seed % len(options)]
    return text[: m.start()] + _match_case(term, new) + text[m.end() :]


def rule_negation(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    removals = [
        (r"\bno evidence of\s+", "evidence of "),
        (r"\bthere is no\s+", "there is "),
        (r"\bthere are no\s+", "there are "),
        (r"\bwithout\s+", "with "),
        (r"\bnegative for\s+", "positive for "),
        (r"\bfree of\s+", "with "),
        (r"\b(is|are|was|were)\s+not\s+", r"\1 "),
        (r"\b(did|does|do|can|could)\s+not\s+", r"\1 "),
        (r"^no\s+", ""),
        (r"\bno\s+", ""),
    ]
    if NEGATION_CUES.search(text):
        for pat, rep in removals:
            rx = re.compile(pat, re.I)
            m = rx.search(text)
            if m:
                out = text[: m.start()] + m.expand(rep) + text[m.end() :]
                at = m.start()
                if at == 0 or re.search(r"[.!?]\s*$", text[:at]):  # a sentence now starts here
                    out = out[:at] + out[at : at + 1].upper() + out[at + 1 :]
                return out
        return None
    m = FINDING_VERBS.search(text)
    if m and m.group(1).lower() not in ("with", "has", "had"):
        rest = re.sub(r"^(the|a|an|some|any)\s+", "", text[m.end() :], flags=re.I)
        return text[: m.end()] + "no " + rest
    m = re.match(r"^(there (is|are))\s+", text, re.I)
    if m:
        return text[: m.end()] + "no " + text[m.end() :]
    if len(text.split()) <= 16:  # a short region caption: "Nodule in the ..." -> "No nodule in the ..."
        return "No " + text[:1].lower() + text[1:]
    return None


RULE_FUNCS = {
    "laterality": rule_laterality,
    "zone": rule_zone,
    "finding": rule_finding,
    "size": rule_size,
    "negation": rule_negation,
}


def _seed(key: str) -> int:
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16)


def make_negatives(text: str, n: int, cfg: CaptionConfig, key: str = "") -> list[dict[str, str]]:
    """Up to ``n`` hard negatives of ``text`` as ``[{"text", "rule"}]``.

    Rules are tried in a rotation that depends on ``key`` (deterministic), so
    different regions get different rules first. Every negative differs from the
    positive, and from the other negatives, after :func:`normalize`.
    """
    if n <= 0 or not text:
        return []
    rules = [r for r in cfg.rules if r in RULE_FUNCS]
    if not rules:
        return []
    seed = _seed(key or text)
    start = seed % len(rules)
    order = rules[start:] + rules[:start]
    seen = {normalize(text)}
    out: list[dict[str, str]] = []
    for rule in order:
        if len(out) >= n:
            break
        neg = RULE_FUNCS[rule](text, cfg, seed)
        if not neg:
            continue
        neg = " ".join(neg.split())
        key_n = normalize(neg)
        if not key_n or key_n in seen:
            continue
        seen.add(key_n)
        out.append({"text": neg, "rule": rule})
    return out
