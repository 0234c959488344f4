"""Raw items: what a :class:`~regionmed.apps.curation.sources.Source` yields before processing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from regionmed.errors import RegionmedError

# Reasons written to rejects.jsonl (the "reason" field).
REJECT_REASONS = {
    "unreadable_image": "the image file is missing, empty or cannot be decoded",
    "truncated_image": "the image file ends early (truncated)",
    "decompression_bomb": "the image declares more pixels than max_image_pixels",
    "unsupported_dicom": "DICOM that cannot be used (multi-frame, unsupported transfer syntax, no pixel data)",
    "empty_report": "no usable report text after cleaning (missing-value spellings such as 'nan' count as none)",
    "malformed_row": "a table row with more or fewer fields than the header, or a JSONL line that is no JSON object",
    "invalid_label": "a label value that is not 1/0/-1, true/false, yes/no, positive/negative/uncertain",
    "undecodable_text": "a report text file that is not valid in the source's encoding",
    "box_outside": "a box lies outside the image after clipping (region dropped)",
    "zero_area_box": "a box has (near) zero area after clipping (region dropped)",
    "invalid_box": "a box is malformed: not 4 finite numbers, or x1 <= x0 / y1 <= y0 (region dropped)",
    "unknown_category": "a box whose class (COCO category_id, YOLO class id, VOC name) is not among the declared "
                        "classes (region dropped)",
    "size_mismatch": "a box file states an image size (VOC <size>) other than the image's (region dropped)",
    "difficult_box": "a VOC object marked <difficult> while the source option difficult is 'reject' (region dropped)",
    "unmatched_box": "a box whose image matches no input of the source (region dropped; no item to attach it to)",
    "no_regions": "no region left and require_regions is on",
    "duplicate_id": "an earlier input of the build has the same id",
    "processing_error": "an unexpected error while processing the item",
}


class ItemReject(RegionmedError):
    """An input that cannot go into the dataset; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# Reasons that concern one region (a box), not a whole item.
REGION_REASONS = ("box_outside", "zero_area_box", "invalid_box", "unknown_category", "unmatched_box", "size_mismatch",
                  "difficult_box")


@dataclass
class RawBox:
    """One given box: ``box`` is ``[x0, y0, x1, y1]`` in pixels of the *source* image.

    ``reject`` (a key of :data:`REJECT_REASONS`) marks a box already known to be
    unusable when it was read (``unknown_category``, ``invalid_box``); the builder
    drops it as a region-level reject with ``detail``. ``given`` and ``fmt`` keep the
    four numbers as written and the configurable format they were read in
    (``"xyxy"``/``"xywh"``; ``None`` when the file format fixes it, as COCO does), for
    the box-format check of :meth:`~regionmed.apps.curation.sources.Source.check`.

    ``normalized``: ``box`` is in fractions of the image's width and height (YOLO), turned
    into pixels of the decoded image by the annotation proposer. ``ref_size``: ``(w, h)``
    of the image the box was drawn on, when the box file states it (VOC ``<size>``); the
    builder rejects the box (``size_mismatch``) when the decoded image has another size.
    ``kind``: what the input says the label is (``"anatomy"``/``"finding"``, e.g. a COCO
    supercategory); the source's options may override it
    (:class:`~regionmed.apps.curation.sources.kinds.LabelKinds`).
    """

    label: str
    box: list[float]
    reject: str | None = None
    detail: str = ""
    given: list[float] | None = None
    fmt: str | None = None
    normalized: bool = False
    ref_size: tuple[int, int] | None = None
    kind: str | None = None


@dataclass
class RawItem:
    """One input before processing. Cheap to create: no image is decoded here.

    ``id`` must be unique within a build and never a patient identifier.
    ``group`` is a raw grouping key (e.g. a patient id): the builder hashes it
    before it reaches any output. ``split`` is the official split, if any.
    ``facts`` are sentences that make up the report when ``report`` is empty.
    ``ref`` is a non-identifying reference to the input for rejects.jsonl.
    ``reject`` is ``(reason, detail)`` when the source already knows the item cannot
    be used (a malformed table row, an invalid label): the builder rejects it
    without decoding anything. ``kinds`` maps box labels to their kind (``"anatomy"`` /
    ``"finding"``), filled by :class:`~regionmed.apps.curation.sources.Source` from the
    boxes and the source's kind options; the builder writes it as each region's ``kind``.
    """

    id: str
    source: str
    image_path: str | None = None
    image_bytes: bytes | None = None
    report: str = ""
    summary: str = ""
    facts: list[str] = field(default_factory=list)
    boxes: list[RawBox] = field(default_factory=list)
    split: str | None = None
    group: str | None = None
    modality: str = "unknown"
    body: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    ref: str = ""
    reject: tuple[str, str] | None = None
    kinds: dict[str, str] = field(default_factory=dict)


def hashed(text: str, salt: str = "", n: int = 16) -> str:
    """A short, salted SHA-256 hex digest (for group keys and ids derived from paths)."""
    return hashlib.sha256(f"{salt}\x00{text}".encode("utf-8")).hexdigest()[:n]


def norm_modality(value: str) -> str:
    v = (value or "").strip().lower().replace("-", "").replace(" ", "").replace("_", "")
    table = {
        "xray": "xray", "cr": "xray", "dx": "xray", "dr": "xray", "radiograph": "xray", "plainfilm": "xray",
        "ct": "ct", "cta": "ct", "mri": "mri", "mr": "mri", "us": "us", "ultrasound": "us",
        "mg": "mammography", "mammography": "mammography", "pt": "pet", "pet": "pet",
    }
    return table.get(v, v or "unknown")
