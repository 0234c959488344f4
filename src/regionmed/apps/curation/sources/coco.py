"""COCO box files: read strictly, and joined to a source's images the way users lay files out.

:func:`read_coco` reads ``images``, ``annotations`` and ``categories``. Every annotation
becomes one :class:`~regionmed.apps.curation.items.RawBox` (COCO ``bbox`` is
``[x, y, w, h]``, top-left corner, by the format's definition), or a region-level reject:

* ``unknown_category`` — a ``category_id`` that is not among the categories (an
  annotation without ``category_id`` is an unlabelled box, label ``region``);
* ``invalid_box`` — a ``bbox`` that is not four finite numbers;
* ``unmatched_box`` — an ``image_id`` that is not among the images, or (in
  :func:`join_coco`) an image that no input of the source names.

A category's ``supercategory`` gives its boxes a label kind when it states one
(:func:`~regionmed.apps.curation.sources.kinds.kind_of_supercategory`: "anatomy",
"organ" ... or "finding", "lesion" ...); other values leave the kind unknown.

:func:`join_coco` matches each COCO image's ``file_name`` to the table's image paths:
relative to the COCO file's folder, the source folder or the table's folder, and
otherwise by file name alone when exactly one table image has that name. Back
slashes (Windows paths) are read as folder separators. Messages name COCO image and
annotation ids and the *shape* of a path (``images/<name>.png``), never file names,
which may hold patient identifiers.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionmed.apps.curation.items import RawBox
from regionmed.apps.curation.sources.kinds import kind_of_supercategory
from regionmed.apps.curation.tables import TableError, read_json


@dataclass
class CocoFile:
    """The boxes of one COCO file, by image id (ids compared as strings)."""

    path: Path
    images: dict[str, str] = field(default_factory=dict)  # image id -> file_name
    boxes: dict[str, list[RawBox]] = field(default_factory=dict)  # image id -> boxes (some marked reject)
    orphans: list[dict] = field(default_factory=list)  # region rejects with no image
    annotations: int = 0
    categories: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str | None] = field(default_factory=dict)  # category id -> kind its supercategory states


def _region_reject(path: Path, ann_id: Any, label: str, reason: str, detail: str) -> dict:
    return {"id": None, "ref": f"{path.name} annotation {ann_id}", "region": None, "label": label,
            "reason": reason, "detail": detail}


def read_coco(path: str | Path, encoding: str = "utf-8") -> CocoFile:
    """Read a COCO json file. Raises :class:`TableError` when it is not one (naming what is missing)."""
    path = Path(path)
    data = read_json(path, encoding)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations", []), list):
        raise TableError(f"{path}: not a COCO file (expected an object with 'images' and 'annotations' lists)")
    coco = CocoFile(path)
    for k, cat in enumerate(data.get("categories") or []):
        if not isinstance(cat, dict) or "id" not in cat:
            raise TableError(f"{path}: categories[{k}] has no 'id'")
        coco.categories[str(cat["id"])] = str(cat.get("name") or cat["id"])
        coco.kinds[str(cat["id"])] = kind_of_supercategory(cat.get("supercategory"))
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
            raise TableError(f"{path}: images[{k}] needs an 'id' and a 'file_name'")
        coco.images[str(im["id"])] = str(im["file_name"])
    for k, ann in enumerate(data.get("annotations") or []):
        coco.annotations += 1
        if not isinstance(ann, dict):
            coco.orphans.append(_region_reject(path, k, "?", "invalid_box", f"annotations[{k}] is not an object"))
            continue
        aid = ann.get("id", k)
        label, reject, detail, kind = "region", None, "", None
        cid = ann.get("category_id")
        if cid is not None:
            label = coco.categories.get(str(cid), f"category {cid}")
            kind = coco.kinds.get(str(cid))
            if str(cid) not in coco.categories:
                reject = "unknown_category"
                known = sorted(coco.categories, key=lambda s: (len(s), s))
                detail = (f"{path.name} annotation {aid}: category_id {cid!r} is not among the categories "
                          f"{known[:20]}{' ...' if len(known) > 20 else ''}")
        nums = _four_numbers(ann.get("bbox"))
        if nums is None:
            reject, detail = "invalid_box", f"{path.name} annotation {aid}: bbox {ann.get('bbox')!r} is not 4 finite numbers"
            box = [math.nan] * 4
        else:
            x, y, w, h = nums
            box = [x, y, x + w, y + h]
        raw = RawBox(label, box, reject=reject, detail=detail, kind=kind)
        img = str(ann.get("image_id"))
        if img not in coco.images:
            coco.orphans.append(_region_reject(path, aid, label, "unmatched_box",
                                               f"{path.name} annotation {aid}: image_id {ann.get('image_id')!r} is not among the images"))
            continue
        coco.boxes.setdefault(img, []).append(raw)
    return coco


def _four_numbers(box: Any) -> list[float] | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or any(isinstance(v, bool) for v in box):
        return None
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        return None
    return vals if all(math.isfinite(v) for v in vals) else None


def norm_path(base: str | Path, rel: str) -> str:
    """``rel`` (``/`` or ``\\`` separated) under ``base``, normalised (an absolute ``rel`` stays itself)."""
    rel = rel.strip().replace("\\", "/")
    return os.path.normpath(os.path.join(os.path.abspath(str(base)), rel))


def path_shape(rel: str) -> str:
    """The shape of a path with file names masked: ``images/2020/<name>.png`` (no identifiers)."""
    parts = rel.strip().replace("\\", "/").split("/")
    suffix = re.search(r"\.[A-Za-z0-9]{1,5}$", parts[-1])
    return "/".join(parts[:-1][-3:] + [f"<name>{suffix.group(0) if suffix else ''}"])


@dataclass
class CocoJoin:
    """The result of :func:`join_coco`: boxes by normalised table image path, plus rejects."""

    by_path: dict[str, list[RawBox]] = field(default_factory=dict)
    orphans: list[dict] = field(default_factory=list)
    how: Counter = field(default_factory=Counter)  # "path" / "file name" / "unmatched" / "ambiguous" (images)
    boxes: int = 0


def join_coco(coco: CocoFile, table_paths: Iterable[str], bases: Iterable[str | Path]) -> CocoJoin:
    """Attach the boxes of ``coco`` to the table's images.

    ``table_paths`` are the table's image paths, normalised with :func:`norm_path`;
    ``bases`` the folders a ``file_name`` may be relative to, in order (the COCO file's
    folder, the source folder, the table's folder). A file name that matches no path
    is matched by its base name when exactly one table image has it. The boxes of an
    image that is still unmatched become ``unmatched_box`` region rejects."""
    paths = set(table_paths)
    by_name: dict[str, set[str]] = defaultdict(set)
    for p in paths:
        by_name[os.path.basename(p)].add(p)
    bases = [os.path.abspath(str(b)) for b in dict.fromkeys(str(b) for b in bases)]
    out = CocoJoin(orphans=list(coco.orphans))
    for img_id, fname in coco.images.items():
        boxes = coco.boxes.get(img_id, [])
        if not boxes:
            continue
        out.boxes += len(boxes)
        target = next((c for c in (norm_path(b, fname) for b in bases) if c in paths), None)
        how = "path"
        if target is None:
            hits = by_name.get(os.path.basename(fname.replace("\\", "/")), set())
            if len(hits) == 1:
                target, how = next(iter(hits)), "file name"
            else:
                how = "ambiguous" if hits else "unmatched"
        out.how[how] += 1
        if target is not None:
            out.by_path.setdefault(target, []).extend(boxes)
            continue
        why = (f"its file name is shared by {len(hits)} table images: give paths in file_name" if how == "ambiguous"
               else "no table row names this image (by path relative to the COCO file, the source or the table "
                    "folder, nor by file name)")
        for j, b in enumerate(boxes):
            out.orphans.append({"id": None, "ref": f"{coco.path.name} image {img_id}", "region": j, "label": b.label,
                                "reason": "unmatched_box",
                                "detail": f"{coco.path.name} image {img_id} ({path_shape(fname)}): {why}"})
    return out
