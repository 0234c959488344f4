"""The MedRegion record schema (version 1): one JSON record per image.

A MedRegion dataset is a folder of WebDataset tar shards plus ``manifest.json``.
Each sample in a shard has two members with the same key:

* ``<key>.png`` or ``<key>.jpg`` — the image, as stored (grayscale or RGB);
* ``<key>.json`` — the record below.

Record fields (``*`` = required)::

    schema_version*  int, == SCHEMA_VERSION
    id*              str, unique within the dataset; never a patient identifier
    split*           "train" | "val" | "test"
    source           str, where the sample came from ("phantom", "slake", ...)
    modality         str ("xray", "ct", "mri", ...)
    width*, height*  int, size of the stored image in pixels
    summary*         str, short impression
    report*          str, full report text
    negatives        list of {"text", "rule"}: image-level near-miss reports
    regions          list of region dicts:
        box*         [x0, y0, x1, y1], pixels of the stored image, x right, y down,
                     x0 < x1, y0 < y1 (float allowed)
        label        str, finding or organ name
        caption*     str, region caption
        negatives    list of {"text", "rule"}: near-miss captions for this region
        source       str, where the box came from ("annotation", "unsupervised", ...)
        caption_rule     (optional) str, how ``caption`` was made: "location" (label + box
                         position) or "report:<rule>" (a report sentence matched to the box)
        report_captions  (optional) list of {"text", "rule"}: report sentences matched to
                         this box by anatomy/laterality terms (rule: anatomy, laterality,
                         laterality+zone, bilateral)
        kind         (optional) "anatomy" | "finding": whether ``label`` names an organ or
                     structure, or a lesion / abnormality (:data:`REGION_KINDS`); absent
                     (or null) = unknown. Set by the dataset builder from what the input
                     says (a COCO supercategory, a public set's class list) or the source
                     options ``label_kinds`` / ``finding_labels`` / ``anatomy_labels`` /
                     ``kind`` (:mod:`regionmed.apps.curation.sources.kinds`); used to report
                     grounding separately for anatomy and for findings.
    labels           {class name: 0 | 1}
    group            str, split group (a hashed patient key or the image id)
    meta             {str: str | int | float}, allow-listed non-identifying attributes

Boxes are checked by :func:`sanitize_regions`: boxes partly outside the image are
clipped, boxes outside or of zero area are dropped, and both are counted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from regionmed.errors import RegionmedError

SCHEMA_VERSION = 1
FORMAT_NAME = "medregion"
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
REGION_KINDS = ("anatomy", "finding")  # values of a region's optional "kind"

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def label_words(label: str) -> str:
    """A class name as lower-case words: ``ActiveTuberculosis``, ``active_tuberculosis`` and
    ``Active Tuberculosis`` all give ``"active tuberculosis"`` (detection exports often write
    class names in CamelCase or snake_case). The one rule by which a region label becomes
    text: the builder's captions, the grounding term's phrases and evaluation's phrases."""
    return " ".join(_CAMEL.sub(" ", str(label)).replace("_", " ").split()).lower()


class RecordError(RegionmedError, ValueError):
    """A record that does not follow the MedRegion schema."""


@dataclass
class BoxStats:
    """Counts of boxes changed or dropped while sanitising records."""

    kept: int = 0
    clipped: int = 0
    dropped_outside: int = 0
    dropped_zero_area: int = 0
    dropped_invalid: int = 0

    def add(self, other: "BoxStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def dropped(self) -> int:
        return self.dropped_outside + self.dropped_zero_area + self.dropped_invalid

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class Region:
    box: tuple[float, float, float, float]
    caption: str
    label: str = ""
    negatives: list[dict[str, str]] = field(default_factory=list)
    source: str = "annotation"
    kind: str | None = None  # "anatomy" | "finding" | None (unknown)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "box": [float(v) for v in self.box],
            "label": self.label,
            "caption": self.caption,
            "negatives": list(self.negatives),
            "source": self.source,
        }
        if self.kind is not None:
            out["kind"] = self.kind
        return out


def _where(record: dict, where: str | None) -> str:
    rid = record.get("id", "?") if isinstance(record, dict) else "?"
    return f"{where}: record {rid!r}" if where else f"record {rid!r}"


def validate_record(record: Any, where: str | None = None) -> dict:
    """Check one record against schema version 1 and return it.

    Raises :class:`RecordError` naming the record and the bad field.
    ``where`` (e.g. a shard path) is put in front of the message.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where or 'record'}: expected a JSON object, got {type(record).__name__}")
    ctx = _where(record, where)
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{ctx}: field 'schema_version' is {version!r}, this regionmed reads {SCHEMA_VERSION}")
    for name in ("id", "summary", "report"):
        if not isinstance(record.get(name), str):
            raise RecordError(f"{ctx}: field {name!r} must be a string")
    if not record["id"]:
        raise RecordError(f"{ctx}: field 'id' is empty")
    if record.get("split") not in SPLITS:
        raise RecordError(f"{ctx}: field 'split' is {record.get('split')!r}, expected one of {SPLITS}")
    for name in ("width", "height"):
        value = record.get(name)
        if not isinstance(value, int) or value <= 0:
            raise RecordError(f"{ctx}: field {name!r} must be a positive integer, got {value!r}")
    _check_negatives(record.get("negatives", []), f"{ctx}: field 'negatives'")
    regions = record.get("regions", [])
    if not isinstance(regions, list):
        raise RecordError(f"{ctx}: field 'regions' must be a list")
    for j, region in enumerate(regions):
        rctx = f"{ctx}: regions[{j}]"
        if not isinstance(region, dict):
            raise RecordError(f"{rctx} must be an object")
        box = region.get("box")
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise RecordError(f"{rctx}.box must be [x0, y0, x1, y1] numbers, got {box!r}")
        if not isinstance(region.get("caption"), str):
            raise RecordError(f"{rctx}.caption must be a string")
        _check_negatives(region.get("negatives", []), f"{rctx}.negatives")
        if "caption_rule" in region and not isinstance(region["caption_rule"], str):
            raise RecordError(f"{rctx}.caption_rule must be a string")
        _check_negatives(region.get("report_captions", []), f"{rctx}.report_captions")
        if region.get("kind") is not None and region["kind"] not in REGION_KINDS:
            raise RecordError(f"{rctx}.kind is {region['kind']!r}, expected one of {REGION_KINDS} (or no kind: unknown)")
    labels = record.get("labels", {})
    if not isinstance(labels, dict):
        raise RecordError(f"{ctx}: field 'labels' must be an object")
    return record


def _check_negatives(negatives: Any, ctx: str) -> None:
    if not isinstance(negatives, list):
        raise RecordError(f"{ctx} must be a list")
    for k, neg in enumerate(negatives):
        if not (isinstance(neg, dict) and isinstance(neg.get("text"), str)):
            raise RecordError(f"{ctx}[{k}] must be an object with a string 'text'")


def sanitize_box(
    box: list[float] | tuple[float, ...], width: int, height: int, min_size: float = 1.0
) -> tuple[tuple[float, float, float, float] | None, str]:
    """Clip a pixel xyxy box to the image.

    Returns ``(box, status)``; status is ``"kept"``, ``"clipped"``, ``"outside"``,
    ``"zero_area"`` or ``"invalid"`` (NaN/inf or x1 < x0); the box is ``None`` when
    dropped. A box is zero-area when a side is below ``min_size`` pixels after clipping.
    """
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return None, "invalid"
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        return None, "invalid"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return None, "outside"
    cx0, cy0 = max(0.0, x0), max(0.0, y0)
    cx1, cy1 = min(float(width), x1), min(float(height), y1)
    if cx1 - cx0 < min_size or cy1 - cy0 < min_size:
        return None, "zero_area"
    status = "clipped" if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1) else "kept"
    return (cx0, cy0, cx1, cy1), status


def sanitize_regions(record: dict, stats: BoxStats | None = None) -> tuple[list[dict], BoxStats]:
    """Return the record's regions with boxes clipped to the image; drop bad ones.

    The record itself is not changed. ``stats`` (if given) is updated in place.
    """
    local = BoxStats()
    kept: list[dict] = []
    for region in record.get("regions", []):
        box, status = sanitize_box(region["box"], record["width"], record["height"])
        if box is None:
            if status == "outside":
                local.dropped_outside += 1
            elif status == "zero_area":
                local.dropped_zero_area += 1
            else:
                local.dropped_invalid += 1
            continue
        if status == "clipped":
            local.clipped += 1
        local.kept += 1
        kept.append({**region, "box": list(box)})
    if stats is not None:
        stats.add(local)
    return kept, local
