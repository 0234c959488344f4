"""SLAKE 1.0 (``imgs/xmlabN/{source.jpg,detection.json}``, ``train/validate/test.json``)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

from regionmed.apps.curation.facts import facts_report
from regionmed.apps.curation.items import RawBox, RawItem, norm_modality
from regionmed.apps.curation.sources.base import Source, SourceError
from regionmed.apps.curation.tables import TableError, read_json, require_keys

SPLIT_FILES = (("train", "train.json"), ("val", "validate.json"), ("test", "test.json"))
SPLIT_RANK = {"train": 0, "val": 1, "test": 2}

# The label kind of SLAKE 1.0's 44 box classes (detection.json): 13 lesions / abnormalities
# and 31 organs or structures. A class in neither set (another release) has an unknown kind.
SLAKE_FINDING_CLASSES = frozenset({
    "Brain Edema", "Brain Enhancing Tumor", "Brain Non-enhancing Tumor", "Liver Cancer", "Lung Cancer", "Cardiomegaly",
    "Atelectasis", "Pneumonia", "Pneumothorax", "Effusion", "Infiltrate", "Nodule", "Mass",
})
SLAKE_ANATOMY_CLASSES = frozenset({
    "Bladder", "Brain Stem", "Colon", "Duodenum", "Esophagus", "Heart", "Larynx", "Left Ear", "Left Eye",
    "Left Femoral Head", "Left Kidney", "Left Lung", "Left Mandible", "Left Parotid", "Left Temporal Lobe", "Liver",
    "Rectum", "Right Ear", "Right Eye", "Right Femoral Head", "Right Kidney", "Right Lung", "Right Mandible",
    "Right Parotid", "Right Temporal Lobe", "Small Bowel", "Spinal Cord", "Spleen", "Stomach", "Tooth", "Trachea",
})


def slake_kind(label: str) -> str | None:
    """``"finding"``, ``"anatomy"`` or ``None`` for a SLAKE box class."""
    return "finding" if label in SLAKE_FINDING_CLASSES else ("anatomy" if label in SLAKE_ANATOMY_CLASSES else None)


def body_of(location: str) -> str:
    loc = (location or "").lower()
    if "chest" in loc or "lung" in loc:
        return "chest"
    if "brain" in loc or "head" in loc:
        return "head"
    if "abdomen" in loc:
        return "abdomen"
    if "pelvi" in loc:
        return "pelvis"
    if "neck" in loc:
        return "neck"
    return loc.replace(" ", "_")


# The keys of a question record this source reads (a record without one stops, naming the file).
QUESTION_KEYS = {"img_name": "the image folder", "question": "the question", "answer": "the answer"}


class SlakeSource(Source):
    """One item per image folder. The official split is per question: an image
    asked about in several splits goes to the most held-out one (test > val > train),
    so a test image never feeds training. English QA become the report's facts.
    Box label kinds come from SLAKE's class list (:data:`SLAKE_FINDING_CLASSES`,
    :data:`SLAKE_ANATOMY_CLASSES`)."""

    name = "slake"

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        if not (self.root / "imgs").is_dir():
            raise SourceError(f"slake: {self.root / 'imgs'} is missing (expected the SLAKE layout)")

    def _folders(self):
        def num(p):
            m = re.search(r"(\d+)$", p.name)
            return (int(m.group(1)) if m else 10**9, p.name)

        return sorted((p for p in (self.root / "imgs").iterdir() if p.is_dir()), key=num)

    def _count(self):
        return len(self._folders())

    def _index(self):
        qa: dict[str, list] = {}
        split: dict[str, str] = {}
        info: dict[str, tuple[str, str]] = {}
        for name, fname in SPLIT_FILES:
            path = self.uses(self.root / fname)
            if not path.is_file():
                continue
            for q in require_keys(read_json(path, self.encoding), QUESTION_KEYS, path):
                folder = q["img_name"].split("/")[0]
                split[folder] = max(split.get(folder, name), name, key=SPLIT_RANK.__getitem__)
                info.setdefault(folder, (q.get("modality", ""), q.get("location", "")))
                if q.get("q_lang", "en") == "en":
                    qa.setdefault(folder, []).append((q["question"], q["answer"], q.get("content_type", "")))
        return qa, split, info

    def _items(self) -> Iterator[RawItem]:
        qa, split, info = self._index()
        for folder in self._folders():
            boxes: list[RawBox] = []
            det = self.uses(folder / "detection.json")
            if det.is_file():
                try:
                    for entry in read_json(det, self.encoding):
                        for label, (x, y, w, h) in entry.items():
                            boxes.append(RawBox(label, [float(x), float(y), float(x) + float(w), float(y) + float(h)],
                                                kind=slake_kind(label)))
                except (ValueError, TypeError, AttributeError, TableError) as err:
                    # a malformed box file: its boxes are one invalid_box region reject, the image is kept
                    why = "not valid JSON" if isinstance(err, TableError) else "not a list of {label: [x, y, w, h]}"
                    boxes = [RawBox("?", [math.nan] * 4, reject="invalid_box", detail=f"imgs/{folder.name}/detection.json: {why}")]
            modality, location = info.get(folder.name, ("", ""))
            facts = facts_report(qa.get(folder.name, []))
            yield RawItem(
                id=f"slake-{folder.name}",
                source=self.name,
                image_path=str(folder / "source.jpg"),
                facts=facts,
                boxes=boxes,
                split=split.get(folder.name),
                group=f"slake/{folder.name}",
                modality=norm_modality(modality),
                body=body_of(location),
                labels={b.label: 1 for b in boxes if not b.reject},
                ref=f"imgs/{folder.name}",
            )
