"""Chest radiographs with clinical notes and lung boxes (``images/``, ``annotations.json``, ``metadata.csv``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from regionmed.apps.curation.items import RawItem
from regionmed.apps.curation.sources.base import Source, SourceError, SourceReport
from regionmed.apps.curation.sources.coco import read_coco
from regionmed.apps.curation.tables import Row, Table, read_json, require_columns
from regionmed.data.missing import is_placeholder_id

# The only metadata columns that may reach records.
ALLOWED_META = ("view",)


# The metadata columns this source reads; every other column is left out by design (PHI, clinical data).
READ_COLUMNS = ("filename", "patientid", "finding", "clinical_notes", "view")


class CovidCxrSource(Source):
    """One item per COCO image. No official split: the builder splits by the
    (hashed) patient id. Report = the clinical notes; when a row has no notes
    but a known finding, a one-line report is made from the finding and view.
    The boxes are the dataset's lung boxes: their label kind is ``anatomy``."""

    name = "covid_cxr"
    reads = ("annotations.json (COCO: images, lung boxes, categories), images/, metadata.csv columns "
             + ", ".join(READ_COLUMNS))

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        if not (self.root / "annotations.json").is_file():
            raise SourceError(f"covid_cxr: {self.root / 'annotations.json'} is missing")
        self._meta: Table | None = None

    def _coco(self):
        return read_coco(self.root / "annotations.json", self.encoding)

    def _raw_images(self) -> list[dict]:
        data = read_json(self.root / "annotations.json", self.encoding)
        return [im for im in data.get("images", []) if isinstance(im, dict)] if isinstance(data, dict) else []

    def _count(self):
        return len(self._coco().images)

    def _items(self) -> Iterator[RawItem]:
        coco = self._coco()
        self._rep.orphans = [{**o, "source": self.name} for o in coco.orphans]
        metadata = {str(im.get("id")): im.get("metadata") or {} for im in self._raw_images()}
        rows: dict[str, Row] = {}
        meta_path = self.uses(self.root / "metadata.csv")
        if meta_path.is_file():
            table = self._meta = Table(meta_path, self.encoding)
            table.header()
            require_columns(table, {c: "a column of the covid_cxr layout" for c in READ_COLUMNS}, f"{self.name} ({meta_path})")
            bad = []
            for row in table.rows():
                if row.problem:
                    bad.append(row.problem)
                    continue
                rows.setdefault(row.text("filename"), row)
            if bad:
                self._rep.warnings.append(f"{self.name}: {len(bad)} metadata.csv rows do not fit the header and are "
                                          f"ignored (their images get no notes), e.g. {bad[0]}")
        for img_id, file_name in sorted(coco.images.items(), key=lambda kv: kv[1]):
            row = rows.get(file_name) or Row(0, 0, {k: str(v) for k, v in metadata.get(img_id, {}).items()})
            finding = row.text("finding")
            labels = {}
            if finding and finding.lower() != "todo":
                for part in finding.replace("/", ",").split(","):
                    if part.strip():
                        labels[part.strip()] = 1
            notes = row.text("clinical_notes")
            view = row.text("view")
            if not notes and labels:
                notes = f"Chest radiograph{f' ({view} view)' if view else ''}. Finding: {', '.join(labels)}."
            pid = row.text("patientid")
            pid = "" if is_placeholder_id(pid) else pid
            stem = file_name.rsplit(".", 1)[0]
            yield RawItem(
                id=f"covid_cxr-{img_id}",
                source=self.name,
                image_path=str(self.root / "images" / file_name),
                report=notes,
                boxes=[dataclasses.replace(b, kind="anatomy") for b in coco.boxes.get(img_id, [])],
                split=None,
                group=f"covid_cxr/patient/{pid}" if pid else f"covid_cxr/image/{stem}",
                modality="xray",
                body="chest",
                labels=labels,
                meta={k: row.text(k) for k in ALLOWED_META if row.text(k)},
                ref=f"annotations.json image {img_id}",
            )

    def _after_check(self, rep: SourceReport) -> None:
        if self._meta is not None:
            rep.columns_read = [c for c in READ_COLUMNS if c in self._meta.columns]
            rep.columns_unused = [c for c in self._meta.columns if c and c not in READ_COLUMNS]
            if rep.columns_unused:
                rep.notes.append(f"{self.name}: metadata.csv columns not used (by design): {', '.join(rep.columns_unused)}")
