"""The build's input ledger: every file each source read, so that a rebuild notices changed inputs.

A source declares its inputs (:meth:`~regionmed.apps.curation.sources.Source.uses`; files
read through :mod:`regionmed.apps.curation.tables` and every item's image file are
declared without a call). A complete build writes them to ``<out>/build-inputs.jsonl``,
one line per file: ``source``, ``key`` (a salted hash of the absolute path: file names
may hold patient identifiers, so no path is stored), ``kind``, ``ref`` (how messages name
it: a table's path under its source folder, or an image's row reference), ``size``,
``mtime_ns`` and ``sha256`` (null for a file that was absent).

Before re-running a complete build with the same config, :func:`changes` compares the
inputs the sources read now with the ledger:

* ``file`` inputs (tables, JSON, text; small next to the images) are compared by content
  (SHA-256) every time;
* ``image`` inputs by size and ``mtime_ns`` first (one ``stat``); only when those differ is
  the content hashed, so that a copy that kept the bytes (a ``touch``) is not a change. A
  replacement that keeps both size and modification time (``cp -p`` of a same-size file)
  is not seen: ``--force`` rebuilds whatever the ledger says.

Measured on ``../shared/data`` (3,962 files, 205 MB): one ``stat`` of every file 80 ms,
reading and hashing every file 0.9-1.9 s (this shared 2-core machine, warm and cold
cache), against minutes for the build: image contents are hashed once, by the workers
that read them anyway (:func:`read_input`), and again only when their ``stat`` changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from regionmed.apps.curation.items import hashed
from regionmed.io import write_jsonl_atomic

LEDGER_NAME = "build-inputs.jsonl"
KEY_SALT = "regionmed-build-input-v1"
KINDS = ("file", "image")
SHOWN = 8  # changed inputs named in a message (all are counted)


@dataclass(frozen=True)
class Input:
    """One input a source read (or looked for) this run: its path (never written to the
    output), ``kind`` (:data:`KINDS`), ``ref`` (how messages name it) and source name."""

    path: str
    kind: str
    ref: str
    source: str

    @property
    def key(self) -> str:
        return input_key(self.path)


def input_key(path: str | Path) -> str:
    """The ledger's key of a file: a salted SHA-256 of its absolute path (no file name is stored)."""
    return hashed(os.path.abspath(str(path)), KEY_SALT, 32)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns) if os.path.isfile(path) else None


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes, or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def read_input(path: str) -> tuple[bytes | None, dict]:
    """Read an image input once: ``(bytes or None, its ledger fields)`` (``key``, ``size``,
    ``mtime_ns`` taken before the read, ``sha256`` of the bytes read). Used by the build's
    workers, which decode those same bytes, so that the ledger describes what was built."""
    st = _stat(path)
    entry = {"key": input_key(path), "size": None, "mtime_ns": None, "sha256": None}
    if st is None:
        return None, entry
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:
        return None, entry
    entry.update(size=st[0], mtime_ns=st[1], sha256=hashlib.sha256(raw).hexdigest())
    return raw, entry


def entry_now(inp: Input, hash_content: bool) -> dict:
    """The ledger line of ``inp`` as it is now (``hash_content``: also its SHA-256)."""
    st = _stat(inp.path)
    return {"source": inp.source, "key": inp.key, "kind": inp.kind, "ref": inp.ref,
            "size": st[0] if st else None, "mtime_ns": st[1] if st else None,
            "sha256": file_sha256(inp.path) if st and hash_content else None}


def ledger(inputs: list[Input], images: dict[str, dict] | None = None) -> list[dict]:
    """The ledger lines of ``inputs``: ``file`` inputs stat-ed and hashed now; ``image``
    inputs from ``images`` (``{key: fields}`` recorded by the workers, :func:`read_input`)
    when there, else stat-ed now (an image no worker read, e.g. a duplicate id: without a
    hash, a later change of its time counts as a change)."""
    out: dict[str, dict] = {}
    for inp in inputs:
        if inp.key in out:
            continue
        line = entry_now(inp, hash_content=inp.kind == "file")
        if inp.kind == "image" and images and inp.key in images:
            line.update({k: images[inp.key][k] for k in ("size", "mtime_ns", "sha256")})
        out[inp.key] = line
    return list(out.values())


def write_ledger(out_dir: str | Path, lines: list[dict]) -> str:
    """Write ``<out_dir>/build-inputs.jsonl`` (atomically); return its SHA-256."""
    path = Path(out_dir) / LEDGER_NAME
    write_jsonl_atomic(path, lines)
    return file_sha256(path) or ""


def read_ledger(out_dir: str | Path) -> list[dict] | None:
    """The ledger of a complete build, or None when it has none (built before it existed,
    or the file was removed) or it cannot be read."""
    path = Path(out_dir) / LEDGER_NAME
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _what(inp: Input) -> str:
    return f"{inp.source}: " + (f"image of {inp.ref}" if inp.kind == "image" else inp.ref)


def changes(recorded: list[dict], inputs: list[Input]) -> list[str]:
    """How the inputs read now differ from the ledger of the build, one line each
    (``"generic: reports.csv: other content"``): changed, appeared, gone missing, added
    (read now, not then) and no longer read. Empty when nothing changed."""
    before = {line.get("key"): line for line in recorded if isinstance(line, dict)}
    found: list[str] = []
    seen: set[str] = set()
    for inp in inputs:
        key = inp.key
        if key in seen:
            continue
        seen.add(key)
        old = before.get(key)
        if old is None:
            found.append(f"{_what(inp)}: added (not read by the build)")
            continue
        st = _stat(inp.path)
        if st is None:
            if old.get("size") is not None:
                found.append(f"{_what(inp)}: missing now")
            continue
        if old.get("size") is None:
            found.append(f"{_what(inp)}: present now, absent when built")
        elif inp.kind == "file" or st != (old.get("size"), old.get("mtime_ns")):
            if st[0] != old.get("size"):
                found.append(f"{_what(inp)}: other content ({old.get('size')} -> {st[0]} bytes)")
            elif old.get("sha256") is None or file_sha256(inp.path) != old["sha256"]:
                found.append(f"{_what(inp)}: other content (same size)")
    for key, old in before.items():
        if key not in seen:
            what = f"{old.get('source')}: " + (f"image of {old.get('ref')}" if old.get("kind") == "image" else str(old.get("ref")))
            found.append(f"{what}: no longer read")
    return found


def describe(found: list[str]) -> str:
    """The first :data:`SHOWN` changes, joined, with the count of the others."""
    more = f"; and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    return "; ".join(found[:SHOWN]) + more
