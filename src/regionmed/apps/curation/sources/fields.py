"""Cell parsers shared by the sources: label values (with the uncertain-label policy) and boxes.

Label values
    ``1``/``0`` (also ``1.0``, ``true``/``false``, ``yes``/``no``, ``positive``/``negative``,
    ``present``/``absent``; any case), and ``-1`` / ``uncertain`` for an uncertain
    finding (the CheXpert convention). A missing value (empty, ``nan``, ``NA``, JSON
    ``null``) means "not mentioned": the class is left out of the record. Anything
    else raises :class:`FieldError`; the source rejects the row (``invalid_label``).

Uncertain labels
    The source option ``uncertain_labels`` chooses the policy (Irvin et al., CheXpert,
    2019): ``U-Ignore`` (default: the class is left out of that record's labels),
    ``U-Zeros`` (uncertain is negative, 0) or ``U-Ones`` (uncertain is positive, 1).

Boxes
    A JSON list of ``{"label", "box"}`` objects (``bbox`` and ``class`` are accepted
    too), of bare 4-number lists, or one bare 4-number list; numbers in the source's
    ``box_format`` (``xyxy``: ``[x0, y0, x1, y1]``; ``xywh``: ``[x, y, w, h]``, top-left
    corner). An entry that is not four finite numbers becomes an ``invalid_box``
    region reject naming the column; the item itself is kept. An entry whose box is a
    missing value (``null``, ``"#N/A"``, ...: :mod:`regionmed.data.missing`) gives no box.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from regionmed.apps.curation.items import RawBox
from regionmed.apps.curation.tables import is_missing
from regionmed.errors import RegionmedError

POSITIVE = frozenset({"1", "true", "t", "yes", "y", "positive", "pos", "present"})
NEGATIVE = frozenset({"0", "false", "f", "no", "n", "negative", "neg", "absent"})
UNCERTAIN = frozenset({"-1", "uncertain", "u"})
POLICIES = {"u-ignore": "U-Ignore", "ignore": "U-Ignore", "u-zeros": "U-Zeros", "zeros": "U-Zeros",
            "u-ones": "U-Ones", "ones": "U-Ones"}
LABEL_VALUES_HELP = "1/0, -1 (uncertain), true/false, yes/no, positive/negative, present/absent, uncertain"


class FieldError(RegionmedError, ValueError):
    """One cell that cannot be parsed; the source rejects its row with the message."""


def uncertain_policy(value: Any, where: str = "uncertain_labels") -> str:
    """The canonical policy name (``U-Ignore``, ``U-Zeros``, ``U-Ones``) of an option value
    (case-insensitive; ``ignore``/``zeros``/``ones`` accepted). Raises :class:`FieldError`."""
    name = POLICIES.get(str(value).strip().lower().replace("_", "-"))
    if name is None:
        raise FieldError(f"{where} must be one of U-Ignore, U-Zeros, U-Ones; got {value!r}")
    return name


def parse_label_value(value: Any) -> int | None:
    """``1``, ``0`` or ``-1`` (uncertain) from a cell; ``None`` when the cell is missing.

    Raises :class:`FieldError` for anything else (``2``, ``0.5``, ``maybe``)."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        if math.isfinite(value) and value in (1, 0, -1):
            return int(value)
        raise FieldError(f"{value!r} is not a label value ({LABEL_VALUES_HELP})")
    text = str(value).strip().casefold()
    if text in POSITIVE:
        return 1
    if text in NEGATIVE:
        return 0
    if text in UNCERTAIN:
        return -1
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number in (1.0, 0.0, -1.0):
        return int(number)
    raise FieldError(f"{value!r} is not a label value ({LABEL_VALUES_HELP})")


def _numeric(value: Any) -> bool:
    try:
        float(str(value).strip())
    except ValueError:
        return False
    return True


def is_label_value(value: Any) -> bool:
    """True when ``value`` is spelled as a label value (not a class name)."""
    try:
        return parse_label_value(value) is not None
    except FieldError:
        return False


class LabelParser:
    """Turns label cells into ``{class: 0 | 1}`` under one uncertain-label policy, counting
    what it saw in ``stats`` (``positive``, ``negative``, ``uncertain``, ``not_given``)."""

    def __init__(self, policy: str = "U-Ignore"):
        self.policy = uncertain_policy(policy)
        self.stats: Counter = Counter()

    def resolve(self, name: str, value: Any) -> int | None:
        """The stored value of class ``name`` (``None``: left out). Raises :class:`FieldError`."""
        try:
            v = parse_label_value(value)
        except FieldError as err:
            raise FieldError(f"class {name!r}: {err}") from None
        if v is None:
            self.stats["not_given"] += 1
            return None
        if v == -1:
            self.stats["uncertain"] += 1
            return {"U-Ignore": None, "U-Zeros": 0, "U-Ones": 1}[self.policy]
        self.stats["positive" if v else "negative"] += 1
        return v

    def parse_cell(self, value: Any, column: str) -> dict[str, int]:
        """Labels from one cell of ``column``.

        * a list of class names (JSON list, or text separated by ``|``, ``,`` or ``;``): each 1;
        * a mapping ``{class: value}`` (JSON object): each value parsed;
        * a single label value (``1``, ``0``, ``-1``, ``yes``, ...): the column itself is the
          class (one column per class), so ``pneumonia`` = ``0`` gives ``{"pneumonia": 0}``.

        Raises :class:`FieldError` naming the column for a value that is none of these."""
        if is_missing(value):
            return {}
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("{", "[")):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    raise FieldError(f"column {column!r}: {text[:40]!r} is not valid JSON ({err.msg})") from None
        out: dict[str, int] = {}
        try:
            if isinstance(value, dict):
                for name, v in value.items():
                    if is_missing(name):
                        continue
                    r = self.resolve(str(name).strip(), v)
                    if r is not None:
                        out[str(name).strip()] = r
                return out
            if isinstance(value, list):
                names = value
            elif isinstance(value, (bool, int, float)) or is_label_value(value) or _numeric(value):
                r = self.resolve(column, value)
                return {} if r is None else {column: r}
            else:
                text = str(value).strip()
                sep = "|" if "|" in text else ("," if "," in text else ";")
                names = text.split(sep)
        except FieldError as err:
            raise FieldError(f"column {column!r}: {err}") from None
        for name in names:
            if isinstance(name, (dict, list, bool, int, float)) or is_label_value(name) or _numeric(name):
                raise FieldError(f"column {column!r}: a list of class names holds {name!r}, not a class name "
                                 "(for values per class write {\"class\": value}, or one column per class)")
            if not is_missing(name):
                out[str(name).strip()] = 1
                self.stats["positive"] += 1
        return out


def _numbers(box: Any) -> list[float] | None:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        vals = [float(v) for v in box if not isinstance(v, bool)]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == 4 and all(math.isfinite(v) for v in vals) else None


def _is_bare_box(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def parse_boxes(value: Any, box_format: str, column: str, default_label: str = "region") -> list[RawBox]:
    """Boxes of one cell (see the module docstring), as ``[x0, y0, x1, y1]`` RawBoxes.

    ``box_format`` is ``"xyxy"`` or ``"xywh"``. Entries that cannot be read come back as
    RawBoxes with ``reject="invalid_box"`` and a detail naming the column."""
    if is_missing(value):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            return [RawBox("?", [math.nan] * 4, reject="invalid_box",
                           detail=f"column {column!r}: {value[:60]!r} is not valid JSON ({err.msg})")]
    if isinstance(value, dict) or _is_bare_box(value):
        value = [value]
    if not isinstance(value, list):
        return [RawBox("?", [math.nan] * 4, reject="invalid_box", detail=f"column {column!r}: {value!r} is not a list of boxes")]
    out = []
    for entry in value:
        label = default_label
        if isinstance(entry, dict):
            raw_label = entry.get("label", entry.get("class", entry.get("name")))
            label = default_label if is_missing(raw_label) else str(raw_label).strip()
            box = entry.get("box", entry.get("bbox"))
        else:
            box = entry
        if is_missing(box):  # "no box" (null, "", "#N/A", ...), as in every other column: nothing to reject
            continue
        nums = _numbers(box)
        if nums is None:
            out.append(RawBox(label, [math.nan] * 4, reject="invalid_box",
                              detail=f"column {column!r}: box {box!r} is not 4 finite numbers"))
            continue
        b = list(nums)
        if box_format == "xywh":
            b = [b[0], b[1], b[0] + b[2], b[1] + b[3]]
        out.append(RawBox(label, b, given=list(nums), fmt=box_format))
    return out


def box_format_fit(given: list[float], fmt: str) -> tuple[bool, bool]:
    """``(fits fmt, fits the other format)`` for four numbers as written.

    A box does not fit ``xyxy`` when it is inverted (x1 < x0 or y1 < y0), nor ``xywh``
    when a size is negative; it fits the other format when that reading has a positive
    size. A degenerate box (x1 == x0, w == 0) fits neither less: it says nothing about
    the format and is dropped later as a zero-area box."""
    x0, y0, a, b = given
    inverted_xyxy = a < x0 or b < y0
    negative_xywh = a < 0 or b < 0
    pos_xyxy = a > x0 and b > y0
    pos_xywh = a > 0 and b > 0
    if fmt == "xyxy":
        return not inverted_xyxy, pos_xywh
    return not negative_xywh, pos_xyxy
