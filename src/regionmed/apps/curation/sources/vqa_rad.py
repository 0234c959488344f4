"""VQA-RAD (``images/synpic*.jpg``, ``trainset.json``, ``testset.json``)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from regionmed.apps.curation.facts import facts_report
from regionmed.apps.curation.items import RawItem
from regionmed.apps.curation.sources.base import Source, SourceError
from regionmed.apps.curation.tables import read_json, require_keys

BODY = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}


_MODALITY_PATTERNS = (
    ("ct", r"\bct\b|computed tomograph|\bcta\b|hounsfield"),
    ("mri", r"\bmri?\b|\bt[12]\b|t[12][- ]weighted|flair|diffusion|\bdwi\b|\badc\b|gadolinium|magnetic"),
    ("xray", r"x-?ray|radiograph|\bfilm\b|\bcxr\b|\bpa\b|\bap\b|plain film|upright|supine film"),
    ("us", r"ultrasound|sonogra"),
    ("angiography", r"angiogra"),
)


def guess_modality(pairs) -> str:
    """Modality from the QA: answers to modality/type-of-image questions, and questions
    such as "Is this a CT?" answered yes. Returns "unknown" when nothing says."""
    votes: dict[str, int] = {}
    for q, a, kind in pairs:
        ql, al = q.lower(), a.lower().strip()
        if re.search(r"\bnot\b", ql):
            continue
        if al == "yes":
            text = ql if re.search(r"\b(is|was) (this|the image|it)\b|taken with|modality|imaging|\bscan\b", ql) else ""
        elif al == "no":
            text = ""
        elif "MODAL" in kind.upper() or re.search(r"modality|type of (image|imaging|scan|study)|kind of (image|scan)|imaging (technique|method)|what (image|scan)|how was (this|the) image|which (view|projection)|weight", ql):
            text = al
        else:
            text = ""
        for name, pat in _MODALITY_PATTERNS:
            if text and re.search(pat, text):
                votes[name] = votes.get(name, 0) + 1
    if not votes:  # weaker evidence: any question or answer that names a modality
        for q, a, _ in pairs:
            text = f"{q} {a}".lower()
            if re.search(r"\bnot\b|\bor\b", text):
                continue
            for name, pat in _MODALITY_PATTERNS:
                if name != "xray" and re.search(pat, text) or name == "xray" and re.search(r"x-?ray|radiograph|\bcxr\b", text):
                    votes[name] = votes.get(name, 0) + 1
    return max(votes, key=votes.get) if votes else "unknown"


# The keys of a question record this source reads (a record without one stops, naming the file).
QUESTION_KEYS = {"image_name": "the image file", "question": "the question", "answer": "the answer"}


class VqaRadSource(Source):
    """One item per image. Most test images are also asked about in the train
    set: an image with any test question goes to test (a test image never feeds
    training); the rest are train. VQA-RAD has no validation split."""

    name = "vqa_rad"

    def __init__(self, root, **kw):
        super().__init__(root, **kw)
        if not (self.root / "images").is_dir():
            raise SourceError(f"vqa_rad: {self.root / 'images'} is missing (expected the VQA-RAD layout)")

    def _files(self):
        return sorted(p for p in (self.root / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def _count(self):
        return len(self._files())

    def _items(self) -> Iterator[RawItem]:
        qa: dict[str, list] = {}
        split: dict[str, str] = {}
        organ: dict[str, str] = {}
        for name, fname in (("train", "trainset.json"), ("test", "testset.json")):
            path = self.uses(self.root / fname)
            if not path.is_file():
                continue
            for q in require_keys(read_json(path, self.encoding), QUESTION_KEYS, path):
                img = q["image_name"]
                qa.setdefault(img, []).append((str(q["question"]), str(q["answer"]), str(q.get("question_type", ""))))
                if name == "test" or img not in split:
                    split[img] = name
                organ.setdefault(img, q.get("image_organ", ""))
        for path in self._files():
            pairs = qa.get(path.name, [])
            yield RawItem(
                id=f"vqa_rad-{path.stem}",
                source=self.name,
                image_path=str(path),
                facts=facts_report(pairs),
                split=split.get(path.name),
                group=f"vqa_rad/{path.stem}",
                modality=guess_modality(pairs),
                body=BODY.get(str(organ.get(path.name, "")).strip().upper(), ""),
                ref=f"images/{path.name}",
            )
