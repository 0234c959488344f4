"""Chest radiographs with clinical notes and lung boxes (``images/``, ``annotations.json``, ``metadata.csv``)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator

from regionmed.apps.curation.items import RawBox, RawItem
from regionmed.apps.curation.sources.base import Source, SourceError

# The only metadata columns that may reach records.
ALLOWED_META = ("view",)


class CovidCxrSource(Source):
    """One item per COCO image. No official split: the builder splits by the
    (hashed) patient id. Report = the clinical notes; when a row has no notes
    but a known finding, a one-line report is made from the finding and view."""

    name = "covid_cxr"

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        if not (self.root / "annotations.json").is_file():
            raise SourceError(f"covid_cxr: {self.root / 'annotations.json'} is missing")

    def _coco(self):
        return json.loads((self.root / "annotations.json").read_text(encoding="utf-8"))

    def _count(self):
        return len(self._coco().get("images", []))

    def _items(self) -> Iterator[RawItem]:
        coco = self._coco()
        cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
        boxes: dict[int, list[RawBox]] = {}
        for ann in coco.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.setdefault(ann["image_id"], []).append(RawBox(cats.get(ann.get("category_id"), "region"), [x, y, x + w, y + h]))
        rows: dict[str, dict] = {}
        meta_path = self.root / "metadata.csv"
        if meta_path.is_file():
            with open(meta_path, newline="", encoding="utf-8", errors="replace") as fh:
                for row in csv.DictReader(fh):
                    rows.setdefault(row.get("filename", ""), row)
        for img in sorted(coco.get("images", []), key=lambda i: i["file_name"]):
            row = rows.get(img["file_name"]) or {k: str(v) for k, v in (img.get("metadata") or {}).items()}
            finding = (row.get("finding") or "").strip()
            labels = {}
            if finding and finding.lower() != "todo":
                for part in finding.replace("/", ",").split(","):
                    if part.strip():
                        labels[part.strip()] = 1
            notes = (row.get("clinical_notes") or "").strip()
            view = (row.get("view") or "").strip()
            if not notes and labels:
                notes = f"Chest radiograph{f' ({view} view)' if view else ''}. Finding: {', '.join(labels)}."
            pid = (row.get("patientid") or "").strip()
            stem = img["file_name"].rsplit(".", 1)[0]
            yield RawItem(
                id=f"covid_cxr-{img['id']}",
                source=self.name,
                image_path=str(self.root / "images" / img["file_name"]),
                report=notes,
                boxes=boxes.get(img["id"], []),
                split=None,
                group=f"covid_cxr/patient/{pid}" if pid else f"covid_cxr/image/{stem}",
                modality="xray",
                body="chest",
                labels=labels,
                meta={k: row[k].strip() for k in ALLOWED_META if (row.get(k) or "").strip()},
                ref=f"annotations.json image {img['id']}",
            )
