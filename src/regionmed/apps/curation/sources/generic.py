"""Generic sources: a folder of images + a table (CSV/JSONL), optional COCO boxes; DICOM folders."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from regionmed.apps.curation.items import RawBox, RawItem, hashed, norm_modality
from regionmed.apps.curation.sources.base import Source, SourceError


def _parse_labels(value) -> dict[str, int]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): int(bool(v)) for k, v in value.items()}
    if isinstance(value, list):
        return {str(v): 1 for v in value if str(v).strip()}
    text = str(value).strip()
    if text.startswith(("{", "[")):
        try:
            return _parse_labels(json.loads(text))
        except json.JSONDecodeError:
            pass
    sep = "|" if "|" in text else ("," if "," in text else ";")
    return {p.strip(): 1 for p in text.split(sep) if p.strip()}


def _parse_boxes(value, box_format: str) -> list[RawBox]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [RawBox("?", [float("nan")] * 4)]
    out = []
    for entry in value if isinstance(value, list) else []:
        if isinstance(entry, dict):
            label, box = str(entry.get("label", entry.get("class", "region"))), entry.get("box", entry.get("bbox"))
        else:
            label, box = "region", entry
        try:
            b = [float(v) for v in box]
        except (TypeError, ValueError):
            b = [float("nan")] * 4
        if len(b) == 4 and box_format == "xywh":
            b = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
        out.append(RawBox(label, b))
    return out


def read_table(path: Path) -> Iterator[dict]:
    """Rows of a CSV or JSONL file, streamed."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SourceError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            yield from csv.DictReader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        raise SourceError(f"{path}: table must be .csv, .tsv or .jsonl")


class GenericSource(Source):
    """A folder of images plus a table with one row per image.

    Options (column names are configurable):
    ``table`` (CSV/TSV/JSONL, relative to the folder; default ``table.csv`` /
    ``table.jsonl``), ``image_col`` ("image"), ``report_col`` ("report"),
    ``summary_col`` ("summary"), ``labels_col`` ("labels": "a|b", JSON list or dict),
    ``patient_col`` ("patient_id"; hashed before use), ``split_col`` ("split"),
    ``boxes_col`` ("boxes": JSON ``[{"label", "box"}]``), ``box_format``
    ("xyxy" or "xywh"), ``modality_col`` ("modality"), ``modality`` (default
    modality), ``body`` (body region, e.g. "chest"), ``coco`` (COCO json with
    boxes; images matched by ``file_name``), ``id_from`` ("hash": ids are a
    hash of the image path, never the path itself; or "stem").
    """

    name = "generic"
    options = ("table", "image_col", "report_col", "summary_col", "labels_col", "patient_col", "split_col",
               "boxes_col", "box_format", "modality_col", "modality", "body", "coco", "id_from")

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        o = self.opts
        table = o.get("table")
        if table is None:
            for cand in ("table.csv", "table.jsonl", "reports.csv", "reports.jsonl"):
                if (self.root / cand).is_file():
                    table = cand
                    break
        self.table = (self.root / table) if table else None
        if self.name == "generic" and (self.table is None or not self.table.is_file()):
            raise SourceError(f"generic: table {self.table or '(none given)'} not found under {self.root}")
        self.box_format = o.get("box_format", "xyxy")
        if self.box_format not in ("xyxy", "xywh"):
            raise SourceError(f"{self.name}: box_format must be 'xyxy' or 'xywh', got {self.box_format!r}")
        self.id_from = o.get("id_from", "hash")
        if self.id_from not in ("hash", "stem"):
            raise SourceError(f"{self.name}: id_from must be 'hash' or 'stem', got {self.id_from!r}")

    def _coco_boxes(self) -> dict[str, list[RawBox]]:
        coco_path = self.opts.get("coco")
        if not coco_path:
            return {}
        path = self.root / coco_path
        if not path.is_file():
            raise SourceError(f"{self.name}: COCO file {path} not found")
        coco = json.loads(path.read_text(encoding="utf-8"))
        cats = {c["id"]: c["name"] for c in coco.get("categories", [])}
        names = {i["id"]: i["file_name"] for i in coco.get("images", [])}
        out: dict[str, list[RawBox]] = {}
        for ann in coco.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            out.setdefault(names.get(ann["image_id"], ""), []).append(RawBox(cats.get(ann.get("category_id"), "region"), [x, y, x + w, y + h]))
        return out

    def _count(self):
        if self.table is None:
            return None
        return sum(1 for _ in read_table(self.table))

    def _make_id(self, rel: str) -> str:
        if self.id_from == "stem":
            return f"{self.name}-{Path(rel).stem}"
        return f"{self.name}-{hashed(rel, 'regionmed-id')}"

    def _row_item(self, row: dict, n: int, coco: dict[str, list[RawBox]]) -> RawItem:
        o = self.opts
        rel = str(row.get(o.get("image_col", "image")) or "")
        boxes = _parse_boxes(row.get(o.get("boxes_col", "boxes")), self.box_format) + coco.get(rel, [])
        pid = str(row.get(o.get("patient_col", "patient_id")) or "").strip()
        split = str(row.get(o.get("split_col", "split")) or "").strip().lower() or None
        if split in ("valid", "validate", "validation", "dev"):
            split = "val"
        if split not in (None, "train", "val", "test"):
            split = None
        item_id = self._make_id(rel or f"row{n}")
        return RawItem(
            id=item_id,
            source=self.name,
            image_path=str(self.root / rel) if rel else None,
            report=str(row.get(o.get("report_col", "report")) or ""),
            summary=str(row.get(o.get("summary_col", "summary")) or ""),
            boxes=boxes,
            split=split,
            group=f"{self.name}/patient/{pid}" if pid else None,
            modality=norm_modality(str(row.get(o.get("modality_col", "modality")) or o.get("modality", "") or "")),
            body=str(o.get("body", "")),
            labels=_parse_labels(row.get(o.get("labels_col", "labels"))),
            ref=f"{self.table.name if self.table else self.name} row {n}",
        )

    def _items(self) -> Iterator[RawItem]:
        coco = self._coco_boxes()
        for n, row in enumerate(read_table(self.table), 1):
            yield self._row_item(row, n, coco)


class DicomSource(GenericSource):
    """A folder of DICOM files. With a table (as for ``generic``) rows name the
    files; without one, every ``*.dcm`` under the folder is an item and its
    report is read from ``<stem>.txt`` beside it. Modality and body part come
    from the allow-listed DICOM attributes. Ids are hashes of the file path."""

    name = "dicom"

    def _files(self):
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))

    def _count(self):
        return super()._count() if self.table else len(self._files())

    def _items(self) -> Iterator[RawItem]:
        if self.table:
            for item in super()._items():
                item.modality = item.modality if item.modality != "unknown" else "auto"
                yield item
            return
        for n, path in enumerate(self._files(), 1):
            rel = str(path.relative_to(self.root))
            txt = path.with_suffix(".txt")
            report = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
            yield RawItem(
                id=self._make_id(rel),
                source=self.name,
                image_path=str(path),
                report=report,
                modality="auto",
                body=str(self.opts.get("body", "")),
                ref=f"dicom file #{n}",
            )
