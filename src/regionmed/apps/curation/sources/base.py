"""The source interface, and the check that reads every row of a source before a build."""

from __future__ import annotations

import dataclasses
import itertools
import os
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regionmed.apps.curation.inputs import Input
from regionmed.apps.curation.items import RawItem
from regionmed.apps.curation.sources.kinds import KIND_OPTIONS, KindError, LabelKinds
from regionmed.apps.curation.tables import check_encoding, recording
from regionmed.errors import RegionmedError

# At least this share (and BOX_FORMAT_STOP_MIN) of a source's boxes that are inverted in the
# configured box_format but valid in the other one stops the build (unless box_format was set
# explicitly); fewer give a warning naming the option.
BOX_FORMAT_STOP_SHARE = 0.1
BOX_FORMAT_STOP_MIN = 2
EXAMPLES = 3  # examples kept per kind of problem
FORMAT_WORDS = {"xyxy": "[x0, y0, x1, y1] (xyxy)", "xywh": "[x, y, w, h] (xywh)"}


class SourceError(RegionmedError, ValueError):
    """A source that cannot be read (missing folder or table, bad option)."""


@dataclass
class SourceReport:
    """What :meth:`Source.check` found by reading every row of a source (no image decoded).

    ``rows`` items read (one pass; ``total`` = rows x repeat, what a build sees);
    ``problems`` item-level reject reasons already known from the text (``malformed_row``,
    ``invalid_label``, ``empty_report``, ``duplicate_id``, ``undecodable_text``; with
    ``files``: ``missing_image``), with a few ``examples`` (row references, never paths);
    ``boxes`` boxes declared (table and COCO), ``box_problems`` region-level reasons
    known at read time; ``orphans`` region rejects that reach no item (written to
    rejects.jsonl by the build); ``labels`` counts of label values (``positive``,
    ``negative``, ``uncertain``, ``not_given``) and the ``uncertain_policy`` applied;
    ``kinds`` counts of the usable boxes by label kind (``anatomy``, ``finding``, ``unknown``);
    ``columns_read`` / ``columns_unused`` of the source's table; ``warnings`` (the build
    goes on), ``notes`` (informational) and ``errors`` (the build stops).
    """

    source: str
    where: str
    rows: int = 0
    total: int = 0
    blank_rows: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    boxes: int = 0
    box_problems: Counter = field(default_factory=Counter)
    box_examples: dict[str, list[str]] = field(default_factory=dict)
    orphans: list[dict] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    uncertain_policy: str | None = None
    columns_read: list[str] = field(default_factory=list)
    columns_unused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    box_format: dict[str, Any] = field(default_factory=dict)  # {"format", "explicit", "column", "checked", "misfit"}
    #: The files the check read or looked for (:meth:`Source.uses`); paths, so never written (not in :meth:`to_json`).
    inputs: list[Input] = field(default_factory=list, repr=False)

    def problem(self, reason: str, example: str) -> None:
        self.problems[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < EXAMPLES:
            ex.append(example)

    def box_problem(self, reason: str, example: str) -> None:
        self.box_problems[reason] += 1
        ex = self.box_examples.setdefault(reason, [])
        if len(ex) < EXAMPLES:
            ex.append(example)

    def to_json(self) -> dict:
        """A JSON-ready dict (Counters as plain dicts); :meth:`from_json` reads it back."""
        return {k: dict(v) if isinstance(v, Counter) else v
                for k, v in asdict(dataclasses.replace(self, problems={}, box_problems={}, labels={}, kinds={}, inputs=[])).items()
                if k != "inputs"} | {
            "problems": dict(self.problems), "box_problems": dict(self.box_problems), "labels": dict(self.labels),
            "kinds": dict(self.kinds)}

    @classmethod
    def from_json(cls, data: dict) -> SourceReport:
        rep = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        rep.problems, rep.box_problems, rep.labels = Counter(rep.problems), Counter(rep.box_problems), Counter(rep.labels)
        rep.kinds = Counter(rep.kinds)
        return rep

    def _check_box_format(self) -> None:
        bf = self.box_format
        checked, misfit = bf.get("checked", 0), bf.get("misfit", 0)
        if not misfit:
            return
        fmt = bf["format"]
        other = "xywh" if fmt == "xyxy" else "xyxy"
        msg = (f"{self.source}: {misfit} of {checked} boxes in column {bf.get('column')!r} are invalid as "
               f"{FORMAT_WORDS[fmt]} but valid as {FORMAT_WORDS[other]}")
        if misfit >= max(BOX_FORMAT_STOP_MIN, BOX_FORMAT_STOP_SHARE * checked) and not bf.get("explicit"):
            self.errors.append(f"{msg}: set the source option box_format: {other} "
                               f"(or box_format: {fmt} explicitly to keep {fmt} and drop those boxes as invalid_box)")
        elif bf.get("explicit"):  # the option is set: say so, do not suggest setting it
            self.warnings.append(f"{msg}; they are dropped as invalid_box (box_format: {fmt} is set explicitly)")
        else:
            self.warnings.append(f"{msg}; they are dropped as invalid_box. If the column holds {other} boxes, "
                                 f"set the source option box_format: {other}")

    def format(self) -> str:
        """A readable multi-line account (the ``check-source`` output)."""
        lines = [f"source {self.source} ({self.where}): {self.rows} rows read"
                 + (f", {self.blank_rows} blank rows skipped" if self.blank_rows else "")]
        if self.columns_read:
            lines.append(f"  columns read: {', '.join(self.columns_read)}")
        if self.columns_unused:
            lines.append(f"  columns NOT used: {', '.join(self.columns_unused)}")
        if self.problems:
            lines.append("  rows the build would reject:")
            for reason, n in sorted(self.problems.items()):
                lines.append(f"    {reason:<17} {n:>6}   e.g. {'; '.join(self.examples.get(reason, []))}")
        else:
            lines.append("  rows the build would reject: none found before decoding images")
        lines.append(f"  boxes declared: {self.boxes}" + (f" ({len(self.orphans)} reach no image)" if self.orphans else ""))
        for reason, n in sorted(self.box_problems.items()):
            lines.append(f"    {reason:<17} {n:>6}   e.g. {'; '.join(self.box_examples.get(reason, []))}")
        if self.kinds:
            lines.append("  box label kinds: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kinds.items())))
        if self.labels:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
            lines.append(f"  label values: {parts}" + (f" (uncertain policy {self.uncertain_policy})" if self.uncertain_policy else ""))
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        lines += [f"  ERROR (the build would stop): {e}" for e in self.errors]
        return "\n".join(lines)


class Source(ABC):
    """Iterates raw items of one dataset, in a deterministic order.

    ``limit`` keeps the first N items; ``repeat`` yields the whole list N times
    with ids suffixed ``~rK`` (for benchmarks). Every source takes the option
    ``encoding`` (default ``utf-8``; a byte-order mark is always honoured): the text
    encoding of its tables, JSON and text files, decoded strictly
    (:mod:`regionmed.apps.curation.tables`); and the label-kind options
    ``label_kinds``, ``finding_labels``, ``anatomy_labels``, ``kind``
    (:mod:`.kinds`): each item's ``kinds`` is filled from its boxes under them.

    ``reads`` documents the files and columns a source reads (``regionmed build --help``).

    **Inputs.** The build records every file a source read (``<out>/build-inputs.jsonl``,
    :mod:`regionmed.apps.curation.inputs`) and re-runs of a complete build compare them, so
    that a changed table, box file or image is never kept stale. A source declares nothing
    for the files it reads through :mod:`regionmed.apps.curation.tables` (``Table``,
    ``read_text``, ``read_json``) while it yields items, nor for each item's
    ``image_path``: both are recorded by this class. A file read any other way (an XML
    parser, ``open``), and an optional file the source looks for (present or not: one that
    appears later changes the build too), is declared with :meth:`uses`.
    """

    name = "source"
    options: tuple[str, ...] = ()
    reads = ""

    def __init__(self, root: str | Path, limit: int | None = None, repeat: int = 1, **options):
        self.root = Path(root)
        if not self.root.exists():
            raise SourceError(f"{self.name}: input folder {self.root} does not exist")
        common = {"encoding", *KIND_OPTIONS}
        unknown = sorted(set(options) - set(self.options) - common)
        if unknown:
            raise SourceError(f"{self.name}: unknown option(s) {unknown}; known: {sorted(set(self.options) | common)}")
        self.limit = limit
        self.repeat = max(1, int(repeat))
        self.opts = options
        self.encoding = str(options.get("encoding", "utf-8"))
        try:
            check_encoding(self.encoding, f"{self.name}: option encoding")
        except RegionmedError as err:
            raise SourceError(str(err)) from None
        try:
            self.kinds = LabelKinds(options, self.name)
        except KindError as err:
            raise SourceError(str(err)) from None
        self._rep = SourceReport(self.name, str(self.root))
        self._inputs: dict[str, Input] = {}

    def uses(self, path: str | Path) -> Path:
        """Declare ``path`` an input of this source, read or looked for (present or not), and
        return it as a Path: ``if self.uses(folder / "boxes.xml").is_file(): ...``. Files read
        through :mod:`regionmed.apps.curation.tables` and items' image files need no call."""
        path = Path(path)
        self._note(path, "file")
        return path

    def inputs(self) -> list[Input]:
        """The files declared while the items were last read (:meth:`check` or iteration)."""
        return list(self._inputs.values())

    def _note(self, path: Path | str, kind: str, ref: str = "") -> None:
        key = os.path.abspath(str(path))
        if key in self._inputs:
            return
        if not ref:
            try:
                ref = str(Path(key).relative_to(os.path.abspath(self.root)))
            except ValueError:
                ref = Path(key).name
        self._inputs[key] = Input(key, kind, ref, self.name)

    def _recorded(self, items: Iterator[RawItem]) -> Iterator[RawItem]:
        """``items``, with the files read while making each one (through the tables module) and
        each item's image file declared as inputs."""
        items = iter(items)
        while True:
            with recording(lambda path: self._note(path, "file")):
                try:
                    item = next(items)
                except StopIteration:
                    return
            if item.image_path and item.image_bytes is None:
                self._note(item.image_path, "image", item.ref or item.id)
            yield item

    @abstractmethod
    def _items(self) -> Iterator[RawItem]:
        """All items, in order. Read-time findings go to ``self._rep`` (a :class:`SourceReport`)."""

    def _count(self) -> int | None:
        return None

    def _after_check(self, rep: SourceReport) -> None:
        """Add what is known once the rows are read (columns used and unused)."""

    def _limited(self) -> Iterator[RawItem]:
        """:meth:`_items` up to ``limit``, each with its label ``kinds`` resolved."""
        items = self._items() if self.limit is None else itertools.islice(self._items(), self.limit)
        for item in items:
            kinds = {}
            for b in item.boxes:
                kind = None if b.reject else self.kinds.of(b.label, b.kind)
                if kind:
                    kinds[b.label] = kind
            item.kinds = kinds
            yield item

    def __iter__(self) -> Iterator[RawItem]:
        for k in range(self.repeat):
            self._rep = SourceReport(self.name, str(self.root))
            for item in self._recorded(self._limited()):
                if k:
                    item.id = f"{item.id}~r{k}"
                yield item

    def count(self) -> int | None:
        n = self._count()
        if n is None:
            return None
        if self.limit is not None:
            n = min(n, self.limit)
        return n * self.repeat

    def check(self, files: bool = False) -> SourceReport:
        """Read every row (as a build would, but without decoding any image) and report.

        ``files`` also checks that each image file exists. Never raises for a problem
        in the data: what would stop a build is in ``errors``; what would reject items
        or regions is counted. See :class:`SourceReport`.
        """
        from regionmed.apps.curation.captions import report_text
        from regionmed.apps.curation.sources.fields import box_format_fit

        rep = self._rep = SourceReport(self.name, str(self.root))
        self._inputs = {}
        seen: set[str] = set()
        try:
            for item in self._recorded(self._limited()):
                rep.rows += 1
                ref = item.ref or item.id
                if item.id in seen:
                    rep.problem("duplicate_id", ref)
                    continue
                seen.add(item.id)
                for b in item.boxes:
                    rep.boxes += 1
                    if b.reject:
                        rep.box_problem(b.reject, f"{ref}: {b.detail}" if b.detail else ref)
                        continue
                    rep.kinds[item.kinds.get(b.label, "unknown")] += 1
                    if b.fmt and b.given:
                        bf = rep.box_format
                        bf["checked"] = bf.get("checked", 0) + 1
                        ok, other = box_format_fit(b.given, b.fmt)
                        if not ok and other:
                            bf["misfit"] = bf.get("misfit", 0) + 1
                if item.reject:
                    rep.problem(item.reject[0], f"{ref}: {item.reject[1]}")
                elif not report_text(item.report, item.facts, item.summary):
                    rep.problem("empty_report", ref)
                elif files and item.image_bytes is None and not (item.image_path and os.path.isfile(item.image_path)):
                    rep.problem("missing_image", ref)
        except RegionmedError as err:
            rep.errors.append(str(err))
        except OSError as err:
            rep.errors.append(f"{self.name}: cannot read {getattr(err, 'filename', None) or self.root}: {err.strerror or err}")
        except Exception as err:  # noqa: BLE001 - a malformed file of a fixed layout: report it, no traceback
            rep.errors.append(f"{self.name}: the input under {self.root} does not have the expected layout "
                              f"({type(err).__name__}: {err})")
        rep.boxes += len(rep.orphans)
        for o in rep.orphans:
            rep.box_problem(o["reason"], o["detail"])
        with recording(lambda path: self._note(path, "file")):
            self._after_check(rep)
        unused = self.kinds.unused() if self.limit is None and not rep.errors else []
        if unused:
            rep.warnings.append(f"{self.name}: the label-kind options name labels that no box has: "
                                f"{', '.join(repr(u) for u in unused[:10])}{' ...' if len(unused) > 10 else ''} "
                                "(labels are matched case-insensitively)")
        rep._check_box_format()
        rep.total = rep.rows * self.repeat
        rep.inputs = self.inputs()
        self._rep = SourceReport(self.name, str(self.root))
        return rep
