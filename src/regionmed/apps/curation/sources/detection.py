"""A folder of images with detection labels (YOLO text or Pascal VOC XML) and no report text.

The layout of a detection export (Ultralytics, Darknet, VOC, CVAT, Roboflow ...)::

    <root>/images/<path>.jpg        (option images; subfolders allowed)
    <root>/labels/<path>.txt        YOLO (option yolo), + classes.txt or data.yaml (option classes)
    <root>/Annotations/<path>.xml   or VOC (option voc)

How files are read and matched, and the reject reasons: :mod:`.labelfiles`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from regionmed.apps.curation.captions import label_words
from regionmed.apps.curation.items import RawItem, hashed, norm_modality
from regionmed.apps.curation.sources.base import Source, SourceError, SourceReport
from regionmed.apps.curation.sources.coco import path_shape
from regionmed.apps.curation.sources.generic import SPLIT_NAMES
from regionmed.apps.curation.sources.labelfiles import (
    IMAGE_SUFFIXES,
    LABEL_OPTIONS,
    LabelFileError,
    count_label_notes,
    label_set_from_options,
)

# How the made-up text names an image of each modality ("chest" + "radiograph").
MODALITY_NOUNS = {"xray": "radiograph", "ct": "CT image", "mri": "MR image", "us": "ultrasound image",
                  "mammography": "mammogram", "pet": "PET image"}
FALSE_WORDS = ("false", "no", "0", "off")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def describe(counts: Counter, annotated: bool, modality: str, body: str) -> tuple[str, str]:
    """``(report, summary)`` made from an image's labels, for data without report text.

    ``counts``: boxes per class name (classes the labels declare, in order of first box);
    ``annotated``: the image has a label file. The subject is ``<body> <modality noun>``
    (:data:`MODALITY_NOUNS`, e.g. "Chest radiograph"; "Image" when neither is known).
    Summary: "Chest radiograph with active tuberculosis and obsolete pulmonary
    tuberculosis." (class names as words, :func:`~regionmed.apps.curation.captions.label_words`),
    or "... with no labelled boxes." for an empty label file; the report adds
    "Labelled boxes: active tuberculosis (2), ...". An image without a label file gets the
    subject alone ("Chest radiograph.")."""
    noun = MODALITY_NOUNS.get(modality, "image")
    what = " ".join(w for w in (" ".join(body.replace("_", " ").split()), noun) if w)
    what = what[:1].upper() + what[1:]
    if not annotated:
        return f"{what}.", f"{what}."
    if not counts:
        text = f"{what} with no labelled boxes."
        return text, text
    summary = f"{what} with {_join([label_words(c) for c in counts])}."
    report = f"{summary} Labelled boxes: " + ", ".join(f"{label_words(c)} ({n})" for c, n in counts.items()) + "."
    return report, summary


class DetectionSource(Source):
    """One item per image under the images folder, with the boxes of its label file.

    Options: ``images`` (the images folder, default ``images/`` or else the source folder),
    ``yolo`` (a folder of YOLO ``.txt`` labels; default ``labels/``) with ``classes`` (a
    ``classes.txt`` / ``.names`` / ``data.yaml`` file, or a list; default the first of those
    found in the source folder, the labels folder or its parent), or ``voc`` (a folder of VOC
    ``.xml``; default ``Annotations/``) with ``voc_origin`` (1 default: VOC devkit 1-based
    pixels; 0: 0-based pixel edges), ``difficult`` (``keep`` default, or ``reject``) and
    optional ``classes``; ``absent_labels`` (``negative`` default, or ``unknown``);
    ``modality`` and ``body`` (e.g. ``xray``, ``chest``: they name the image in the text);
    ``id_from`` (``hash`` default: ids and messages never show file names; ``stem``: ids are
    the image paths without suffix, and messages name files); ``folder_splits`` (true
    default: an image under a folder named train / val / valid / test keeps that split).
    The label-kind options of every source apply (e.g. ``kind: finding``).

    **Text.** The data has no report: the summary and report are made from the labels
    (:func:`describe`: "Chest radiograph with active tuberculosis." / "... with no labelled
    boxes."), and each region's caption is the builder's usual one: the class name as words
    and the box's place (``"Active tuberculosis in the right upper zone, peripheral."``,
    :func:`~regionmed.apps.curation.captions.region_caption`). Nothing is specific to one
    dataset.

    **Labels.** An image with a label file gets ``{class: 1}`` for each class one of its
    boxes has, and (``absent_labels: negative``, the detection convention that boxes are
    exhaustive) ``{class: 0}`` for every other declared class — an empty label file is an
    image without boxes, all classes 0. An image without a label file has no labels
    (unknown) and no boxes. ``absent_labels: unknown`` leaves absent classes out.

    **Splits and groups.** Detection exports have no patient ids: each image is its own
    split group, and the builder's near-duplicate grouping (perceptual hash) keeps copies of
    one film in one split. :meth:`label_files` lists every label and class file read.
    """

    name = "detection"
    options = ("images", *LABEL_OPTIONS, "absent_labels", "modality", "body", "id_from", "folder_splits")
    reads = ("images/ (option images); YOLO labels/*.txt + classes.txt or data.yaml names (options yolo, classes) "
             "or VOC Annotations/*.xml (option voc); no table")

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        o = self.opts
        self.id_from = str(o.get("id_from", "hash"))
        if self.id_from not in ("hash", "stem"):
            raise SourceError(f"{self.name}: id_from must be 'hash' or 'stem', got {self.id_from!r}")
        images = o.get("images")
        self.images_dir = Path(os.path.abspath(self.root / str(images or "images")))
        if images is None and not self.images_dir.is_dir():
            self.images_dir = Path(os.path.abspath(self.root))
        if not self.images_dir.is_dir():
            raise SourceError(f"{self.name}: images folder {self.images_dir} not found (option images)")
        self.absent = str(o.get("absent_labels", "negative")).strip().lower()
        if self.absent not in ("negative", "unknown"):
            raise SourceError(f"{self.name}: absent_labels must be 'negative' or 'unknown', got {self.absent!r}")
        self.folder_splits = str(o.get("folder_splits", True)).strip().lower() not in FALSE_WORDS
        self.modality = norm_modality(str(o.get("modality", "") or ""))
        self.body = str(o.get("body", "") or "")
        labels = label_set_from_options(o, self.root, self.encoding, self.name, self.id_from == "stem",
                                        default_folders=True)
        if labels is None:
            raise SourceError(f"{self.name}: no label folder under {self.root}: set the option yolo (a folder of "
                              ".txt labels) or voc (a folder of .xml files)")
        self.labels = labels
        self.stats: Counter = Counter()

    def label_files(self) -> list[Path]:
        """Every label and class-names file the source reads (for build input change detection)."""
        return self.labels.files_read()

    def _images(self) -> list[Path]:
        skip = Path(os.path.abspath(self.labels.folder))
        return sorted((p for p in self.images_dir.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and skip not in p.parents),
                      key=lambda p: p.relative_to(self.images_dir).as_posix())

    def _count(self):
        return len(self._images())

    def _split(self, rel: str) -> str | None:
        if not self.folder_splits:
            return None
        return next((SPLIT_NAMES[d.lower()] for d in rel.split("/")[:-1] if d.lower() in SPLIT_NAMES), None)

    def _items(self) -> Iterator[RawItem]:
        images = self._images()
        paths = [str(p) for p in images]
        matched = self.labels.match(paths, [self.images_dir])
        if self.labels.files and not matched:
            first_label = self.labels.files[0]
            first_image = images[0].relative_to(self.images_dir).as_posix() if images else "(no image)"
            raise SourceError(
                f"{self.name}: none of the {len(self.labels.files)} label files in {self.labels.folder} matches one of "
                f"the {len(images)} images in {self.images_dir}: labels look like {path_shape(first_label)!r}, images "
                f"like {path_shape(first_image)!r}. A label file matches the image with the same path under the images "
                "folder (set the option images), else the one image with its file stem")
        rep = self._rep
        rep.orphans, _ = self.labels.orphans(self.name)
        warning = self.labels.unmatched_warning(self.name)
        if warning:
            rep.warnings.append(warning)
        classes = self.labels.class_names()
        known = set(classes)
        stats = self.stats = Counter()
        for n, (path, abs_path) in enumerate(zip(images, paths), 1):
            rel = path.relative_to(self.images_dir).as_posix()
            lrel = matched.get(abs_path)
            boxes, labels, counts = [], {}, Counter()
            if lrel is None:
                stats["no_label_file"] += 1
            else:
                lf = self.labels.read(lrel)
                boxes = list(lf.boxes)
                stats["empty"] += not boxes
                stats["unsized"] += self.labels.fmt == "voc" and not lf.sized
                stats["difficult"] += lf.difficult
                stats["truncated"] += lf.truncated
                counts = Counter(b.label for b in boxes if b.label in known and b.reject != "unknown_category")
                labels = {c: 1 for c in counts}
                if self.absent == "negative":
                    labels.update({c: 0 for c in classes if c not in counts})
            report, summary = describe(counts, lrel is not None, self.modality, self.body)
            stem = self.id_from == "stem"
            yield RawItem(
                id=f"{self.name}-{rel.rsplit('.', 1)[0].replace('/', '_')}" if stem
                else f"{self.name}-{hashed(rel, 'regionmed-id')}",
                source=self.name,
                image_path=str(path),
                report=report,
                summary=summary,
                boxes=boxes,
                split=self._split(rel),
                modality=self.modality if self.modality != "unknown" else "auto",
                body=self.body,
                labels=labels,
                ref=f"{self.images_dir.name}/{rel}" if stem else f"image #{n}",
            )

    def _after_check(self, rep: SourceReport) -> None:
        rep.notes += [f"{self.name}: {note}" for note in count_label_notes(self.stats, self.labels.fmt, self.labels.difficult)]


__all__ = ["DetectionSource", "LabelFileError", "describe"]
