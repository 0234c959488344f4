"""Evaluation suites: the readers of the datasets evaluation scores.

* :class:`SlakeSet`, :class:`VqaRadSet` — the built-in SLAKE / VQA-RAD copies under the data
  root (``$REGIONMED_DATA``), each split file read once per object;
* :class:`MedRegionSet` — a built MedRegion dataset: each split opened and its records read
  once per object, shared by zero-shot (its labels), grounding (its regions, the location prior
  of its train split) and retrieval;
* :func:`folder_task` — a folder per class; :func:`question_file` — a user's VQA question file.

One object of each is made per evaluation run (:class:`regionmed.apps.evaluate.context.Datasets`)
and handed to every task that scores it. Image keys: ``slake/xmlabN``, ``vqa_rad/<file name>``,
``medregion/<record id>``, ``folder/<class>/<file>``. Nothing here decodes an image (that happens
while embedding, where a missing or broken file is skipped and counted).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml

from regionmed.apps.curation.sources.slake import SLAKE_FINDING_CLASSES, slake_kind
from regionmed.apps.curation.tables import Table, TableError
from regionmed.data.shards import MedRegionDataset, read_manifest
from regionmed.errors import RegionmedError
from regionmed.eval.images import ImageRef
from regionmed.eval.vqa import Question
from regionmed.eval.zeroshot import ZeroShotError, ZeroShotTask

SLAKE_SPLITS = {"train": "train.json", "val": "validate.json", "validate": "validate.json", "test": "test.json"}
VQA_RAD_SPLITS = {"train": "trainset.json", "test": "testset.json"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# SLAKE box classes that are findings (the rest are organs / structures).
SLAKE_FINDINGS = SLAKE_FINDING_CLASSES  # SLAKE's box classes that name a finding (the rest name anatomy)


class SuiteError(RegionmedError, ValueError):
    """An evaluation suite's folder or file that cannot be read."""


def _read_json(path: Path) -> list:
    if not path.is_file():
        raise SuiteError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SuiteError(f"{path}: not valid JSON ({err})") from err


# --------------------------------------------------------------------------- SLAKE


def slake_boxes(folder: Path) -> tuple[list[list[float]], list[str], bool]:
    """(xyxy boxes, class names, whether the image has a box file)."""
    det = folder / "detection.json"
    if not det.is_file():
        return [], [], False
    boxes, labels = [], []
    try:
        for entry in json.loads(det.read_text(encoding="utf-8")):
            for label, (x, y, w, h) in entry.items():
                boxes.append([float(x), float(y), float(x) + float(w), float(y) + float(h)])
                labels.append(str(label))
    except (ValueError, TypeError):
        return [], [], False
    return boxes, labels, True


def _unique(seq):
    return list(dict.fromkeys(seq))


_ABN_YES = re.compile(r"(are there abnormalities in this image|does this image look abnormal|does the patient have any abnormalit|is this image abnormal)", re.I)
_ABN_NO = re.compile(r"(does this image look normal|is this image normal)", re.I)
_DISEASES = re.compile(r"what diseases? (are|is) included in the picture", re.I)


class SlakeSet:
    """The SLAKE copy under ``root`` (``train.json`` / ``validate.json`` / ``test.json``,
    ``imgs/xmlabN/source.jpg`` and ``detection.json``); each split file is read once.
    Raises :class:`SuiteError` for an unknown split or a missing / non-JSON split file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._rows: dict[str, list] = {}

    def rows(self, split: str) -> list[dict]:
        """The split file's questions, every language (read once)."""
        if split not in SLAKE_SPLITS:
            raise SuiteError(f"SLAKE split {split!r} is not one of {sorted(SLAKE_SPLITS)}")
        name = SLAKE_SPLITS[split]
        if name not in self._rows:
            self._rows[name] = _read_json(self.root / name)
        return self._rows[name]

    def questions(self, split: str, lang: str = "en") -> list[Question]:
        """English (``q_lang == lang``) QA of the official SLAKE split (train / validate / test)."""
        out = []
        for q in self.rows(split):
            if q.get("q_lang", "en") != lang:
                continue
            folder = str(q["img_name"]).split("/")[0]
            out.append(Question(f"slake-{q.get('qid')}", f"slake/{folder}", str(q["question"]), str(q["answer"]),
                                str(q.get("answer_type", "")).strip().upper(), [str(q.get("content_type", "")).strip() or "unknown"]))
        return out

    def image_refs(self, keys: list[str]) -> tuple[list[ImageRef], set[str]]:
        """ImageRefs (given boxes from detection.json) for ``slake/xmlabN`` keys; and the keys with a box file."""
        refs, boxed = [], set()
        for key in keys:
            folder = self.root / "imgs" / key.split("/", 1)[1]
            boxes, labels, has = slake_boxes(folder)
            if has:
                boxed.add(key)
            refs.append(ImageRef(key, str(folder / "source.jpg"), boxes=boxes, box_labels=labels,
                                 box_kinds=[slake_kind(lab) or "" for lab in labels]))
        return refs, boxed

    def split_keys(self, split: str) -> list[str]:
        return _unique(q.image_key for q in self.questions(split))

    def facts(self, split: str) -> dict[str, dict]:
        """Per image of ``split`` (questions in any language): modality (QA field), and votes
        for abnormal (1) / normal (0) from whole-image English QA facts."""
        facts: dict[str, dict] = {}
        for q in self.rows(split):
            key = f"slake/{str(q['img_name']).split('/')[0]}"
            f = facts.setdefault(key, {"modality": q.get("modality", ""), "abnormal_votes": []})
            if q.get("q_lang", "en") != "en":
                continue
            a = str(q["answer"]).strip().lower()
            text = str(q["question"])
            if _ABN_YES.search(text) and a in ("yes", "no"):
                f["abnormal_votes"].append(int(a == "yes"))
            elif _ABN_NO.search(text) and a in ("yes", "no"):
                f["abnormal_votes"].append(int(a == "no"))
            elif _DISEASES.search(text):
                f["abnormal_votes"].append(int(a not in ("none", "no", "")))
        return facts

    def zero_shot_tasks(self, split: str = "test", min_positives: int = 5) -> tuple[list[ImageRef], dict[str, ZeroShotTask], dict]:
        """The SLAKE zero-shot tasks on the images of ``split``:

        * ``modality`` (softmax): CT / MRI / X-Ray, from the QA ``modality`` field;
        * ``organ`` (multi-label, ``similarity``): organ/structure box classes (``detection.json``) with at least
          ``min_positives`` images, on the images that have a box file;
        * ``abnormality`` (softmax normal / abnormal): abnormal when a finding box is
          present or a whole-image QA fact says so ("Are there abnormalities in this
          image?" yes, "Is this image normal?" no, "What diseases are included?" not
          None); normal when the QA facts say so, or when the image has annotated boxes,
          none of them a finding, and no QA fact about it. Images with contradicting or
          no evidence are left out (counted).
        """
        facts = self.facts(split)
        keys = list(facts)
        refs, boxed = self.image_refs(keys)
        by_key = {r.key: r for r in refs}
        notes: dict = {}
        # modality
        mods = sorted({f["modality"] for f in facts.values() if f["modality"]})
        mkeys = [k for k in keys if facts[k]["modality"]]
        tasks = {"modality": ZeroShotTask("modality", mods, np.array([mods.index(facts[k]["modality"]) for k in mkeys]), mkeys, "softmax")}
        # organ
        okeys = [k for k in keys if k in boxed]
        present = [set(by_key[k].box_labels) - SLAKE_FINDINGS for k in okeys]
        counts: dict[str, int] = {}
        for p in present:
            for c in p:
                counts[c] = counts.get(c, 0) + 1
        organs = sorted(c for c, n in counts.items() if n >= min_positives and n < len(okeys))
        notes["organ_classes_dropped_few_positives"] = sorted(c for c, n in counts.items() if n < min_positives)
        tasks["organ"] = ZeroShotTask("organ", organs, np.array([[int(c in p) for c in organs] for p in present]).reshape(len(okeys), len(organs)), okeys, "similarity")
        # abnormality
        akeys, alabels, conflicts, unknown = [], [], 0, 0
        for k in keys:
            finding = bool(set(by_key[k].box_labels) & SLAKE_FINDINGS)
            votes = set(facts[k]["abnormal_votes"])
            if finding:
                votes.add(1)
            elif not votes and k in boxed:
                votes.add(0)  # annotated boxes, none of them a finding, no QA fact: normal
            if len(votes) == 1:
                akeys.append(k)
                alabels.append(votes.pop())
            elif votes:
                conflicts += 1
            else:
                unknown += 1
        notes["abnormality_left_out"] = {"contradicting_evidence": conflicts, "no_evidence": unknown}
        tasks["abnormality"] = ZeroShotTask("abnormality", ["normal", "abnormal"], np.array(alabels, dtype=int), akeys, "softmax")
        return refs, tasks, notes

    def grounding_items(self, split: str = "test") -> list[ImageRef]:
        """Images of ``split`` that have boxes (each box class becomes one phrase)."""
        refs, boxed = self.image_refs(self.split_keys(split))
        return [r for r in refs if r.key in boxed and r.boxes]


# --------------------------------------------------------------------------- VQA-RAD


class VqaRadSet:
    """The VQA-RAD copy under ``root`` (``trainset.json`` 3,064 / ``testset.json`` 451, ``images/``);
    each split file is read once. Raises :class:`SuiteError` like :class:`SlakeSet`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._rows: dict[str, list] = {}

    def questions(self, split: str) -> list[Question]:
        """The standard split. A question with several types ("PRES, POS") counts in each of them."""
        if split not in VQA_RAD_SPLITS:
            raise SuiteError(f"VQA-RAD split {split!r} is not one of {sorted(VQA_RAD_SPLITS)}")
        if split not in self._rows:
            self._rows[split] = _read_json(self.root / VQA_RAD_SPLITS[split])
        out = []
        for q in self._rows[split]:
            types = [t.strip() for t in str(q.get("question_type", "")).split(",") if t.strip()] or ["unknown"]
            out.append(Question(f"vqa_rad-{q.get('qid')}", f"vqa_rad/{q['image_name']}", str(q["question"]), str(q["answer"]),
                                str(q.get("answer_type", "")).strip().upper(), types))
        return out

    def image_refs(self, keys: list[str]) -> list[ImageRef]:
        return [ImageRef(k, str(self.root / "images" / k.split("/", 1)[1])) for k in keys]


# --------------------------------------------------------------------------- MedRegion datasets

# Region sources that are proposals, not annotations: never ground truth for grounding.
PROPOSAL_SOURCES = frozenset({"unsupervised", "detector", "proposal", "self"})
GROUNDING_PHRASES = ("label", "caption")


class _MedRegionOpener:
    def __init__(self, ds, index: int):
        self.ds, self.index = ds, index

    def __call__(self):
        return self.ds.image(self.index)


def _phrase_of(region: dict, phrase: str) -> str:
    label = " ".join(str(region.get("label") or "").split())
    caption = " ".join(str(region.get("caption") or "").split()).rstrip(".")
    return (caption or label) if phrase == "caption" else (label or caption)


class MedRegionSet:
    """A built MedRegion dataset: each split is opened (:class:`~regionmed.data.shards.MedRegionDataset`)
    and its records read once, then shared by every reader below. Raises
    :class:`~regionmed.data.shards.DatasetError` for a missing dataset or split and
    :class:`~regionmed.data.schema.RecordError` for a record that cannot be read."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._open: dict[str, MedRegionDataset] = {}
        self._records: dict[str, list[dict]] = {}
        self._stated: set[str] | None = None

    @property
    def name(self) -> str:
        return f"medregion:{self.root.name}"

    def split(self, split: str) -> MedRegionDataset:
        """The opened split (opened on first use)."""
        if split not in self._open:
            self._open[split] = MedRegionDataset(self.root, split)
        return self._open[split]

    def records(self, split: str) -> list[dict]:
        """Every record of ``split`` (JSON only; read on first use)."""
        if split not in self._records:
            ds = self.split(split)
            self._records[split] = [ds.record(i) for i in range(len(ds))]
        return self._records[split]

    def stated_negative_classes(self) -> set[str]:
        """Classes that some record of any split of the dataset states as 0 (a labelled-column source)."""
        if self._stated is None:
            self._stated = {c for split in read_manifest(self.root)["splits"] for r in self.records(split)
                            for c, v in r.get("labels", {}).items() if v == 0}
        return self._stated

    def zero_shot_task(self, split: str = "test", mode: str = "auto", classes: list[str] | None = None) -> tuple[list[ImageRef], ZeroShotTask]:
        """A zero-shot task from the ``labels`` of ``split``. ``mode`` auto: softmax when every
        record has exactly one positive label, else similarity (multi-label).

        Multi-label: 1 positive, 0 negative, -1 unknown — a class that some record (of any
        split) states as 0 is unknown where a record leaves it out (the U-Ignore policy drops uncertain labels),
        so it is left out of that class's AUC; a class only ever listed as positive is
        negative where absent."""
        ds, records = self.split(split), self.records(split)
        names = classes or sorted({k for r in records for k, v in r.get("labels", {}).items() if v})
        if not names:
            raise ZeroShotError(f"{self.root} split {split!r}: the class list is empty (no record has a positive label)")
        pos = [[c for c in names if r.get("labels", {}).get(c)] for r in records]
        if mode == "auto":
            mode = "softmax" if all(len(p) == 1 for p in pos) else "similarity"
        refs = [ImageRef(f"medregion/{r['id']}", opener=_MedRegionOpener(ds, i),
                         boxes=[list(x["box"]) for x in r.get("regions", [])], box_labels=[x.get("label", "") for x in r.get("regions", [])])
                for i, r in enumerate(records)]
        if mode == "softmax":
            keep = [i for i, p in enumerate(pos) if len(p) == 1]
            labels = np.array([names.index(pos[i][0]) for i in keep], dtype=int)
        else:
            keep = list(range(len(records)))
            # A class some record states as 0 is a stated label: where a record leaves it out
            # (e.g. an uncertain label under U-Ignore) it is unknown (-1), not negative. A class
            # only ever listed as positive (a positives-only label list) is negative where absent.
            stated = self.stated_negative_classes()
            absent = {c: (-1 if c in stated else 0) for c in names}
            labels = np.array([[1 if c in pos[i] else (0 if r.get("labels", {}).get(c) == 0 else absent[c]) for c in names]
                               for i, r in ((i, records[i]) for i in keep)], dtype=int).reshape(len(keep), len(names))
        refs = [refs[i] for i in keep]
        return refs, ZeroShotTask(self.name, names, labels, [r.key for r in refs], mode)

    def grounding_items(self, split: str = "test", phrase: str = "label") -> tuple[list[ImageRef], dict[str, dict[str, str]], dict]:
        """Grounding items from the given regions of ``split``.

        Each annotated region is a phrase: its ``label`` (``phrase="label"``; the caption when a
        region has no label) or its ``caption`` (``phrase="caption"``); boxes of the same phrase
        in one image are its ground truth together. Regions proposed at build time (``source``
        in :data:`PROPOSAL_SOURCES`) are no ground truth and are left out (counted in the notes).

        Returns ``(refs, prior_keys, notes)``: ``refs[i].box_labels`` are the phrases,
        ``prior_keys[image key][phrase]`` the label whose training boxes make its location prior.
        Raises :class:`SuiteError` for a bad ``phrase`` or a split without any annotated region."""
        if phrase not in GROUNDING_PHRASES:
            raise SuiteError(f"grounding phrase {phrase!r} is not one of {GROUNDING_PHRASES}")
        ds, records = self.split(split), self.records(split)
        refs, prior_keys = [], {}
        notes = {"dataset": self.name, "split": split, "phrase": phrase, "images": len(ds),
                 "regions": 0, "proposed_regions_left_out": 0, "images_without_annotated_region": 0}
        for i, rec in enumerate(records):
            boxes, phrases, kinds, keys = [], [], [], {}
            for reg in rec.get("regions", []):
                if str(reg.get("source", "annotation")) in PROPOSAL_SOURCES:
                    notes["proposed_regions_left_out"] += 1
                    continue
                text = _phrase_of(reg, phrase)
                if not text:
                    continue
                boxes.append([float(v) for v in reg["box"]])
                phrases.append(text)
                kinds.append(str(reg.get("kind") or ""))
                keys[text] = " ".join(str(reg.get("label") or text).split()).lower()
            if not boxes:
                notes["images_without_annotated_region"] += 1
                continue
            notes["regions"] += len(boxes)
            key = f"medregion/{rec['id']}"
            refs.append(ImageRef(key, opener=_MedRegionOpener(ds, i), boxes=boxes, box_labels=phrases,
                                 box_kinds=kinds, source=str(rec.get("source") or "")))
            prior_keys[key] = keys
        if not refs:
            raise SuiteError(f"{self.root} split {split!r}: no annotated region to ground (regions proposed at build time "
                             f"do not count: {notes['proposed_regions_left_out']} left out)")
        return refs, prior_keys, notes

    def prior_items(self, split: str = "train") -> list[tuple[list[list[float]], list[str], tuple[int, int]]]:
        """``(pixel boxes, lower-case labels, (width, height))`` per record of ``split`` with annotated
        regions: the input of :func:`regionmed.eval.grounding.location_prior` (sizes from the records)."""
        items = []
        for rec in self.records(split):
            regs = [r for r in rec.get("regions", []) if str(r.get("source", "annotation")) not in PROPOSAL_SOURCES]
            labels = [" ".join(str(r.get("label") or _phrase_of(r, "label")).split()).lower() for r in regs]
            if regs:
                items.append(([[float(v) for v in r["box"]] for r in regs], labels, (int(rec["width"]), int(rec["height"]))))
        return items


# --------------------------------------------------------------------------- a folder per class


def folder_task(root: str | Path) -> tuple[list[ImageRef], ZeroShotTask]:
    """A folder per class (``root/<class>/<image>``): single-label softmax task."""
    root = Path(root)
    if not root.is_dir():
        raise SuiteError(f"class folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ZeroShotError(f"{root}: the class list is empty (no sub-folders)")
    refs, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(ImageRef(f"folder/{c}/{f.name}", str(f)))
                labels.append(i)
    return refs, ZeroShotTask(f"folder:{root.name}", classes, np.array(labels, dtype=int), [r.key for r in refs], "softmax")


def restrict_task(task: ZeroShotTask, available: set[str]) -> tuple[ZeroShotTask, list[str]]:
    """Drop the images that could not be embedded; returns the task and the dropped keys."""
    keep = [i for i, k in enumerate(task.keys) if k in available]
    dropped = [k for k in task.keys if k not in available]
    labels = task.labels[keep] if len(task.labels) else task.labels
    return ZeroShotTask(task.name, task.classes, labels, [task.keys[i] for i in keep], task.mode), dropped


# --------------------------------------------------------------------------- a generic VQA question file

QUESTION_COLUMNS = ("image", "question", "answer", "split")
QUESTION_SPLITS = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
ANSWER_TYPES = ("OPEN", "CLOSED")
_CLOSED_ANSWERS = {"yes", "no"}


def question_file(path: str | Path, encoding: str = "utf-8") -> tuple[dict[str, list[Question]], list[ImageRef]]:
    """Questions from a user's CSV/TSV or JSONL file, one question a row.

    Columns: ``image`` (a path, relative to the file's folder or absolute), ``question``,
    ``answer``, ``split`` (``train`` / ``val`` (or ``validate``) / ``test``), and optional
    ``answer_type`` (``OPEN`` / ``CLOSED``; when empty, CLOSED for a yes/no answer, else OPEN),
    ``question_type`` (comma-separated, for the per-type table) and ``qid``.

    Returns ``({"train": [...], "val": [...], "test": [...]}, image refs)``. Raises
    :class:`SuiteError` naming the file, row (and line) and column of the first problem: a
    missing column, an empty required cell, an unknown split or answer type, a malformed
    row, or a file without training or test questions. A missing image file is no error
    here: it is skipped and counted when embedding."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"question file {path} does not exist")
    try:
        table = Table(path, encoding)
        header = table.header()
        missing = [c for c in QUESTION_COLUMNS if c not in header]
        if missing:
            raise SuiteError(f"{path}: column(s) {missing} missing (has {header}); a question file needs "
                             f"{', '.join(QUESTION_COLUMNS)} and may have answer_type, question_type, qid")
        out: dict[str, list[Question]] = {"train": [], "val": [], "test": []}
        refs: dict[str, ImageRef] = {}
        for row in table.rows():
            where = f"{path}: row {row.n} (line {row.line})"
            if row.problem:
                raise SuiteError(f"{path}: {row.problem}")
            cells = {}
            for col in QUESTION_COLUMNS:
                cells[col] = row.text(col)
                if not cells[col]:
                    raise SuiteError(f"{where}: column {col!r} is empty")
            split = QUESTION_SPLITS.get(cells["split"].lower())
            if split is None:
                raise SuiteError(f"{where}: column 'split': {cells['split']!r} is not one of train, val (validate), test")
            atype = row.text("answer_type").upper()
            if not atype:
                atype = "CLOSED" if cells["answer"].strip().lower() in _CLOSED_ANSWERS else "OPEN"
            elif atype not in ANSWER_TYPES:
                raise SuiteError(f"{where}: column 'answer_type': {atype!r} is not OPEN or CLOSED")
            image = Path(cells["image"])
            image = image if image.is_absolute() else path.parent / image
            key = f"questions/{cells['image']}"
            refs.setdefault(key, ImageRef(key, str(image)))
            qtypes = [t.strip() for t in row.text("question_type").split(",") if t.strip()] or ["unknown"]
            out[split].append(Question(row.text("qid") or f"{path.stem}-{row.n}", key, cells["question"], cells["answer"],
                                       atype, qtypes))
    except TableError as err:
        raise SuiteError(str(err)) from None
    for split in ("train", "test"):
        if not out[split]:
            raise SuiteError(f"{path}: no {split} question (column 'split'); a question file needs train and test rows")
    return out, list(refs.values())


def read_class_names(spec: str | None) -> dict[str, str]:
    """A folder-name → class-name mapping: ``"notumor=no tumor,glioma=glioma tumor"`` or a
    YAML/JSON file holding a mapping. ``{}`` for ``None``. Raises :class:`SuiteError`."""
    if not spec:
        return {}
    p = Path(spec)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.is_file():
        if not p.is_file():
            raise SuiteError(f"class-name file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise SuiteError(f"{p}: not valid YAML/JSON ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (str, int, float)) for v in data.values()):
            raise SuiteError(f"{p}: must be a mapping folder name -> class name, e.g. 'notumor: no tumor'")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise SuiteError(f"class names {spec!r}: {part.strip()!r} is not NAME=TEXT (or give a YAML file)")
        k, v = part.split("=", 1)
        if not k.strip() or not v.strip():
            raise SuiteError(f"class names {spec!r}: {part.strip()!r} has an empty side")
        out[k.strip()] = v.strip()
    return out
