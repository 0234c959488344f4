"""Source adapters: each iterates :class:`~regionmed.apps.curation.items.RawItem` objects.

Choose one by name (``get_source(name, root, **options)``):

* ``generic`` — a folder of images + a CSV or JSONL table (+ optional COCO json, YOLO
  labels or VOC XML for boxes);
* ``detection`` — a folder of images + YOLO labels or VOC XML, no table and no report text;
* ``dicom`` — a folder of DICOM files (+ optional table or ``<stem>.txt`` reports);
* ``slake``, ``vqa_rad``, ``covid_cxr`` — the public sets as laid out in ``../shared/data``.

:data:`SOURCES_HELP` lists the files and columns each one reads (``regionmed build --help``).
:meth:`Source.check` reads every row without decoding images (``regionmed check-source``).
"""

from __future__ import annotations

from regionmed.apps.curation.sources.base import Source, SourceError, SourceReport
from regionmed.apps.curation.sources.covid_cxr import CovidCxrSource
from regionmed.apps.curation.sources.detection import DetectionSource
from regionmed.apps.curation.sources.generic import DicomSource, GenericSource
from regionmed.apps.curation.sources.slake import SlakeSource
from regionmed.apps.curation.sources.vqa_rad import VqaRadSource

SOURCES: dict[str, type[Source]] = {
    "generic": GenericSource,
    "dicom": DicomSource,
    "detection": DetectionSource,
    "slake": SlakeSource,
    "vqa_rad": VqaRadSource,
    "covid_cxr": CovidCxrSource,
}


SOURCES_HELP = """\
Source files and columns (each source reads only these; a table column it does not
read is named in a warning at build time):
  generic   a folder of images + a table (option table; default table.csv/.tsv/.jsonl).
            Columns, as option: default column name:
              image_col: image         image path, relative to the folder or the table's folder
              report_col: report       report text (nan, NA, null, None ... count as missing)
              summary_col: summary     short impression (else made from the report)
              labels_col: labels       "a|b", a JSON list, {"class": 1/0/-1}, or one value
                                       (1/0/-1, yes/no, true/false: the column is the class)
              label_cols: (none)       columns that each hold one class's value (CheXpert style)
              patient_col: patient_id  patient key, hashed before use (never stored)
              split_col: split         train/val/test (other values: split by the builder)
              boxes_col: boxes         JSON [{"label", "box"}], in box_format
              modality_col: modality   xray, ct, mri, ... (else option modality)
            Other options: coco (COCO json; file_name relative to it, the folder or the
            table, else by unique file name), yolo (a folder of YOLO .txt labels, with
            classes) or voc (a folder of VOC .xml), matched to the table's images as for
            detection, box_format (xyxy default, or xywh),
            uncertain_labels (U-Ignore default, U-Zeros, U-Ones: what -1 becomes),
            encoding (utf-8 default, strict; e.g. cp1252 for Windows "ANSI" exports),
            delimiter, modality, body, id_from.
  dicom     *.dcm files with <stem>.txt reports beside them, or a table as for generic.
  detection a folder of images + detection labels, no table (text made from the labels).
            Options: images (folder; default images/, else the source folder),
              yolo: labels       .txt per image: class x_centre y_centre width height in [0, 1]
              classes            classes.txt (line i = id i), .names, or data.yaml names
                                 (list or {id: name}); default: found beside the labels
              voc: Annotations   .xml per image (<filename>, <size>, <object><name>,
                                 <bndbox> xmin ymin xmax ymax, <difficult>, <truncated>)
              voc_origin: 1      1 = VOC devkit (1-based pixels: box [xmin-1, ymin-1, xmax, ymax]),
                                 0 = the numbers are 0-based pixel edges (CVAT)
              difficult: keep    or reject (rejects.jsonl reason difficult_box)
              absent_labels: negative   a declared class without a box is 0 (or unknown)
              modality, body     name the image in the text ("Chest radiograph with ...")
              id_from: hash      or stem (ids = image paths; messages name files)
              folder_splits: true   images under train/ val/ test/ keep that split
            A label file is matched to the image with the same path under the images
            folder, else (VOC) its <filename>, else the one image with its stem.
  slake     imgs/xmlabN/{source.jpg,detection.json}, train/validate/test.json.
  vqa_rad   images/*.jpg, trainset.json, testset.json.
  covid_cxr images/, annotations.json (COCO), metadata.csv columns filename, patientid,
            finding, clinical_notes, view (the others, e.g. sex and age, are never read).
Every source takes encoding, and the label-kind options (a region's kind: anatomy or
finding; otherwise unknown):
  label_kinds: {label: anatomy|finding}   finding_labels: [..]   anatomy_labels: [..]
  kind: finding|anatomy   (every label not otherwise known, e.g. all classes of a lesion export)
  Known without options: slake's 44 classes, covid_cxr's lungs (anatomy), and a COCO
  category's supercategory when it says anatomy/organ/... or finding/lesion/...
Check a source before a long build:
  regionmed check-source --source generic --input DIR [--option KEY=VALUE ...]
"""


def get_source(name: str, root, **options) -> Source:
    try:
        cls = SOURCES[name]
    except KeyError:
        raise SourceError(f"unknown source {name!r}; choose one of {sorted(SOURCES)}") from None
    return cls(root, **options)


__all__ = ["SOURCES", "SOURCES_HELP", "Source", "SourceError", "SourceReport", "get_source"]
