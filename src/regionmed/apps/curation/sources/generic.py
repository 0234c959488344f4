"""Generic sources: a folder of images + a table (CSV/TSV/JSONL), optional COCO boxes; DICOM folders."""

from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from regionmed.apps.curation.items import RawItem, hashed, norm_modality
from regionmed.apps.curation.sources.base import Source, SourceError, SourceReport
from regionmed.apps.curation.sources.coco import CocoJoin, join_coco, norm_path, path_shape, read_coco
from regionmed.apps.curation.sources.fields import FieldError, LabelParser, parse_boxes, uncertain_policy
from regionmed.apps.curation.sources.labelfiles import LABEL_OPTIONS, LabelSet, label_set_from_options
from regionmed.apps.curation.tables import Row, Table, TableError, read_text, require_columns
from regionmed.data.missing import is_placeholder_id

# Column options of the generic and dicom sources, with their default column names.
COLUMN_OPTIONS = {
    "image_col": "image",
    "report_col": "report",
    "summary_col": "summary",
    "labels_col": "labels",
    "patient_col": "patient_id",
    "split_col": "split",
    "boxes_col": "boxes",
    "modality_col": "modality",
}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test", "holdout": "test"}
TABLE_CANDIDATES = ("table.csv", "table.tsv", "table.jsonl", "reports.csv", "reports.tsv", "reports.jsonl")


def read_table(path: Path, encoding: str = "utf-8") -> Iterator[dict]:
    """Rows of a CSV/TSV or JSONL file as dicts, streamed (see :class:`~regionmed.apps.curation.tables.Table`).

    A row that does not fit the header raises :class:`~regionmed.apps.curation.tables.TableError`;
    sources use :class:`Table` directly and reject such rows instead."""
    for row in Table(Path(path), encoding).rows():
        if row.problem:
            raise TableError(f"{path}: {row.problem}")
        yield row.cells


def _text_cell(row: Row, column: str) -> str:
    v = row.value(column)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return " ".join(s for s in v if s.strip())
    return "" if v is None else str(v)


class GenericSource(Source):
    """A folder of images plus a table with one row per image.

    Options (column names are configurable):
    ``table`` (CSV/TSV/JSONL, relative to the folder; default the first of
    ``table.csv``, ``table.tsv``, ``table.jsonl``, ``reports.csv``, ...), ``encoding``
    (default ``utf-8``, strict; e.g. ``cp1252``), ``delimiter`` (default ``,``; tab for
    ``.tsv``), ``image_col`` ("image": path relative to the folder or to the table's
    folder), ``report_col`` ("report"), ``summary_col`` ("summary"), ``labels_col``
    ("labels": ``a|b``, a JSON list or ``{class: value}``, or one label value, the
    column being the class), ``label_cols`` (columns that each hold one class's value,
    CheXpert style; a list or ``A,B,C``), ``uncertain_labels`` (``U-Ignore`` default,
    ``U-Zeros``, ``U-Ones``: what ``-1`` becomes), ``patient_col`` ("patient_id";
    hashed before use), ``split_col`` ("split"), ``boxes_col`` ("boxes": JSON
    ``[{"label", "box"}]``), ``box_format`` ("xyxy" default or "xywh"),
    ``modality_col`` ("modality"), ``modality`` (default modality), ``body`` (body
    region, e.g. "chest"), ``coco`` (COCO json with boxes; images joined by path
    relative to the COCO file, the folder or the table, else by unique file name),
    ``yolo`` (a folder of YOLO ``.txt`` labels, with ``classes``) or ``voc`` (a folder of
    Pascal VOC ``.xml``, with ``voc_origin``, ``difficult``, optional ``classes``): label
    files matched to the table's images by path (relative to the labels folder's sibling
    ``images/``, the source folder or the table's folder), VOC ``<filename>``, else a
    unique file stem (:mod:`.labelfiles`); ``id_from`` ("hash": ids are a hash of the
    image path, never the path itself; or "stem").

    The image column and a report or summary column must be in the table; so must
    every column named by an option. Columns the source does not read are named in
    the build's warnings. See :mod:`.fields` for label and box values.
    """

    name = "generic"
    options = ("table", "delimiter", *COLUMN_OPTIONS, "label_cols", "uncertain_labels",
               "box_format", "modality", "body", "coco", *LABEL_OPTIONS, "id_from")
    reads = ("table.csv/.tsv/.jsonl (option table) with columns image (image_col), report (report_col), "
             "summary (summary_col), labels (labels_col), per-class label columns (label_cols), "
             "patient_id (patient_col), split (split_col), boxes (boxes_col), modality (modality_col); "
             "optional COCO json (coco), YOLO labels (yolo, classes) or VOC XML (voc)")

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        o = self.opts
        table = o.get("table")
        if table is None:
            table = next((c for c in TABLE_CANDIDATES if (self.root / c).is_file()), None)
        self.table = (self.root / str(table)) if table else None
        if self.name == "generic" and (self.table is None or not self.table.is_file()):
            raise SourceError(f"generic: table {self.table or '(none given)'} not found under {self.root}")
        if self.table is not None:
            try:
                Table(self.table, self.encoding, o.get("delimiter"))
            except TableError as err:
                raise SourceError(f"{self.name}: {err}") from None
        self.box_format = o.get("box_format", "xyxy")
        if self.box_format not in ("xyxy", "xywh"):
            raise SourceError(f"{self.name}: box_format must be 'xyxy' or 'xywh', got {self.box_format!r}")
        self.id_from = o.get("id_from", "hash")
        if self.id_from not in ("hash", "stem"):
            raise SourceError(f"{self.name}: id_from must be 'hash' or 'stem', got {self.id_from!r}")
        try:
            self.policy = uncertain_policy(o.get("uncertain_labels", "U-Ignore"), f"{self.name}: option uncertain_labels")
        except FieldError as err:
            raise SourceError(str(err)) from None
        self.cols = {opt: str(o.get(opt, default)) for opt, default in COLUMN_OPTIONS.items()}
        lc = o.get("label_cols") or []
        self.label_cols = [c.strip() for c in (lc.split(",") if isinstance(lc, str) else lc) if str(c).strip()]
        self._table_obj: Table | None = None
        self._splits: Counter = Counter()  # split values not understood, counted while reading
        self.label_set: LabelSet | None = label_set_from_options(o, self.root, self.encoding, self.name,
                                                                 self.id_from == "stem")

    def label_files(self) -> list[Path]:
        """The YOLO / VOC label and class-names files the source reads (empty without them)."""
        return self.label_set.files_read() if self.label_set is not None else []

    # ------------------------------------------------------------------ helpers

    def _open_table(self) -> Table:
        return Table(self.table, self.encoding, self.opts.get("delimiter"))

    def _required(self) -> dict[str, str]:
        """{column: option} of the columns that must be in the table."""
        want = {self.cols["image_col"]: "image_col"}
        for opt in COLUMN_OPTIONS:
            if opt in self.opts:
                want[self.cols[opt]] = opt
        for c in self.label_cols:
            want[c] = "label_cols"
        return want

    def _check_columns(self, table: Table) -> None:
        require_columns(table, self._required(), f"{self.name} ({table.path})")
        c = self.cols
        if c["report_col"] not in table.columns and c["summary_col"] not in table.columns:
            require_columns(table, {c["report_col"]: "report_col"}, f"{self.name} ({table.path}) (a report or summary column is needed)")

    def _resolve(self, rel: str) -> str:
        """The image path of a cell: relative to the source folder, else to the table's folder."""
        cands = [norm_path(self.root, rel)]
        if self.table is not None and self.table.parent.resolve() != self.root.resolve():
            cands.append(norm_path(self.table.parent, rel))
        return next((c for c in cands if os.path.exists(c)), cands[0])

    def _join_coco(self, table: Table) -> CocoJoin:
        path = self.root / str(self.opts["coco"])
        if not path.is_file():
            raise SourceError(f"{self.name}: COCO file {path} not found")
        coco = read_coco(path, self.encoding)
        image_col = self.cols["image_col"]
        cells = [row.text(image_col) for row in table.rows()]
        paths = [self._resolve(c) for c in cells if c]
        bases = [path.parent, self.root] + ([self.table.parent] if self.table is not None else [])
        join = join_coco(coco, paths, bases)
        rep = self._rep
        rep.orphans = [{**o, "source": self.name} for o in join.orphans]
        declared = join.boxes + sum(o["reason"] == "unmatched_box" for o in coco.orphans)
        lost = sum(o["reason"] == "unmatched_box" for o in join.orphans)
        if coco.annotations == 0:
            rep.warnings.append(f"{self.name}: COCO file {path.name} has no annotations")
        elif declared and lost == declared:
            first_coco = next((f for i, f in coco.images.items() if coco.boxes.get(i)), "")
            first_table = next((c for c in cells if c), "")
            raise SourceError(
                f"{self.name}: none of the {declared} boxes in {path.name} reaches an image of the table "
                f"{table.name}: COCO file_name looks like {path_shape(first_coco)!r}, the column "
                f"{image_col!r} like {path_shape(first_table)!r}. A file_name is matched relative to the COCO "
                f"file's folder, the source folder or the table's folder, else by file name when exactly one "
                f"table image has it")
        elif lost:
            rep.warnings.append(f"{self.name}: {lost} of {declared} boxes in {path.name} reach no image of "
                                f"{table.name} (written to rejects.jsonl as unmatched_box)")
        if join.how.get("file name"):
            rep.notes.append(f"{self.name}: {join.how['file name']} COCO images of {path.name} matched to the table "
                             "by file name alone (unique in the table)")
        return join

    def _join_labels(self, paths: list[str], what: str) -> dict[str, list]:
        """{image path: boxes} from the YOLO / VOC label files for the source's image ``paths``
        (absolute, normalised); unmatched label files become orphans and a warning. ``what``
        names the images in messages ("image of the table t.csv")."""
        labels = self.label_set
        bases = [labels.folder.parent / "images", self.root] + ([self.table.parent] if self.table is not None else [])
        matched = labels.match(paths, [b for b in bases if b.is_dir()])
        if labels.files and not matched:
            raise SourceError(
                f"{self.name}: none of the {len(labels.files)} label files in {labels.folder} matches an {what}: "
                f"labels look like {path_shape(labels.files[0])!r}, the images like "
                f"{path_shape(os.path.relpath(paths[0], self.root)) if paths else '(none)'!r}. A label file matches the "
                "image with the same path under the labels folder's sibling images/, the source folder or the table's "
                "folder, else the one image with its file stem")
        orphans, _ = labels.orphans(self.name)
        self._rep.orphans = list(self._rep.orphans) + orphans
        warning = labels.unmatched_warning(self.name, what)
        if warning:
            self._rep.warnings.append(warning)
        return {path: labels.read(rel).boxes for path, rel in matched.items()}

    def _make_id(self, rel: str) -> str:
        if self.id_from == "stem":
            return f"{self.name}-{Path(rel).stem}"
        return f"{self.name}-{hashed(rel, 'regionmed-id')}"

    def _count(self):
        if self.table is None:
            return None
        return sum(1 for _ in self._open_table().rows())

    # ------------------------------------------------------------------ items

    def _row_item(self, row: Row, coco: CocoJoin | None, labels: LabelParser, splits: Counter,
                  label_boxes: dict[str, list] | None = None) -> RawItem:
        c = self.cols
        rel = row.text(c["image_col"])
        path = self._resolve(rel) if rel else None
        reject = ("malformed_row", row.problem) if row.problem else None
        boxes = parse_boxes(row.value(c["boxes_col"]), self.box_format, c["boxes_col"])
        if coco is not None and path:
            boxes += coco.by_path.get(path, [])
        if label_boxes and path:
            boxes += label_boxes.get(path, [])
        parsed: dict[str, int] = {}
        try:
            parsed.update(labels.parse_cell(row.value(c["labels_col"]), c["labels_col"]))
            for col in self.label_cols:
                try:
                    v = labels.resolve(col, row.value(col))
                except FieldError as err:
                    raise FieldError(f"column {col!r}: {err}") from None
                if v is not None:
                    parsed[col] = v
        except FieldError as err:
            parsed = {}
            reject = reject or ("invalid_label", f"line {row.line}: {err}")
        raw_split = row.text(c["split_col"]).lower()
        split = SPLIT_NAMES.get(raw_split)
        if raw_split and split is None:
            splits[raw_split[:20]] += 1
        pid = row.text(c["patient_col"])
        if is_placeholder_id(pid):  # "anonymous", "0000": identifies nobody, groups nothing
            pid = ""
        return RawItem(
            id=self._make_id(rel or f"row{row.n}"),
            source=self.name,
            image_path=path,
            report=_text_cell(row, c["report_col"]),
            summary=_text_cell(row, c["summary_col"]),
            boxes=boxes,
            split=split,
            group=f"{self.name}/patient/{pid}" if pid else None,
            modality=norm_modality(row.text(c["modality_col"]) or str(self.opts.get("modality", "") or "")),
            body=str(self.opts.get("body", "")),
            labels=parsed,
            ref=f"{self.table.name if self.table else self.name} row {row.n}",
            reject=reject,
        )

    def _items(self) -> Iterator[RawItem]:
        table = self._table_obj = self._open_table()
        if table.kind == "csv":
            table.header()
            self._check_columns(table)
        coco = self._join_coco(table) if self.opts.get("coco") else None
        label_boxes = None
        if self.label_set is not None:
            paths = [self._resolve(c) for c in (row.text(self.cols["image_col"]) for row in table.rows()) if c]
            label_boxes = self._join_labels(paths, f"image of the table {table.name}")
        rep = self._rep
        rep.box_format = {"format": self.box_format, "explicit": "box_format" in self.opts,
                          "column": self.cols["boxes_col"], "checked": 0, "misfit": 0}
        labels = LabelParser(self.policy)
        rep.labels = labels.stats
        rep.uncertain_policy = self.policy
        self._splits = Counter()
        for row in table.rows():
            rep.blank_rows = table.blank_rows
            yield self._row_item(row, coco, labels, self._splits, label_boxes)
        rep.blank_rows = table.blank_rows

    def _after_check(self, rep: SourceReport) -> None:
        table = self._table_obj
        if table is None:
            return
        if table.kind == "jsonl" and not rep.errors and rep.rows:
            try:
                self._check_columns(table)
            except TableError as err:
                rep.errors.append(str(err))
        read = list(dict.fromkeys([*self.cols.values(), *self.label_cols]))
        rep.columns_read = [c for c in read if c in table.columns]
        unused = [c for c in table.columns if c and c not in read]
        rep.columns_unused = unused
        if unused:
            # Hints name only options that are not set (one that is set to a column the table lacks
            # stops the build with its own "did you mean"), and only columns that no option reads.
            absent = {col: opt for opt, col in self.cols.items() if col not in table.columns and opt not in self.opts}
            hints = []
            for u in unused:
                close = difflib.get_close_matches(u, list(absent), n=1, cutoff=0.75)
                if close:
                    hints.append(f"{absent[close[0]]}: {u}")
                elif re.search(r"patient|subject|mrn", u, re.IGNORECASE) and "patient_col" in absent.values():
                    # an unread patient column silently loses the patient grouping of the splits
                    hints.append(f"patient_col: {u}")
            unset = list(absent.values()) + ([] if "label_cols" in self.opts else ["label_cols"])
            rep.warnings.append(
                f"{self.name} ({table.name}): columns not used: {', '.join(repr(u) for u in unused)}; this source "
                f"reads {', '.join(repr(c) for c in rep.columns_read) or 'none of its columns'}"
                + (f". Did you mean {'; '.join(hints)}?" if hints else ".")
                + (f" To read one, name it with an option not set yet (see regionmed build --help): {', '.join(unset)}"
                   if unset else " Every column option is set already: these columns are not read"))
        if self._splits:
            top = ", ".join(f"{k!r}={v}" for k, v in self._splits.most_common(3))
            rep.warnings.append(f"{self.name}: {sum(self._splits.values())} rows have a split value that is not "
                                f"train/val/test ({top}): the builder assigns their split")


class DicomSource(GenericSource):
    """A folder of DICOM files. With a table (as for ``generic``) rows name the
    files; without one, every ``*.dcm`` under the folder is an item and its
    report is read from ``<stem>.txt`` beside it (decoded in ``encoding``). Modality
    and body part come from the allow-listed DICOM attributes. Ids are hashes of the
    file path. Files are grouped into splits by patient: a table row's ``patient_col``
    when it gives one, else the file's PatientID, read when the file is decoded and
    used only as a salted hash (:func:`regionmed.apps.curation.dicom.patient_key`;
    placeholders such as "ANONYMOUS" count as absent). Boxes may come from YOLO / VOC
    label files (options ``yolo`` / ``voc``, as for ``generic``), matched to the files by
    their path under the source folder."""

    name = "dicom"
    reads = ("*.dcm files with <stem>.txt reports beside them; or a table as for generic "
             "(the same columns and options); optional YOLO labels (yolo, classes) or VOC XML (voc)")

    def _files(self):
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))

    def _count(self):
        return super()._count() if self.table else len(self._files())

    def _after_check(self, rep: SourceReport) -> None:
        if self.table:
            super()._after_check(rep)

    def _items(self) -> Iterator[RawItem]:
        if self.table:
            for item in super()._items():
                item.modality = item.modality if item.modality != "unknown" else "auto"
                yield item
            return
        files = self._files()
        label_boxes = {}
        if self.label_set is not None:
            label_boxes = self._join_labels([os.path.abspath(p) for p in files], "image (*.dcm file)")
        for n, path in enumerate(files, 1):
            rel = str(path.relative_to(self.root))
            txt = self.uses(path.with_suffix(".txt"))  # a report that appears later changes the build too
            report, reject = "", None
            if txt.is_file():
                try:
                    report = read_text(txt, self.encoding)
                except TableError as err:
                    # the message names the file: keep only where and what (paths may hold identifiers)
                    reject = ("undecodable_text", str(err).replace(str(txt), "report .txt file"))
            yield RawItem(
                id=self._make_id(rel),
                source=self.name,
                image_path=str(path),
                report=report,
                boxes=list(label_boxes.get(os.path.abspath(path), [])),
                modality="auto",
                body=str(self.opts.get("body", "")),
                ref=f"dicom file #{n}",
                reject=reject,
            )
