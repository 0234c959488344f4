r"""Small file helpers shared by the library: reading a JSON file with an error that names
it, and writing JSON / JSON Lines atomically (a temporary file in the same folder, then
``os.replace``, so a reader never sees a half-written file).

File names that are not valid UTF-8 (as from an old zip or another system's encoding) reach
Python as ``os.fsdecode`` strings holding lone surrogates (PEP 383: the byte 0xNN becomes
U+DCNN). Every output keeps them, in one of two documented forms:

* JSON and JSON Lines (:func:`json_dumps`): as the JSON escape ``\udcNN``, so that
  ``json.loads`` gives the same string back and ``os.fsencode`` the file's own bytes;
* CSV, Parquet and printed text (:func:`printable`): each undecodable byte as the four
  characters ``\xNN`` (Python's ``backslashreplace``), valid UTF-8 everywhere.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def decode_utf8(raw: bytes, path: str | Path, what: str, error_cls: type[Exception]) -> str:
    """``raw`` (the bytes of ``path``) as UTF-8 text; a byte-order mark is accepted and removed
    (editors such as Notepad write one). UTF-16/32 text (by its byte-order mark) and bytes that
    are not UTF-8 (a file saved as Windows-1252, say) raise ``error_cls`` with one line naming
    the file, the byte offset, the line and the byte: never a guess, never a
    ``UnicodeDecodeError`` traceback."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error_cls(f"{path}: {what} is UTF-16 or UTF-32 text (byte-order mark {raw[:2].hex(' ')}); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error_cls(f"{path}: {what} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                        f"(line {line}); save it as UTF-8") from None


def read_text(path: str | Path, error_cls: type[Exception], what: str,
              missing_cls: type[Exception] | None = None) -> str:
    """The UTF-8 text of ``path`` (:func:`decode_utf8`). Raises ``missing_cls`` (default
    ``error_cls``) when ``path`` is not a file, ``error_cls`` when it cannot be read or is
    not UTF-8; both name the file."""
    path = Path(path)
    if not path.is_file():
        raise (missing_cls or error_cls)(f"{what} {path} is missing")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error_cls(f"{path}: {what} cannot be read ({err.strerror or err})") from err
    return decode_utf8(raw, path, what, error_cls)


def parse_json(text: str, where: str | Path, what: str, error_cls: type[Exception]) -> Any:
    """The JSON value of ``text``; a syntax error is one line naming ``where``, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error_cls(f"{where}: not valid JSON ({what}): {err.msg} at line {err.lineno}, column {err.colno}") from None


def read_json(path: str | Path, error_cls: type[Exception], what: str,
              missing_cls: type[Exception] | None = None) -> Any:
    """Parse the JSON file ``path``.

    ``what`` says what the file is (e.g. ``"the model config"``); it starts the error
    messages. Raises ``missing_cls`` (default ``error_cls``) when ``path`` is not a file,
    ``error_cls`` when it is not UTF-8 (:func:`decode_utf8`; a byte-order mark is fine) or
    not JSON; each is one line naming the file (and the byte, or line and column). The
    caller checks the structure of what is returned."""
    return parse_json(read_text(path, error_cls, what, missing_cls), path, what, error_cls)


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_dumps(data: Any, **kwargs: Any) -> str:
    r"""``json.dumps(data, ensure_ascii=False, **kwargs)``, with every lone surrogate (an
    undecodable byte of a file name, see the module docstring) written as its ``\uXXXX``
    escape, so that the text encodes as UTF-8 and ``json.loads`` returns the same strings."""
    text = json.dumps(data, ensure_ascii=False, **kwargs)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def printable(text: str) -> str:
    r"""``text`` as valid Unicode for CSV / Parquet / printed output: the undecodable bytes of
    an ``os.fsdecode`` name (lone surrogates U+DC80..U+DCFF) become ``\xNN``, any other lone
    surrogate ``\uXXXX``; ``text`` itself when it has none."""
    if not _SURROGATE.search(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync and a rename:
    a reader (or a build resumed after a kill) sees the whole file or none."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write ``data`` as indented UTF-8 JSON to ``path`` through a temporary file and a rename
    (``sort_keys``: key order sorted, the default, or as given)."""
    _write_atomic(Path(path), lambda fh: fh.write(json_dumps(data, indent=2, sort_keys=sort_keys)))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSON Lines (one object a line, UTF-8) to ``path`` through a temporary
    file and a rename."""
    def write(fh) -> None:
        for row in rows:
            fh.write(json_dumps(row) + "\n")
    _write_atomic(Path(path), write)
