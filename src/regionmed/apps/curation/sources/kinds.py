"""Label kinds: whether a box label names **anatomy** (an organ or structure) or a **finding**
(a lesion or abnormality), so that grounding can be measured separately for each.

A region's ``kind`` (:data:`regionmed.data.schema.REGION_KINDS`) is known from, first to last:

1. the source options every source takes (a label is matched case-insensitively, white
   space collapsed):

   * ``label_kinds: {label: anatomy|finding}``;
   * ``finding_labels: [label, ...]`` and ``anatomy_labels: [label, ...]``;

2. what the source itself knows: a COCO category's ``supercategory`` when it says so
   (:data:`SUPERCATEGORY_KINDS`: "anatomy", "organ", "structure" ... / "finding", "lesion",
   "abnormality", "disease" ...), a public set's own class list (``slake``), or the kind of
   every box of a source (``covid_cxr``: lung boxes are anatomy);
3. ``kind: anatomy|finding``: the kind of every other label (e.g. ``kind: finding`` for a
   detection export whose classes are all lesions).

Otherwise the kind is unknown and the region has no ``kind`` field. On the command line the
options are JSON or comma-separated: ``--option 'label_kinds={"Liver": "anatomy"}'``,
``--option finding_labels=Nodule,Mass``.
"""

from __future__ import annotations

import json
from typing import Any

from regionmed.data.schema import REGION_KINDS
from regionmed.errors import RegionmedError

KIND_OPTIONS = ("label_kinds", "finding_labels", "anatomy_labels", "kind")

# COCO supercategory values (compared case-insensitively) that state a kind; any other value
# (e.g. "none", "object", a body region) leaves the kind unknown.
SUPERCATEGORY_KINDS = {
    **{w: "anatomy" for w in ("anatomy", "anatomical", "anatomical structure", "anatomical structures", "organ",
                              "organs", "structure", "structures", "body part", "body parts", "tissue")},
    **{w: "finding" for w in ("finding", "findings", "lesion", "lesions", "abnormality", "abnormalities",
                              "pathology", "pathologies", "disease", "diseases", "abnormal")},
}


class KindError(RegionmedError, ValueError):
    """A label-kind option that cannot be read (unknown kind, a label given two kinds)."""


def label_key(label: str) -> str:
    """How labels are compared: case-folded, white space collapsed."""
    return " ".join(str(label).split()).casefold()


def kind_of_supercategory(value: Any) -> str | None:
    """The kind a COCO ``supercategory`` states (:data:`SUPERCATEGORY_KINDS`), else ``None``."""
    if not isinstance(value, str):
        return None
    return SUPERCATEGORY_KINDS.get(label_key(value).replace("_", " "))


def _kind(value: Any, where: str) -> str:
    k = str(value).strip().lower()
    if k not in REGION_KINDS:
        raise KindError(f"{where}: kind must be one of {list(REGION_KINDS)}, got {value!r}")
    return k


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise KindError(f"{where}: {text[:40]!r} is not a JSON list ({err.msg})") from None
        else:
            return [s.strip() for s in text.split(",") if s.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise KindError(f"{where}: expected a list of labels, got {value!r}")
    return [s.strip() for s in value if s.strip()]


def _as_map(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise KindError(f"{where}: {value[:40]!r} is not a JSON object {{label: kind}} ({err.msg})") from None
    if not isinstance(value, dict):
        raise KindError(f"{where}: expected a mapping {{label: anatomy|finding}}, got {value!r}")
    return value


class LabelKinds:
    """The kind of each label under a source's options (see the module docstring).

    ``options`` holds the source's option values (only :data:`KIND_OPTIONS` are read);
    ``source`` names the source in messages. Raises :class:`KindError` for a kind that is not
    ``anatomy``/``finding`` or a label given both kinds.
    """

    def __init__(self, options: dict[str, Any], source: str = "source"):
        self.explicit: dict[str, str] = {}
        self.names: dict[str, str] = {}  # key -> label as written in the options
        where = f"{source}: option"
        for label, kind in _as_map(options.get("label_kinds") or {}, f"{where} label_kinds").items():
            self._set(str(label), _kind(kind, f"{where} label_kinds[{label!r}]"), f"{where} label_kinds")
        for opt, kind in (("finding_labels", "finding"), ("anatomy_labels", "anatomy")):
            for label in _as_list(options.get(opt) or [], f"{where} {opt}"):
                self._set(label, kind, f"{where} {opt}")
        default = options.get("kind")
        self.default = _kind(default, f"{where} kind") if default not in (None, "") else None
        self.seen: set[str] = set()

    def _set(self, label: str, kind: str, where: str) -> None:
        key = label_key(label)
        if self.explicit.get(key, kind) != kind:
            raise KindError(f"{where}: label {label!r} is given both kinds ({self.explicit[key]} and {kind})")
        self.explicit[key] = kind
        self.names[key] = label

    def of(self, label: str, known: str | None = None) -> str | None:
        """The kind of ``label``: the options, else ``known`` (what the source knows), else
        the option ``kind``, else ``None`` (unknown)."""
        key = label_key(label)
        self.seen.add(key)
        return self.explicit.get(key) or known or self.default

    def unused(self) -> list[str]:
        """Labels named in the options that no box of the source had (typos, as written)."""
        return sorted(self.names[k] for k in self.explicit if k not in self.seen)
