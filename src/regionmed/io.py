"""Small file helpers shared by the library: reading a JSON file with an error that names
it, and writing JSON / JSON Lines atomically (a temporary file in the same folder, then
``os.replace``, so a reader never sees a half-written file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_json(path: str | Path, error_cls: type[Exception], what: str,
              missing_cls: type[Exception] | None = None) -> Any:
    """Parse the JSON file ``path``.

    ``what`` says what the file is (e.g. ``"the model config"``); it starts the error
    messages. Raises ``missing_cls`` (default ``error_cls``) when ``path`` is not a file,
    ``error_cls`` when it is not UTF-8 JSON; both name the file. The caller checks the
    structure of what is returned."""
    path = Path(path)
    if not path.is_file():
        raise (missing_cls or error_cls)(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error_cls(f"{path}: not valid JSON ({what}): {err}") from err


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
    _write_atomic(Path(path), lambda fh: json.dump(data, fh, indent=2, sort_keys=sort_keys, ensure_ascii=False))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` as JSON Lines (one object a line, UTF-8) to ``path`` through a temporary
    file and a rename."""
    def write(fh) -> None:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    _write_atomic(Path(path), write)
