"""Captions: summary, cleaned report, region captions, and rule-based hard negatives.

Location phrases come from the box position. ``left``/``right`` name the
*patient's* side: under the ``radiological`` convention (the default for X-ray,
CT and MRI) the image's left half shows the patient's right; under the
``image`` convention the image's left is "left". The convention is set per
modality (:class:`CaptionConfig.laterality`).

Hard negatives change one clinically meaningful element (laterality, zone, a
finding swapped for a confusable one, size/severity, negation). Each negative
records the rule that made it and is never equal to its positive after
:func:`normalize`; a rule that cannot change the text is skipped. The zone, size
and negation rules only change *finding sentences* (a sentence naming an imaging
finding, or the content of a "Finding(s):"/"Impression:" section): a view or
technique statement ("PA chest radiograph."), history, or a phrase about change
("no change in ...") is never what a negative changes, and the negation rule
does not fire rather than negate something that is no finding.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field

from regionmed.apps.curation.tables import is_missing
from regionmed.data.schema import label_words  # noqa: F401 - the one rule, used here and re-exported

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
    # Report sentences matched to boxes (match_report_sentences): "extra" adds them to each
    # region as report_captions, "replace" also makes the first one the region's caption,
    # "off" matches nothing.
    report_captions: str = "extra"


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
    label = label_words(label)
    return label[:1].upper() + label[1:] if label else "Region"


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


# Imaging findings (stems). A sentence is a *finding sentence* when it names one of these (or a
# key of CaptionConfig.confusables); the zone, size and negation rules only change finding
# sentences, so a view/technique statement ("PA chest radiograph.") or a line of history is
# never what a negative changes.
_FINDING_STEMS = (
    r"opacit\w*|opacification|consolidat\w*|effusions?|infiltrat\w*|nodul\w*|masses|mass|lesions?|"
    r"pneumothora\w*|hydrothora\w*|hemothora\w*|atelecta\w*|o?edema|fibros\w*|ground.glass|cardiomegal\w*|"
    r"fractur\w*|tumou?rs?|ha?emorrhag\w*|infarct\w*|cysts?|abscess\w*|pneumonia|pneumonitis|cavitat\w*|cavitary|emphysema|"
    r"lymphadenopath\w*|thickening|prominence|deviation|calcifi\w*|granulomas?|metasta\w*|collapse|enlarge\w*|"
    r"widening|bronchiectasis|herni\w*|lucenc\w*|airspace disease|air.space disease|interstitial (?:pattern|markings?)|"
    r"nodular pattern|reticul\w*|shadow\w*|abnormal\w*|cancer|carcinoma|stones?|calculi|dilat\w*|blunting|"
    r"cardiomegaly|pleural (?:fluid|reaction)|pneumoperitoneum|pneumomediastinum|free air"
)
# Confusable terms that are no image finding: a diagnosis ("No contact with COVID-19 patients" is
# history) and organs ("heart rate", "heart size normal": an organ named is not a finding).
_NOT_FINDINGS = {"covid-19", "liver", "spleen", "kidney", "heart", "stomach", "colon", "small bowel", "bladder"}
# Words that make a phrase about change or a comparison, not about a finding ("no change in the effusion").
_CHANGE_WORDS = re.compile(
    r"\b(change[sd]?|interval|progress\w*|improv\w*|resol\w*|regress\w*|clearing|worsen\w*|stable|unchanged|"
    r"persist\w*|recur\w*|increase[sd]?|decrease[sd]?|reduction|compar\w*|longer)\b", re.I)
# View, technique and study words; a statement made only of these is never negated.
_VIEW_WORDS = re.compile(
    r"\b(radiographs?|x-?rays?|cxr|films?|views?|projections?|pa|ap|lateral|supine|erect|upright|portable|"
    r"frontal|posteroanterior|anteroposterior|ct|mri|scans?|study|studies|images?|examinations?|exam)\b", re.I)
_QUESTION_START = re.compile(r"^(can|could|is|are|was|were|does|do|did|what|where|which|how|who|when|why|has|have)\b", re.I)
_HEADER_PREFIX = re.compile(r"^((?:[A-Z][A-Za-z]*(?: [A-Za-z]+){0,2}|[A-Z]+(?: [A-Z]+)*)\s*:\s*)(?=\S)")
# A section whose content is itself a finding ("Finding: COVID-19.", "Diagnosis: pneumonia").
_FINDINGS_HEADER = re.compile(r"^\s*(findings?|impressions?|diagnosis|diagnoses|conclusions?)\s*:\s*", re.I)
_NOTHING_FOUND = re.compile(r"^(no finding|none|nil|normal|unknown|n/?a|no abnormalit\w*)\W*$", re.I)
_LIST_PREFIX = re.compile(r"^((?:\d{1,2}[.)]|[-*\u2022])\s+)")
_SEGMENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[(\"'\d-])|\s*\n+\s*|(?<=[.;:])\s+(?=\d{1,2}[.)]\s+[A-Za-z])")
# A segment that must not end a sentence: an abbreviation ("Fig. 2") or a bare list number ("1.").
_ABBREVIATION_END = re.compile(r"(\b(figs?|e\.g|i\.e|vs|dr|approx|ref|no|cf)\.|^\d{1,2}[.)])$", re.I)
_REPORTING_VERBS = re.compile(
    r"\b(shows|showed|show|demonstrates|demonstrated|demonstrate|reveals|revealed|reveal|depicts|depicted|"
    r"displays|displayed|illustrates|illustrated|confirms|confirmed|contains|contain|contained)\s+", re.I)
_VISIBILITY = r"(?:also\s+)?(?:seen|noted|present|visible|identified|demonstrated|evident|appreciated|observed|shown)"
_DETERMINERS = re.compile(r"^(?:(?:a|an|the|some|any|several|multiple)\s+)+", re.I)
_MEASURE = re.compile(r"^\d+(?:\.\d+)?\s*(?:x\s*\d+(?:\.\d+)?\s*)?(?:mm|cm)\b\s*", re.I)
_NOT_MODIFIERS = re.compile(
    r"\b(is|are|was|were|be|been|being|has|have|had|can|could|does|do|did|will|would|after|before|since|during|"
    r"later|ago|days?|weeks?|months?|years?|patient|history|taken|performed|of the)\b", re.I)


def _finding_re(cfg: CaptionConfig) -> re.Pattern:
    extra = [re.escape(k) for k in cfg.confusables if k.lower() not in _NOT_FINDINGS]
    return re.compile(r"\b(" + _FINDING_STEMS + ("|" + "|".join(extra) if extra else "") + r")\b", re.I)


def _segments(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence, list item or line of ``text``."""
    spans, pos = [], 0
    for m in _SEGMENT_SPLIT.finditer(text):
        if m.start() > pos:
            if spans and _ABBREVIATION_END.search(text[spans[-1][0]:spans[-1][1]]):  # "(Fig. 2) shows ..."
                spans[-1] = (spans[-1][0], m.start())
            else:
                spans.append((pos, m.start()))
        pos = m.end()
    if pos < len(text):
        if spans and _ABBREVIATION_END.search(text[spans[-1][0]:spans[-1][1]]):
            spans[-1] = (spans[-1][0], len(text))
        else:
            spans.append((pos, len(text)))
    return spans


def _body(segment: str) -> tuple[str, str]:
    """Split a segment into a prefix (list marker, section header such as "FINDINGS:") and its statement."""
    prefix = ""
    for rx in (_LIST_PREFIX, _HEADER_PREFIX, _LIST_PREFIX):
        m = rx.match(segment[len(prefix):])
        if m:
            prefix += m.group(1)
    return prefix, segment[len(prefix):]


def _in_findings(text: str, cfg: CaptionConfig, fn, every: bool = False, headed=None) -> str | None:
    """Apply ``fn(statement) -> str | None`` to the finding sentences of ``text`` (the first one
    it changes, or all with ``every``); a one-sentence text with no finding term (a region caption
    such as "Left lung in the left middle zone.") is its own statement. ``headed(statement)`` is
    used instead of ``fn`` for a statement under a findings header ("Finding: COVID-19.")."""
    find = _finding_re(cfg)
    spans = _segments(text)
    chosen = [(a, b) for a, b in spans if find.search(text[a:b]) or (headed and _FINDINGS_HEADER.match(text[a:b]))]
    if not chosen and len(spans) == 1 and not _is_view_only(text, find):
        chosen = spans
    out, changed = text, False
    for a, b in reversed(chosen) if every else chosen:
        prefix, body = _body(out[a:b])
        new = (fn(body) if find.search(body) or not headed or not _FINDINGS_HEADER.search(prefix) else headed(body))
        if new is None or normalize(new) == normalize(body):
            continue
        if prefix and new[:1].islower() and not prefix.rstrip().endswith(":"):
            new = new[:1].upper() + new[1:]
        out, changed = out[:a] + prefix + new + out[b:], True
        if not every:
            break
    return out if changed else None


def _is_view_only(segment: str, find: re.Pattern) -> bool:
    return bool(_VIEW_WORDS.search(segment)) and not find.search(segment)


def rule_laterality(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    """Every side word swapped (left <-> right, RUL <-> LUL, bilateral <-> unilateral), so the
    text stays consistent with itself."""
    out = _swap_words(text, LATERALITY_SWAP)
    if out is None:
        out = _swap_words(text, {"bilateral": "unilateral", "bilaterally": "unilaterally", "unilateral": "bilateral"})
    return out


def rule_zone(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    """The first vertical (else radial) position word of a finding sentence swapped."""
    return _in_findings(text, cfg, lambda s: _swap_words(s, VERTICAL_SWAP, count=1) or _swap_words(s, RADIAL_SWAP, count=1))


def rule_size(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    """Size/severity words of a finding sentence swapped, else its first measurement scaled
    (x2.5 or x0.4)."""
    def one(s: str) -> str | None:
        out = _swap_words(s, SIZE_SWAP)
        if out is not None:
            return out
        m = re.search(r"\b(\d+(?:\.\d+)?)\s*(mm|cm)\b", s)
        if m:
            value = float(m.group(1)) * (2.5 if seed % 2 == 0 else 0.4)
            return s[: m.start()] + f"{value:.1f} {m.group(2)}" + s[m.end() :]
        return None

    return _in_findings(text, cfg, one)


def rule_finding(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    """The first confusable term swapped for one of its confusables (:attr:`CaptionConfig.confusables`)."""
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


# Negation cues that can be removed, each with its replacement.
_REMOVALS = [
    (r"\bno evidence of\s+", "evidence of "),
    (r"\bno signs? of\s+", "signs of "),
    (r"\bthere is no\s+", "there is "),
    (r"\bthere are no\s+", "there are "),
    (r"\bwithout\s+", "with "),
    (r"\bnegative for\s+", "positive for "),
    (r"\bfree of\s+", "with "),
    (r"\babsence of\s+", "presence of "),
    (r"\b(is|are|was|were)\s+not\s+", r"\1 "),
    (r"\b(did|does|do|can|could)\s+not\s+", r"\1 "),
    (r"\bno\s+", ""),
]


def _remove_negation(s: str, find: re.Pattern) -> str | None:
    """Remove the first negation cue that governs a finding: the finding follows it within the
    clause (at most 8 words, no change word between: "no change in the effusion" is about change),
    or precedes it as in "effusion is not seen"."""
    for pat, rep in _REMOVALS:
        for m in re.finditer(pat, s, re.I):
            clause = re.split(r"[,;:.]|\bbut\b|\balthough\b", s[m.end():], maxsplit=1)[0]
            f = find.search(clause)
            before = clause[: f.start()] if f else ""
            forward = f is not None and len(before.split()) <= 8 and not _CHANGE_WORDS.search(before)
            backward = (re.match(r"(is|are|was|were)\s+not\s+$", m.group(0), re.I) is not None
                        and re.match(_VISIBILITY + r"\b", s[m.end():], re.I) is not None
                        and find.search(re.split(r"[,;:]", s[: m.start()])[-1]) is not None)
            if not (forward or backward) or _CHANGE_WORDS.match(s[m.end():]):
                continue
            out = s[: m.start()] + m.expand(rep) + s[m.end():]
            if m.start() == 0:
                out = out[:1].upper() + out[1:]
            return out
    return None


def _add_negation(s: str, find: re.Pattern) -> str | None:
    """Negate a positive finding statement: "<verb> no <finding>" after a reporting verb,
    "there is no <finding>", "<finding> is not seen", or "No <finding phrase> ..." when the
    sentence opens with the finding phrase. ``None`` when no pattern fits."""
    if _QUESTION_START.match(s) or "?" in s:
        return None
    m = re.search(r"\b(looks?|appears?|is|are|was|were)\s+(abnormal)\b", s, re.I)
    if m:  # "The lung looks abnormal." -> "The lung looks normal."
        return s[: m.start(2)] + _match_case(m.group(2), "normal") + s[m.end(2):]
    m = _REPORTING_VERBS.search(s)
    if m:
        obj = s[m.end():]
        f = find.search(obj)
        if f and len(obj[: f.start()].split()) <= 8 and not re.match(r"the\b", obj, re.I) and not _CHANGE_WORDS.search(obj[: f.start()]) and not re.match(r"(no|not|normal)\b", obj, re.I):
            rest = _MEASURE.sub("", _DETERMINERS.sub("", obj))
            return s[: m.end()] + "no " + rest
    m = re.search(r"\bthere (is|are)\s+", s, re.I)
    if m:
        obj = s[m.end():]
        f = find.search(re.split(r"[,;]", obj, maxsplit=1)[0])
        if f and not _CHANGE_WORDS.search(obj[: f.start()]) and not re.match(r"(no|not)\b", obj, re.I):
            return s[: m.end()] + "no " + _MEASURE.sub("", _DETERMINERS.sub("", obj))
    m = re.search(r"\b(is|are|was|were)\s+(?=" + _VISIBILITY + r"\b)", s, re.I)
    if m and find.search(s[: m.start()]) and not _CHANGE_WORDS.search(s[: m.start()]):
        return s[: m.end()] + "not " + s[m.end():]
    f = find.search(s)
    lead = s[: f.start()] if f else s
    bare = _MEASURE.sub("", _DETERMINERS.sub("", lead))
    region_caption_like = re.match(r"^[^,:;]{1,60}? in the [\w -]+? (zone|region)\b", s) is not None
    if (f is None and not region_caption_like) or (f and re.search(r"\b(normal|unremarkable|clear)\b", s[f.end():], re.I)):
        return None
    if (len(bare.split()) <= 5 and not re.search(r"[,:;()]|\d", bare) and not _NOT_MODIFIERS.search(bare)
            and not _CHANGE_WORDS.search(bare) and not _VIEW_WORDS.search(bare)
            and not re.match(r"(no|not|normal)\b", bare, re.I)) or (region_caption_like and not _VIEW_WORDS.search(lead)):
        body = _MEASURE.sub("", _DETERMINERS.sub("", s))
        words = body.split()
        # "RUL consolidation" and "Brain Edema" (a label in title case) keep their capitals
        acronym = body[:2].isupper() or (len(words) > 1 and words[1][:1].isupper())
        return "No " + (body if acronym else body[:1].lower() + body[1:])
    return None


def rule_negation(text: str, cfg: CaptionConfig, seed: int) -> str | None:
    """The first finding sentence whose finding can be negated or un-negated, changed: a negation
    cue that governs a finding is removed ("No pleural effusion." -> "Pleural effusion.",
    "without edema" -> "with edema"), else the finding is negated ("shows right lower lobe
    consolidation" -> "shows no right lower lobe consolidation"). A view or technique statement
    ("PA chest radiograph."), a sentence without a finding term, a question, or a phrase about
    change ("no change in ...") is never changed; ``None`` when nothing can be."""
    find = _finding_re(cfg)

    def one(s: str) -> str | None:
        if NEGATION_CUES.search(s):
            out = _remove_negation(s, find)
            if out is not None:
                return out
            if re.search(r"\b(no|not|without)\b", s, re.I):  # negated, but not a finding: leave the sentence alone
                return None
        return _add_negation(s, find)

    def headed(s: str) -> str | None:  # the content of "Finding: ..." is the finding
        if (_NOTHING_FOUND.match(s.strip()) or NEGATION_CUES.match(s) or _QUESTION_START.match(s)
                or _VIEW_WORDS.search(s)):  # "FINDINGS: PA and lateral views." states no finding
            return None
        return "No " + s

    return _in_findings(text, cfg, one, headed=headed)


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


# --------------------------------------------------------------------------- report sentences as region captions

# Side terms of a sentence (the patient's side, as reports write it).
_SIDE_TERMS = [
    ("bilateral", re.compile(r"\b(bilateral(ly)?|both (lungs?|sides|hemithora\w*|lung fields|bases|apices|upper|lower|mid)|"
                             r"bibasal|bibasilar|biapical)\b", re.I)),
    ("right", re.compile(r"\b(right|rul|rml|rll|r\.? ?(upper|middle|lower) lobe)\b", re.I)),
    ("left", re.compile(r"\b(left|lul|lll|lingula\w*)\b", re.I)),
]
# Vertical position terms (a lobe abbreviation counts too).
_VERTICAL_TERMS = [
    ("upper", re.compile(r"\b(upper|apical|apex|apices|rul|lul|superior)\b", re.I)),
    ("middle", re.compile(r"\b(middle|mid|rml|lingula\w*|hilar|perihilar)\b", re.I)),
    ("lower", re.compile(r"\b(lower|basal|bases?|basilar|bibasal|bibasilar|rll|lll|inferior)\b", re.I)),
]
REPORT_CAPTION_RULES = ("anatomy", "laterality", "laterality+zone", "bilateral")


def _terms(text: str, table) -> set[str]:
    return {name for name, rx in table if rx.search(text)}


def _region_side(label: str, loc: dict[str, str]) -> str:
    """The patient's side a region stands for: named in its label ("Right Lung"), else the
    side of its box under the modality's convention (:func:`location`)."""
    named = _terms(label, _SIDE_TERMS[1:])
    return named.pop() if len(named) == 1 else loc.get("side", "")


def match_report_sentences(report: str, regions: list[dict], height: int, cfg: CaptionConfig,
                           zonal_fraction: float = 0.5) -> list[list[dict[str, str]]]:
    """Report sentences that describe each region, matched by anatomy and laterality terms.

    ``regions``: ``{"label", "box", "location"}`` dicts as the builder writes them
    (``location`` from :func:`location`: ``side`` is the *patient's* side, radiological
    convention by default, so a box in the image's left half is the patient's right).
    Only finding sentences about the image (a finding term and an imaging word, or
    "image"/"located" as in QA facts) are candidates; each match is
    ``{"text": sentence, "rule": rule}`` with rule one of :data:`REPORT_CAPTION_RULES`:

    * ``anatomy`` — the sentence names the region's label ("cardiomegaly", "liver"), and
      no side contradicts it (labels naming a side, "Right Lung", are matched by side);
    * ``laterality`` — the sentence names one side (right / left, RUL, lingula, ...)
      and it is the region's side;
    * ``laterality+zone`` — as ``laterality``, and for a zonal box (height below
      ``zonal_fraction`` of the image) the sentence's upper/middle/lower term is the
      box's vertical third; a zonal box whose third the sentence contradicts is not
      matched (a whole-lung box matches on side alone);
    * ``bilateral`` — "bilateral", "both lungs", "bibasal": every region with a side.

    A sentence naming both sides without "bilateral" ("right effusion, left clear") is
    matched to no side-only region (its clauses cannot be told apart by terms).
    Returns one list per region, in sentence order, without repeats."""
    find = _finding_re(cfg)
    sents = []  # (the sentence as written, with its section header; its statement)
    for a, b in _segments(report):
        prefix, body = _body(report[a:b])
        imaging = _IMAGING_WORDS.search(body) or re.search(r"\b(image|picture|located)\b", body, re.I)
        if body and find.search(body) and imaging and not _QUESTION_START.match(body):
            sents.append((_LIST_PREFIX.sub("", report[a:b]).strip(), body.strip()))
    out: list[list[dict[str, str]]] = []
    for reg in regions:
        label = " ".join(str(reg.get("label") or "").split())
        loc = reg.get("location") or {}
        side = _region_side(label, loc)
        box = reg.get("box") or [0, 0, 0, 0]
        zonal = height > 0 and (box[3] - box[1]) < zonal_fraction * height
        # a sided label ("Right Lung") is matched by its side, not by the organ word ("lung disease")
        label_words = "" if _terms(label, _SIDE_TERMS[1:]) else normalize(label)
        matches: list[dict[str, str]] = []
        for written, s in sents:
            sides = _terms(s, _SIDE_TERMS)
            rule = None
            if label_words and len(label_words) > 2 and re.search(rf"\b{re.escape(label_words)}\b", normalize(s)):
                if not (sides - {"bilateral"}) or side in sides or "bilateral" in sides:
                    rule = "anatomy"
            if rule is None and side in ("left", "right"):
                if "bilateral" in sides:
                    rule = "bilateral"
                elif sides == {side}:
                    rule = "laterality"
                    vertical = _terms(s, _VERTICAL_TERMS)
                    if zonal and vertical:
                        rule = "laterality+zone" if loc.get("vertical") in vertical else None
            if rule and all(m["text"] != written for m in matches):
                matches.append({"text": written, "rule": rule})
        out.append(matches)
    return out


def apply_report_captions(regions: list[dict], report: str, height: int, cfg: CaptionConfig) -> int:
    """:func:`attach_report_captions` as ``cfg.report_captions`` says (``extra`` / ``replace`` /
    ``off``); the one call a record builder needs after making its regions. Raises
    ``ValueError`` for another setting."""
    if cfg.report_captions not in ("extra", "replace", "off"):
        raise ValueError(f"captions.report_captions must be extra, replace or off, got {cfg.report_captions!r}")
    if cfg.report_captions == "off":
        return 0
    return attach_report_captions(regions, report, height, cfg, replace=cfg.report_captions == "replace")


def attach_report_captions(regions: list[dict], report: str, height: int, cfg: CaptionConfig,
                           replace: bool = False) -> int:
    """Add to each region the report sentences that describe it (:func:`match_report_sentences`)
    as ``report_captions`` (``[{"text", "rule"}]``), and set ``caption_rule`` on every region:
    ``"location"`` for the label + box-position caption, or, with ``replace``, the first
    matched sentence becomes ``caption`` and ``caption_rule`` is ``"report:<rule>"``.
    Returns the number of regions with at least one matched sentence."""
    matched = 0
    for reg, found in zip(regions, match_report_sentences(report, regions, height, cfg)):
        reg.setdefault("caption_rule", "location")
        if not found:
            continue
        matched += 1
        reg["report_captions"] = found
        if replace:
            reg["caption"], reg["caption_rule"] = found[0]["text"], f"report:{found[0]['rule']}"
    return matched
