"""Tables and text files entering dataset curation: the one place where they are read.

Every table a source reads (CSV, TSV, JSONL), every JSON file (COCO boxes, split
lists, box files) and every per-item text file goes through this module, so that
each of the faults below is handled once, the same way, for every source:

* **Encodings.** Text is decoded *strictly* in the source's ``encoding`` option
  (default UTF-8). A byte-order mark is accepted and removed (UTF-8, as written by
  spreadsheets' "CSV UTF-8"; UTF-16/32, as written by "Unicode text"). Bytes that
  are not valid in the encoding stop with a :class:`TableError` naming the file,
  the byte offset, the line and the bytes, with a hint — never replacement
  characters. Nothing is guessed: a legacy single-byte file (Windows "ANSI" =
  ``cp1252``, ``latin-1``, ...) is read by setting the source option
  ``encoding: cp1252``.
* **Line endings.** LF, CRLF and CR alone are all accepted.
* **Headers.** Names are stripped of surrounding white space; a name given twice
  stops (a dict of cells would silently keep one of them). :func:`require_columns`
  names a required column that is missing and shows the header that was found.
* **Row length.** A CSV row with more fields than the header (an unquoted comma
  inside a cell) or fewer (an unquoted line break) is never cut or padded: it comes
  back with :attr:`Row.problem` set and the source rejects it (``malformed_row``),
  naming the row and line — even when the extra fields are empty, since a cell
  split at a comma shifts the next cells into the wrong columns. (A header that ends
  with a delimiter has an unnamed last column, so rows ending with one fit it.) A
  quote that is never closed stops (strict CSV).
* **Missing values.** Empty cells, JSON ``null``/``NaN`` and every spelling of a
  missing value that exports and spreadsheets write (:mod:`regionmed.data.missing`:
  pandas' ``na_values``, spreadsheet error values such as ``#VALUE!``, ``-``/``.``/``?``;
  any case) read as missing (``None``) through :meth:`Row.value` / :meth:`Row.text` and
  :func:`is_missing`, in every column.
* **Inputs read.** Every file read here is reported to the recorder set with
  :func:`recording` (the build's input ledger, :mod:`regionmed.apps.curation.inputs`),
  so that a source that reads through this module declares its files for free.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import difflib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regionmed.data.missing import MISSING_SPELLINGS, is_missing  # noqa: F401 - the one definition, re-exported
from regionmed.errors import RegionmedError

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".tab": "csv", ".txt": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


_RECORDER: contextvars.ContextVar[Callable[[Path], None] | None] = contextvars.ContextVar("regionmed_input_recorder",
                                                                                         default=None)


@contextlib.contextmanager
def recording(note: Callable[[Path], None]):
    """Within this block, call ``note(path)`` for every file this module reads (tables,
    JSON, text): how a :class:`~regionmed.apps.curation.sources.Source` learns its inputs."""
    token = _RECORDER.set(note)
    try:
        yield
    finally:
        _RECORDER.reset(token)


def note_read(path: str | Path) -> None:
    """Tell the :func:`recording` block (when there is one) that ``path`` is read: for a source
    that reads a file without this module's readers (e.g. XML)."""
    _read(Path(path))


def _read(path: Path) -> None:
    note = _RECORDER.get()
    if note is not None:
        note(Path(path))


class TableError(RegionmedError, ValueError):
    """A table or text file that cannot be read as a whole (encoding, broken CSV
    quoting, a duplicate or missing column). The message names the file and where."""


def check_encoding(encoding: str, where: str = "encoding") -> str:
    """The codec name of ``encoding``; a :class:`TableError` for an unknown one."""
    try:
        return codecs.lookup(str(encoding)).name
    except LookupError:
        raise TableError(f"{where}: unknown text encoding {encoding!r} (e.g. utf-8, cp1252, latin-1, utf-16)") from None


def detect_encoding(path: Path, encoding: str = "utf-8") -> str:
    """The codec to decode ``path`` with: the one its byte-order mark names, else ``encoding``
    (for UTF-8, ``utf-8-sig`` so that a BOM is removed wherever it is)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    name = check_encoding(encoding)
    return "utf-8-sig" if name == "utf-8" else name


def _decode_error_message(path: Path, encoding: str) -> str:
    """Locate the first byte that ``encoding`` cannot decode in ``path`` (streamed)."""
    dec = codecs.getincrementaldecoder(encoding)("strict")
    offset = newlines = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = dec.getstate()[0]
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                buf = pending + chunk
                pos = offset - len(pending) + err.start
                line = 1 + newlines - pending.count(b"\n") + buf[: err.start].count(b"\n")
                bad = buf[err.start : max(err.end, err.start + 1)][:4]
                hint = ""
                if encoding.replace("_", "-").startswith("utf-8"):
                    guess = bad.decode("cp1252", errors="replace")
                    hint = (f" ({' '.join(f'0x{b:02x}' for b in bad)} would be {guess!r} in cp1252: a legacy single-byte "
                            "file? Save it as UTF-8, or set the source option encoding, e.g. encoding: cp1252)")
                shown = "utf-8" if encoding == "utf-8-sig" else encoding
                return (f"{path}: not valid {shown} text at byte {pos} (line {line}): "
                        f"{' '.join(f'0x{b:02x}' for b in bad)}{hint}. Nothing is read with replacement characters.")
            if not chunk:
                break
            offset += len(chunk)
            newlines += chunk.count(b"\n")
    return f"{path}: not valid {encoding} text"  # pragma: no cover - the error was seen while reading


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """The whole text of ``path``, decoded strictly (BOM removed, line endings kept).

    Raises :class:`TableError` naming the file and the first undecodable byte."""
    path = Path(path)
    _read(path)
    enc = detect_encoding(path, encoding)
    data = path.read_bytes()
    try:
        return data.decode(enc)
    except UnicodeDecodeError:
        raise TableError(_decode_error_message(path, enc)) from None


def read_json(path: str | Path, encoding: str = "utf-8") -> Any:
    """The JSON value in ``path`` (decoded as :func:`read_text` does).

    Raises :class:`TableError` naming the file, line and column of a syntax error."""
    path = Path(path)
    text = read_text(path, encoding)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TableError(f"{path}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None


@dataclass
class Row:
    """One data row of a table.

    ``n`` is the 1-based data-row number (header and blank lines not counted), ``line``
    the 1-based physical line where it starts. ``cells`` maps column name to the value
    as read (a string for CSV; any JSON value for JSONL). ``problem`` says why the row
    cannot be trusted (wrong number of fields, not a JSON object); such a row must be
    rejected, not used.
    """

    n: int
    line: int
    cells: dict[str, Any]
    problem: str | None = None

    def value(self, column: str | None) -> Any:
        """The cell of ``column``, or ``None`` when absent or spelled as missing."""
        if not column:
            return None
        v = self.cells.get(column)
        return None if is_missing(v) else v

    def text(self, column: str | None) -> str:
        """The cell of ``column`` as a stripped string; ``""`` when absent or missing."""
        v = self.value(column)
        if v is None:
            return ""
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v).strip()


@dataclass
class Table:
    """A CSV/TSV or JSONL table, read lazily row by row (see the module docstring).

    ``delimiter`` defaults to tab for ``.tsv``, ``.tab`` and ``.txt`` (spreadsheets' "text" export) and comma otherwise.
    After :meth:`rows` (or :meth:`header`), ``columns`` holds the header (CSV) or the
    keys seen so far in first-seen order (JSONL); ``blank_rows`` counts skipped blank lines.
    """

    path: Path
    encoding: str = "utf-8"
    delimiter: str | None = None
    columns: list[str] = field(default_factory=list)
    blank_rows: int = 0

    def __post_init__(self):
        self.path = Path(self.path)
        kind = TABLE_SUFFIXES.get(self.path.suffix.lower())
        if kind is None:
            raise TableError(f"{self.path}: a table must be .csv, .tsv or .jsonl (got {self.path.suffix or 'no suffix'!r})")
        self.kind = kind
        if self.delimiter is None:
            self.delimiter = "\t" if self.path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
        if len(str(self.delimiter)) != 1:
            raise TableError(f"{self.path}: delimiter must be one character, got {self.delimiter!r}")
        check_encoding(self.encoding, f"{self.path}: encoding")

    @property
    def name(self) -> str:
        return self.path.name

    def _open(self):
        _read(self.path)
        enc = detect_encoding(self.path, self.encoding)
        return enc, open(self.path, encoding=enc, errors="strict", newline="")

    def header(self) -> list[str]:
        """The column names (CSV: the first row; JSONL: keys of every row, which reads it all)."""
        if self.kind == "jsonl":
            for _ in self.rows():
                pass
            return list(self.columns)
        enc, fh = self._open()
        with fh:
            try:
                first = next(csv.reader(fh, delimiter=self.delimiter, strict=True), [])
            except UnicodeDecodeError:
                raise TableError(_decode_error_message(self.path, enc)) from None
            except csv.Error as err:
                raise TableError(f"{self.path}: header is not valid CSV ({err})") from None
        self.columns = self._check_header(first)
        return list(self.columns)

    def _check_header(self, names: list[str]) -> list[str]:
        names = [n.strip() for n in names]
        seen: set[str] = set()
        for n in names:
            if n and n in seen:
                raise TableError(f"{self.path}: column {n!r} appears twice in the header {names!r}; rename one")
            seen.add(n)
        return names

    def rows(self) -> Iterator[Row]:
        """Every non-blank data row, in file order (streamed)."""
        enc, fh = self._open()
        with fh:
            try:
                yield from (self._csv_rows(fh) if self.kind == "csv" else self._jsonl_rows(fh))
            except UnicodeDecodeError:
                raise TableError(_decode_error_message(self.path, enc)) from None

    def _csv_rows(self, fh) -> Iterator[Row]:
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))  # long reports: 64 MiB per cell
        reader = csv.reader(fh, delimiter=self.delimiter, strict=True)
        try:
            first = next(reader, None)
            if first is None:
                self.columns = []
                return
            self.columns = header = self._check_header(first)
            n = 0
            line = reader.line_num + 1
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not any(f.strip() for f in fields):
                    self.blank_rows += 1
                    continue
                n += 1
                problem = None
                width = len(header)
                if len(fields) > width:
                    problem = (f"row {n} (line {start}) has {len(fields)} fields, the header has {width}: "
                               f"a {'tab' if self.delimiter == chr(9) else repr(self.delimiter)} inside an unquoted "
                               "cell? Quote cells that contain the delimiter")
                elif len(fields) < width:
                    problem = (f"row {n} (line {start}) has {len(fields)} fields, the header has {width}: "
                               "a line break inside an unquoted cell, or missing delimiters?")
                cells = {name: fields[i] if i < len(fields) else None for i, name in enumerate(header) if name}
                yield Row(n, start, cells, problem)
        except csv.Error as err:
            raise TableError(f"{self.path}: line {reader.line_num}: not valid CSV ({err}); "
                             "an opening quote that is never closed?") from None

    def _jsonl_rows(self, fh) -> Iterator[Row]:
        seen = dict.fromkeys(self.columns)
        n = 0
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                self.blank_rows += 1
                continue
            n += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield Row(n, lineno, {}, f"row {n} (line {lineno}) is not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(obj, dict):
                yield Row(n, lineno, {}, f"row {n} (line {lineno}) is a JSON {type(obj).__name__}, not an object")
                continue
            for k in obj:
                if k not in seen:
                    seen[k] = None
                    self.columns.append(k)
            yield Row(n, lineno, {str(k).strip(): v for k, v in obj.items()})


def require_columns(table: Table, wanted: dict[str, str], where: str) -> None:
    """Stop unless every column of ``wanted`` ({column: the option naming it}) is in the header.

    The message names each missing column and its option, shows the header that was
    found (``repr``, so stray bytes are visible) and suggests close names."""
    header = table.columns
    missing = [(col, opt) for col, opt in wanted.items() if col not in header]
    if not missing:
        return
    parts = []
    for col, opt in missing:
        close = difflib.get_close_matches(col, [h for h in header if h], n=1, cutoff=0.6)
        parts.append(f"no column {col!r} ({opt})" + (f": did you mean {close[0]!r}? set {opt}: {close[0]}" if close else ""))
    hint = ""
    joined = "".join(header)
    if "\x00" in joined and not check_encoding(table.encoding).startswith("utf-16"):
        hint = " The header holds NUL characters: a UTF-16 file without byte-order mark? Set encoding: utf-16-le."
    elif len(header) == 1 and header and any(d in header[0] for d in ";,\t|" if d != table.delimiter):
        d = next(d for d in ";,\t|" if d != table.delimiter and d in header[0])
        hint = f" The header is one column holding {d!r}: set the source option delimiter: {d!r}."
    raise TableError(f"{where}: {'; '.join(parts)}. The header found is {header!r}.{hint}")


def require_keys(records, keys: dict[str, str], path: Path | str) -> list[dict]:
    """``records`` (a JSON file's value) as a list of objects that each hold every key of
    ``keys`` ({key: what it gives}); a :class:`TableError` names the file, the record, the
    missing keys and the keys that record has, for a file of a fixed layout (the public
    sets' question files)."""
    if not isinstance(records, list):
        raise TableError(f"{path}: expected a JSON list of objects, found a JSON {type(records).__name__}")
    for k, record in enumerate(records):
        if not isinstance(record, dict):
            raise TableError(f"{path}: record {k} is a JSON {type(record).__name__}, not an object")
        missing = [key for key in keys if key not in record]
        if missing:
            wanted = ", ".join(f"{key!r} ({keys[key]})" for key in missing)
            raise TableError(f"{path}: record {k} has no {wanted}; its keys are {sorted(record)[:20]!r}")
    return records
