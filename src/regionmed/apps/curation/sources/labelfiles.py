"""Detection label exports as box inputs: YOLO text labels and Pascal VOC XML, one file per image.

Read strictly; every box becomes one :class:`~regionmed.apps.curation.items.RawBox` or a
region-level reject with a reason and a detail naming the file and line / object:

**YOLO** (Ultralytics / Darknet): one ``.txt`` per image, one line per box,
``class x_centre y_centre width height``, the four numbers normalised to [0, 1] by the
image's width and height. A line of a class id and 3 or more ``x y`` pairs (an Ultralytics
segment) gives the polygon's enclosing box. Blank lines are skipped; an empty file is an
image without boxes. Rejects: ``invalid_box`` for a line with another number of values, a
value that is not a finite number, a class id that is not a whole number >= 0, or a
coordinate outside [0, 1] (the file is not normalised: pixel coordinates, or a corrupt
line); ``unknown_category`` for a class id that the class names do not have. The box
stays normalised (``RawBox.normalized``) until the builder knows the decoded image size,
then it is clipped or dropped by :func:`regionmed.data.schema.sanitize_box` as any box
(``box_outside``, ``zero_area_box``).

Class names (:func:`read_class_names`): a text file with one name a line, line *i* = class
id *i* (``classes.txt``, Darknet ``.names``; a line ``<i> <name>`` is read as id *i*), or an
Ultralytics ``data.yaml`` whose ``names`` is a list or ``{id: name}``.

**Pascal VOC**: one ``.xml`` per image, root ``<annotation>``, ``<filename>``, optional
``<size><width>/<height>``, and per ``<object>``: ``<name>``, ``<bndbox>`` with
``xmin ymin xmax ymax``, ``<difficult>``, ``<truncated>``. Coordinates follow the VOC
devkit: 1-based pixel indices, both ends inclusive, so the pixel-edge box is
``[xmin - 1, ymin - 1, xmax, ymax]`` (as Detectron2 reads VOC). An export that writes
0-based pixel edges (e.g. CVAT) sets ``voc_origin: 0``: the numbers are then taken as they
are. Rejects: ``invalid_box`` (a file that is not VOC XML, a ``<bndbox>`` with a missing
or non-numeric value, ``xmax < xmin`` or ``ymax < ymin``), ``unknown_category`` (no
``<name>``, or a name outside the ``classes`` given), ``difficult_box`` (with
``difficult: reject``), and at build time ``size_mismatch`` (the ``<size>`` differs from
the decoded image: the boxes were drawn on another resolution). A file without ``<size>``
is read all the same (VOC boxes are pixels and need no size); it is counted in the check.
XML is parsed by the standard library's expat (>= 2.4.1 refuses entity-expansion bombs;
external entities are never fetched).

**Matching files to images** (:class:`LabelSet`): a label file belongs to the image with
the same relative path under the images folder (``images/train/a.jpg`` -
``labels/train/a.txt``, the Ultralytics rule), else (a VOC file) to the image its
``<filename>`` names, else to the one image with the same file stem. A label file that
matches no image is named in a warning and each of its boxes is an ``unmatched_box``
reject. Messages name a label file by its path under the labels folder when the source
may name files (``id_from: stem``), else by the path's shape and its position in sorted
order (``labels/<name>.txt (label file #12)``), as file names may hold patient identifiers.
Keep label files in a folder of their own: every ``.txt`` (``.xml``) under it is a label
file, except the class-names file.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from regionmed.apps.curation.items import RawBox
from regionmed.apps.curation.sources.base import SourceError
from regionmed.apps.curation.sources.coco import path_shape
from regionmed.apps.curation.tables import TableError, note_read, read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
LABEL_SUFFIX = {"yolo": ".txt", "voc": ".xml"}
CLASS_FILE_CANDIDATES = ("classes.txt", "data.yaml", "dataset.yaml", "obj.names", "classes.names")
NAN_BOX = [math.nan] * 4


class LabelFileError(SourceError):
    """A class-names file or label option that cannot be used (the build stops)."""


# --------------------------------------------------------------------------- class names


def read_class_names(path: str | Path, encoding: str = "utf-8") -> dict[int, str]:
    """``{class id: name}`` from a names file (see the module docstring).

    Raises :class:`LabelFileError` naming the file and line: a blank line between names
    (ids are line numbers, so it would shift every later id), a name given twice, a
    ``data.yaml`` without ``names``, or an id that is not a whole number."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"class names file {path} not found")
    try:
        text = read_text(path, encoding)
    except TableError as err:
        raise LabelFileError(str(err)) from None
    names: dict[int, str] = {}
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise LabelFileError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        raw = data.get("names") if isinstance(data, dict) else None
        if isinstance(raw, list):
            items = list(enumerate(raw))
        elif isinstance(raw, dict):
            items = list(raw.items())
        else:
            raise LabelFileError(f"{path}: expected 'names' as a list or a mapping {{id: name}}, got {raw!r}")
        for cid, name in items:
            try:
                i = int(cid)
            except (TypeError, ValueError):
                raise LabelFileError(f"{path}: names key {cid!r} is not a class id (a whole number)") from None
            if isinstance(cid, float) or i < 0 or name is None or not str(name).strip():
                raise LabelFileError(f"{path}: names entry {cid!r}: {name!r} is not a class id >= 0 with a name")
            names[i] = str(name).strip()
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        explicit = all(re.fullmatch(r"\s*\d+\s+\S.*", ln) for ln in lines) and bool(lines)
        for n, line in enumerate(lines):
            if not line.strip():
                raise LabelFileError(f"{path}: line {n + 1} is blank; class ids are line numbers (line i = id i), "
                                     "so a blank line would shift every later id")
            if explicit:
                cid, name = line.split(None, 1)
                names[int(cid)] = name.strip()
            else:
                names[n] = line.strip()
    if not names:
        raise LabelFileError(f"{path}: no class names")
    seen: dict[str, int] = {}
    for cid, name in sorted(names.items()):
        if name in seen:
            raise LabelFileError(f"{path}: class name {name!r} is given to ids {seen[name]} and {cid}")
        seen[name] = cid
    return names


def class_names_option(value: Any, root: Path, encoding: str, where: str) -> dict[int, str]:
    """The ``classes`` option: a names file (relative to ``root``) or a list of names (id = position)."""
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise LabelFileError(f"{where}: classes must be a names file or a list of names, got {value!r}")
        return {i: v.strip() for i, v in enumerate(value)}
    return read_class_names(root / str(value), encoding)


def default_class_file(*folders: Path) -> Path | None:
    """The first of :data:`CLASS_FILE_CANDIDATES` found in ``folders``, in order."""
    for folder in folders:
        for name in CLASS_FILE_CANDIDATES:
            if (folder / name).is_file():
                return folder / name
    return None


# --------------------------------------------------------------------------- one label file


@dataclass
class LabelFile:
    """The boxes of one label file (some marked ``reject``) and what the check counts."""

    rel: str  # path under the labels folder, "/"-separated
    ref: str  # how messages name the file
    boxes: list[RawBox] = field(default_factory=list)
    image_name: str | None = None  # VOC <filename>
    sized: bool = True  # VOC: the file states the image size
    difficult: int = 0
    truncated: int = 0

    def classes(self, known) -> set[str]:
        """Labels of its boxes whose class is one of ``known`` (whatever their coordinates)."""
        return {b.label for b in self.boxes if b.label in known and b.reject != "unknown_category"}


def _reject(label: str, reason: str, detail: str) -> RawBox:
    return RawBox(label, list(NAN_BOX), reject=reason, detail=detail)


def read_yolo(path: Path, rel: str, ref: str, classes: dict[int, str], encoding: str = "utf-8") -> LabelFile:
    """The boxes of one YOLO label file (normalised ``[x0, y0, x1, y1]``; see the module docstring)."""
    out = LabelFile(rel, ref)
    try:
        text = read_text(path, encoding)
    except TableError as err:
        why = str(err).replace(str(path), ref)
        out.boxes.append(_reject("?", "invalid_box", f"{ref}: not readable as text ({why})"))
        return out
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if parts:
            out.boxes.append(_yolo_line(parts, classes, f"{ref} line {n}"))
    return out


def _yolo_line(parts: list[str], classes: dict[int, str], where: str) -> RawBox:
    nums = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            return _reject("?", "invalid_box", f"{where}: {p[:20]!r} is not a number")
        if not math.isfinite(v):
            return _reject("?", "invalid_box", f"{where}: {p!r} is not a finite number")
        nums.append(v)
    coords = nums[1:]
    if not (len(coords) == 4 or (len(coords) >= 6 and len(coords) % 2 == 0)):
        return _reject("?", "invalid_box", f"{where}: {len(parts)} values; a YOLO box line has 5 (class x_centre "
                                           "y_centre width height), a segment line a class and 3 or more x y pairs")
    if nums[0] < 0 or nums[0] != int(nums[0]):
        return _reject("?", "invalid_box", f"{where}: class id {parts[0]!r} is not a whole number >= 0")
    cid = int(nums[0])
    label = classes.get(cid)
    if label is None:
        return _reject(f"class {cid}", "unknown_category",
                       f"{where}: class id {cid} is not among the {len(classes)} class names (ids "
                       f"{min(classes)}..{max(classes)})")
    if any(v < 0 or v > 1 for v in coords):
        bad = next(v for v in coords if v < 0 or v > 1)
        return _reject(label, "invalid_box", f"{where}: coordinate {bad:g} is outside [0, 1] (YOLO coordinates are "
                                             "normalised by the image width and height)")
    if len(coords) == 4:
        xc, yc, w, h = coords
        box = [xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2]
    else:
        xs, ys = coords[0::2], coords[1::2]
        box = [min(xs), min(ys), max(xs), max(ys)]
    return RawBox(label, box, detail=where, normalized=True)


def _number(obj: ET.Element, tag: str) -> float | None:
    text = obj.findtext(tag)
    try:
        v = float(text) if text is not None else None
    except ValueError:
        return None
    return v if v is not None and math.isfinite(v) else None


def read_voc(path: Path, rel: str, ref: str, classes: set[str] | None = None, origin: int = 1,
             difficult: str = "keep") -> LabelFile:
    """The boxes of one Pascal VOC XML file (pixels; see the module docstring for the convention)."""
    out = LabelFile(rel, ref)
    note_read(path)  # an input of the build (build-inputs.jsonl): a changed XML file is noticed on a re-run
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as err:
        out.boxes.append(_reject("?", "invalid_box", f"{ref}: not valid XML ({err})"))
        return out
    except OSError as err:
        out.boxes.append(_reject("?", "invalid_box", f"{ref}: cannot be read ({err.strerror or err})"))
        return out
    if root.tag != "annotation":
        out.boxes.append(_reject("?", "invalid_box", f"{ref}: root element <{root.tag}>, a VOC file has <annotation>"))
        return out
    name = (root.findtext("filename") or "").strip()
    out.image_name = name or None
    size = root.find("size")
    w = _number(size, "width") if size is not None else None
    h = _number(size, "height") if size is not None else None
    ref_size = (int(w), int(h)) if w and h and w > 0 and h > 0 else None
    out.sized = ref_size is not None
    for k, obj in enumerate(root.findall("object"), 1):
        where = f"{ref} object {k}"
        label = (obj.findtext("name") or "").strip()
        is_difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
        out.difficult += is_difficult
        out.truncated += (obj.findtext("truncated") or "0").strip().lower() in ("1", "true", "yes")
        if not label:
            out.boxes.append(_reject("?", "unknown_category", f"{where}: no <name>"))
            continue
        if classes is not None and label not in classes:
            out.boxes.append(_reject(label, "unknown_category", f"{where}: <name> {label!r} is not among the "
                                                                f"{len(classes)} classes given"))
            continue
        bb = obj.find("bndbox")
        vals = [_number(bb, t) for t in ("xmin", "ymin", "xmax", "ymax")] if bb is not None else [None] * 4
        if any(v is None for v in vals):
            missing = "no <bndbox>" if bb is None else "a <bndbox> value is missing or not a number"
            out.boxes.append(_reject(label, "invalid_box", f"{where}: {missing}"))
            continue
        x0, y0, x1, y1 = vals
        if x1 < x0 or y1 < y0:
            out.boxes.append(_reject(label, "invalid_box", f"{where}: inverted box (xmax {x1:g} < xmin {x0:g} or "
                                                           f"ymax {y1:g} < ymin {y0:g})"))
            continue
        if is_difficult and difficult == "reject":
            out.boxes.append(_reject(label, "difficult_box", f"{where}: marked difficult"))
            continue
        out.boxes.append(RawBox(label, [x0 - origin, y0 - origin, x1, y1], detail=where, ref_size=ref_size))
    return out


# --------------------------------------------------------------------------- a folder of label files


def _key(rel: str) -> str:
    """A path without its suffix, "/"-separated: what image and label files are matched on."""
    rel = rel.replace("\\", "/").strip("/")
    stem, ext = os.path.splitext(rel)
    return stem if ext else rel


class LabelSet:
    """The label files (``fmt`` ``"yolo"`` or ``"voc"``) under ``folder``, matched to images.

    ``classes``: ``{id: name}`` (YOLO: required; VOC: optional, names outside it are
    rejected). ``classes_file``: the file the names came from (listed in :meth:`files_read`).
    ``name_files``: messages may name label files by path (else by shape and number).
    Raises :class:`LabelFileError` for a missing folder or YOLO labels without classes."""

    def __init__(self, fmt: str, folder: Path, classes: dict[int, str] | None = None, classes_file: Path | None = None,
                 encoding: str = "utf-8", origin: int = 1, difficult: str = "keep", name_files: bool = False):
        if fmt not in LABEL_SUFFIX:
            raise LabelFileError(f"label format must be 'yolo' or 'voc', got {fmt!r}")
        if not folder.is_dir():
            raise LabelFileError(f"{fmt} label folder {folder} not found")
        if fmt == "yolo" and not classes:
            raise LabelFileError(f"YOLO labels in {folder} need class names: set the option classes "
                                 f"(a classes.txt, data.yaml or a list); none of {list(CLASS_FILE_CANDIDATES)} was found")
        if origin not in (0, 1):
            raise LabelFileError(f"voc_origin must be 1 (VOC devkit, 1-based pixels) or 0 (0-based pixel edges), got {origin!r}")
        if difficult not in ("keep", "reject"):
            raise LabelFileError(f"difficult must be 'keep' or 'reject', got {difficult!r}")
        self.fmt, self.folder, self.classes, self.classes_file = fmt, folder, classes or {}, classes_file
        self.encoding, self.origin, self.difficult, self.name_files = encoding, origin, difficult, name_files
        skip = {classes_file.resolve()} if classes_file else set()
        suffix = LABEL_SUFFIX[fmt]
        self.files: list[str] = sorted(
            p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.suffix.lower() == suffix and p.is_file() and p.resolve() not in skip)
        self._number = {rel: n for n, rel in enumerate(self.files, 1)}
        self._cache: dict[str, LabelFile] = {}
        self.claimed: dict[str, str] = {}  # label rel -> image path

    @property
    def folder_name(self) -> str:
        return self.folder.name

    def ref(self, rel: str) -> str:
        if self.name_files:
            return f"{self.folder_name}/{rel}"
        return f"{self.folder_name}/{path_shape(rel)} (label file #{self._number.get(rel, 0)})"

    def files_read(self) -> list[Path]:
        """Every file this set reads: the class-names file and the label files (for change detection)."""
        return ([self.classes_file] if self.classes_file else []) + [self.folder / rel for rel in self.files]

    def read(self, rel: str) -> LabelFile:
        """One label file, read once (VOC files are read when matching; YOLO files when asked)."""
        lf = self._cache.get(rel)
        if lf is None:
            path = self.folder / rel
            if self.fmt == "yolo":
                lf = read_yolo(path, rel, self.ref(rel), self.classes, self.encoding)
            else:
                known = set(self.classes.values()) if self.classes else None
                lf = read_voc(path, rel, self.ref(rel), known, self.origin, self.difficult)
            if self.fmt == "voc":
                self._cache[rel] = lf
        return lf

    def class_names(self) -> list[str]:
        """The declared classes, else (VOC without classes) every name the files use, sorted."""
        if self.classes:
            return [self.classes[k] for k in sorted(self.classes)]
        return sorted({b.label for rel in self.files for b in self.read(rel).boxes if b.reject != "unknown_category"})

    def match(self, images: list[str], bases: list[Path]) -> dict[str, str]:
        """``{image path: label rel}`` for the ``images`` (absolute, normalised paths) that have a
        label file: by the path relative to one of ``bases`` (the images folder first), then
        (VOC) by ``<filename>``, then by a file stem that one label file alone has. Sets
        :attr:`claimed`; a label file two images would match goes to the first one."""
        by_key = {_key(rel): rel for rel in self.files}
        by_stem: dict[str, str | None] = {}

        def add_stem(stem: str, rel: str) -> None:
            by_stem[stem] = rel if by_stem.get(stem, rel) == rel else None  # None: two files share it

        for rel in self.files:
            add_stem(os.path.basename(_key(rel)), rel)
        by_name: dict[str, str | None] = {}
        if self.fmt == "voc":
            for rel in self.files:
                name = self.read(rel).image_name
                if name:
                    k = _key(name)
                    by_name[k] = rel if by_name.get(k, rel) == rel else None
                    add_stem(os.path.basename(k), rel)
        bases = [os.path.abspath(str(b)) for b in bases]
        out: dict[str, str] = {}
        self.claimed = {}
        for img in images:
            keys = [_key(os.path.relpath(img, b)) for b in bases if img.startswith(b.rstrip(os.sep) + os.sep)]
            rel = next((by_key[k] for k in keys if k in by_key), None)
            if rel is None:
                rel = next((by_name[k] for k in keys if by_name.get(k)), None)
            if rel is None:
                rel = by_stem.get(os.path.basename(_key(img)))
            if rel is not None and rel not in self.claimed:
                self.claimed[rel] = img
                out[img] = rel
        return out

    def unmatched(self) -> list[str]:
        """Label files no image claimed (after :meth:`match`)."""
        return [rel for rel in self.files if rel not in self.claimed]

    def orphans(self, source: str) -> tuple[list[dict], int]:
        """Region rejects (``unmatched_box``) for the boxes of unmatched label files, and the
        number of those files (an empty one has no box to reject; it is named in a warning)."""
        out = []
        files = self.unmatched()
        for rel in files:
            lf = self.read(rel)
            for j, b in enumerate(lf.boxes):
                out.append({"id": None, "source": source, "ref": lf.ref, "region": j, "label": b.label,
                            "reason": "unmatched_box",
                            "detail": f"{lf.ref}: matches no image" + (f" (and: {b.detail})" if b.reject else "")})
        return out, len(files)

    def unmatched_warning(self, source: str, what: str = "image") -> str | None:
        files = self.unmatched()
        if not files:
            return None
        shown = "; ".join(self.ref(rel) for rel in files[:5]) + (" ..." if len(files) > 5 else "")
        return (f"{source}: {len(files)} of {len(self.files)} {self.fmt.upper()} label files match no {what}: {shown} "
                "(their boxes are written to rejects.jsonl as unmatched_box). A label file matches the image with "
                "the same path under the images folder, else the one image with its file stem")


def count_label_notes(stats: Counter, fmt: str, difficult: str = "keep") -> list[str]:
    """Informational lines for the check from counters filled while reading (``no_label_file``,
    ``empty``, ``unsized``, ``difficult``, ``truncated``)."""
    notes = []
    if stats["no_label_file"]:
        notes.append(f"{stats['no_label_file']} images have no {fmt.upper()} label file: no boxes, labels unknown")
    if stats["empty"]:
        notes.append(f"{stats['empty']} label files hold no box: images without boxes")
    if stats["unsized"]:
        notes.append(f"{stats['unsized']} VOC files have no <size>: their boxes are taken as pixels of the image, "
                     "unchecked against its size")
    if stats["difficult"]:
        notes.append(f"{stats['difficult']} VOC objects are marked difficult ({'kept' if difficult == 'keep' else 'rejected: option difficult'})")
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} VOC objects are marked truncated (kept)")
    return notes


# --------------------------------------------------------------------------- source options

LABEL_OPTIONS = ("yolo", "voc", "classes", "voc_origin", "difficult")


def label_set_from_options(opts: dict[str, Any], root: Path, encoding: str, source: str, name_files: bool,
                           default_folders: bool = False) -> LabelSet | None:
    """The :class:`LabelSet` the options ``yolo`` (a folder of .txt labels) or ``voc`` (a folder
    of .xml files), ``classes``, ``voc_origin`` and ``difficult`` describe; ``None`` when
    neither ``yolo`` nor ``voc`` is set (and, with ``default_folders``, no ``labels/`` or
    ``Annotations/`` folder is under ``root``). YOLO class names default to the first of
    :data:`CLASS_FILE_CANDIDATES` in ``root``, the labels folder or its parent. Raises
    :class:`LabelFileError` (a :class:`SourceError`) naming the source and option."""
    yolo, voc = opts.get("yolo"), opts.get("voc")
    if yolo and voc:
        raise LabelFileError(f"{source}: give one of the options yolo and voc, not both")
    if yolo:
        fmt, folder = "yolo", root / str(yolo)
    elif voc:
        fmt, folder = "voc", root / str(voc)
    elif default_folders and (root / "labels").is_dir():
        fmt, folder = "yolo", root / "labels"
    elif default_folders and any((root / d).is_dir() for d in ("Annotations", "annotations")):
        fmt, folder = "voc", next(root / d for d in ("Annotations", "annotations") if (root / d).is_dir())
    else:
        for opt in ("classes", "voc_origin", "difficult"):
            if opt in opts:
                raise LabelFileError(f"{source}: option {opt} needs the option yolo or voc (the label folder)")
        return None
    try:
        classes, classes_file = None, None
        if opts.get("classes") is not None:
            value = opts["classes"]
            classes = class_names_option(value, root, encoding, f"{source}: option classes")
            classes_file = None if isinstance(value, (list, tuple)) else root / str(value)
        elif fmt == "yolo":
            classes_file = default_class_file(root, folder, folder.parent)
            classes = read_class_names(classes_file, encoding) if classes_file else None
        try:
            origin = int(str(opts.get("voc_origin", 1)).strip())
        except ValueError:
            raise LabelFileError(f"voc_origin must be 1 or 0, got {opts.get('voc_origin')!r}") from None
        return LabelSet(fmt, folder, classes, classes_file, encoding, origin,
                        str(opts.get("difficult", "keep")).strip().lower(), name_files)
    except LabelFileError as err:
        raise LabelFileError(f"{source}: {err}") from None
