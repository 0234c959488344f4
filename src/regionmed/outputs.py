"""Writing a user's folders and files: atomic as a whole, one writer at a time, never into an input.

Every writer of a user's index, model or output folder (``EmbeddingIndex.save``,
``RegionMedCLIP.save_pretrained``, the ``embed`` / ``ground`` / ``index`` /
``export-open-clip`` / ``import-open-clip`` outputs) goes through :func:`replace_folder`,
and every single-file output (``classify``'s CSV, ``search --json``) through
:func:`replace_file`:

* **Atomic as a whole.** The new contents are written into a temporary sibling
  (``.NAME.new``); only when it is complete does it take ``NAME``'s place: a new folder by
  one ``rename``, an existing one by one atomic exchange of the two folders (Linux
  ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``), after which the old
  contents are removed. A process killed at any point leaves either the old complete
  folder or the new complete one under ``NAME`` (what it left in ``.NAME.new`` /
  ``.NAME.old`` is removed by the next write). Where the file system cannot exchange,
  two renames are used, and a write killed between them is undone by the next write or
  read (the old folder is put back). Files are fsynced before they are published.
* **One writer at a time.** A writer holds an exclusive ``flock`` on ``.NAME.lock`` (beside
  ``NAME``) from before it reads what it will replace until the new folder is in place;
  a second writer waits (and logs once that it waits, naming the holder's process id).
  The kernel releases the lock of a killed process, so a stale lock never blocks; the lock
  file is removed by the writer that held it. Locks are re-entrant within a process
  (``regionmed index --add`` holds the index's lock over load, add and save).
* **Readers never see a half-written folder**: :func:`read_folder` runs a loader again when
  the folder was exchanged while it read (its inode changed).
* **Never into an input.** :func:`check_output` refuses an output that is a file where a
  folder is expected (or the reverse), and one that is, holds or lies inside one of the
  command's inputs (the model folder, an input folder or image, a list or boxes file).

Errors: :class:`OutputError` (a ``RegionmedError`` and ``ValueError``), naming the path and
what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from regionmed.errors import RegionmedError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's exclusive lock instead
    fcntl = None

log = logging.getLogger(__name__)

__all__ = ["OutputError", "check_output", "read_folder", "refuse_inside_inputs", "replace_file", "replace_folder", "writer_lock"]


class OutputError(RegionmedError, ValueError):
    """An output that cannot be written where it was asked: a file where a folder is
    expected (or the reverse), a folder holding files another command did not write, an
    output inside one of the command's inputs."""


# -- paths ---------------------------------------------------------------------------------
def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _sibling(dest: Path, suffix: str) -> Path:
    return dest.parent / f".{dest.name}.{suffix}"


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_inside_inputs(out: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
                         flag: str = "--out") -> Path:
    """``out`` as a :class:`Path`, after checking that it is none of ``inputs`` (``(what, path)``
    pairs; None entries are skipped) and lies inside none of them, symbolic links resolved: a
    command never writes into its own input. For outputs that are added to or resumed (a build,
    a training run, an evaluation folder); :func:`check_output` adds the rules of outputs that
    are replaced as a whole. Raises :class:`OutputError` naming ``flag``, ``out`` and the input."""
    real = _real(out)
    for role, given in inputs:
        if given is None:
            continue
        other = _real(given)
        if _within(real, other):
            where = "is" if real == other else "lies inside"
            raise OutputError(f"{flag} {out} {where} {role} {given}: a command never writes into its own input; "
                              "write somewhere else")
    return Path(out)


def check_output(out: str | os.PathLike, *, kind: str = "folder", inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                 flag: str = "--out", owned: Callable[[Path], bool] | None = None, what: str = "output folder") -> Path:
    """Check the output ``out`` before any work is done; return it as a :class:`Path`.

    ``kind``: ``"folder"`` (``out`` must not be a file) or ``"file"`` (``out`` must not be
    a folder). ``inputs``: ``(what, path)`` pairs of everything the command reads (e.g.
    ``("the model folder", M)``, ``("input", "images/")``); ``out`` must not be one of
    them, lie inside one, or (a folder output, which is replaced as a whole) hold one.
    ``owned`` / ``what``: as for :func:`replace_folder` (an existing non-empty folder that
    ``owned`` does not accept is refused now, not after the work). Paths are compared after
    resolving symbolic links. Raises :class:`OutputError` naming ``flag``, ``out`` and the input."""
    path = Path(out)
    if kind not in ("folder", "file"):
        raise ValueError(f"kind {kind!r} is not 'folder' or 'file'")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {out} is an existing file, not a folder: give a folder (new, or {_a(what)})")
    if kind == "file" and path.is_dir():
        raise OutputError(f"{flag} {out} is an existing folder, not a file: give a file name")
    real = _real(path)
    refuse_inside_inputs(out, inputs, flag)
    for role, given in inputs:
        if given is None:
            continue
        other = _real(given)
        if kind == "folder" and _within(other, real):
            raise OutputError(f"{flag} {out} holds {role} {given}: the output folder is replaced as a whole, which "
                              "would remove it; write somewhere else")
    if kind == "folder" and path.is_dir() and not _is_empty_dir(path) and not (owned is not None and owned(path)):
        raise OutputError(_not_owned(f"{flag} {out}", what))
    return path


def _a(what: str) -> str:
    return f"{'an' if what[:1].lower() in 'aeiou' else 'a'} {what}"


def _not_owned(name: str, what: str) -> str:
    return f"{name} already holds files that are not {_a(what)}: it would be replaced as a whole; give a new or empty folder"


# -- locks ---------------------------------------------------------------------------------
_held: dict[str, list] = {}  # lock path -> [fd or filelock object, depth]
_held_guard = threading.Lock()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def _acquire_flock(lock: Path, target: Path, wait: float | None) -> int:
    start, told = time.monotonic(), False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if wait is not None and time.monotonic() - start >= wait:
                        raise OutputError(f"{target} is being written by another process{_holder(lock)}: try again "
                                          f"when it has finished (or remove {lock} if no such process runs)") from None
                    if not told:
                        log.warning("waiting for another process%s that is writing %s", _holder(lock), target)
                        told = True
                    time.sleep(0.05)
            # The holder before us removed the lock file when it finished: ours may be a stale inode.
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode("ascii"))
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, *, wait: float | None = None) -> Iterator[None]:
    """Hold the one-writer lock of ``path`` (a folder or file, existing or not) for the block.

    The lock is an exclusive ``flock`` on ``.NAME.lock`` beside ``path`` (released by the
    kernel when the process dies; the file is removed on release). Re-entrant within a
    process. ``wait``: the most seconds to wait for another writer (None: as long as it
    takes; a warning is logged once while waiting); past it, :class:`OutputError`."""
    target = _real(path)
    lock = _sibling(target, "lock")
    key = str(lock)
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _held_guard:
                entry[1] -= 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        from filelock import FileLock, Timeout

        handle = FileLock(str(lock), timeout=-1 if wait is None else wait)
        try:
            handle.acquire()
        except Timeout as err:
            raise OutputError(f"{target} is being written by another process: try again when it has finished") from err
    else:
        handle = _acquire_flock(lock, target, wait)
    with _held_guard:
        _held[key] = [handle, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            if fcntl is None:  # pragma: no cover
                handle.release()
            else:
                with contextlib.suppress(OSError):
                    os.unlink(lock)  # while still held: a waiter then sees a stale inode and retries
                os.close(handle)


# -- publishing ----------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the two existing paths ``a`` and ``b``; False where the platform or
    file system cannot (the caller falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
    else:  # pragma: no cover
        return False
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def _recover(dest: Path) -> None:
    """Undo what a killed writer left beside ``dest`` (called with the writer lock held):
    put back ``.NAME.old`` when ``NAME`` is gone (killed between the two renames of the
    fallback), then remove the leftovers."""
    old, new = _sibling(dest, "old"), _sibling(dest, "new")
    if old.exists() and not dest.exists():
        os.rename(old, dest)
    _remove(old)
    _remove(new)


def _publish(tmp: Path, dest: Path) -> None:
    _fsync_tree(tmp)
    if not dest.exists():
        os.rename(tmp, dest)
    elif _exchange(tmp, dest):  # tmp now holds the old contents
        _remove(tmp)
    else:
        old = _sibling(dest, "old")
        os.rename(dest, old)
        os.rename(tmp, dest)
        _remove(old)
    _fsync_dir(dest.parent)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


@contextlib.contextmanager
def replace_folder(dest: str | os.PathLike, *, owned: Callable[[Path], bool] | None = None, what: str = "output folder",
                   flag: str | None = None) -> Iterator[Path]:
    """Write a folder as a whole: yields an empty temporary sibling to write into; when the
    block ends without an exception, it replaces ``dest`` (see the module docstring); when
    it raises, ``dest`` is left as it was and the temporary folder is removed.

    The writer lock of ``dest`` is held for the block (:func:`writer_lock`; take it earlier
    to cover a read of ``dest`` too). ``owned(dest)``: True when an existing, non-empty
    ``dest`` was written by this kind of writer and may be replaced; otherwise (or without
    ``owned``) such a folder is refused with :class:`OutputError`, as is a ``dest`` that is
    a file. ``what`` / ``flag`` word the messages (e.g. ``"embed output folder"``,
    ``"--out"``). A symbolic link ``dest`` is followed: the folder it names is replaced."""
    given = Path(dest)
    dest = _real(dest)
    name = f"{flag} {given}" if flag else str(given)
    with writer_lock(dest):
        if dest.exists() and not dest.is_dir():
            raise OutputError(f"{name} is an existing file, not a folder: give a folder (new, or {_a(what)})")
        if dest.is_dir() and not _is_empty_dir(dest) and not (owned is not None and owned(dest)):
            raise OutputError(_not_owned(name, what))
        _recover(dest)
        tmp = _sibling(dest, "new")
        tmp.mkdir()
        try:
            yield tmp
            _publish(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise


@contextlib.contextmanager
def replace_file(dest: str | os.PathLike, *, flag: str | None = None) -> Iterator[Path]:
    """Write one file atomically: yields a temporary sibling path to write; when the block
    ends without an exception it replaces ``dest`` by one rename (fsynced first), under
    the writer lock of ``dest``; when it raises, ``dest`` is left as it was. Raises
    :class:`OutputError` when ``dest`` is a folder."""
    given = Path(dest)
    dest = _real(dest)
    if dest.is_dir():
        raise OutputError(f"{f'{flag} ' if flag else ''}{given} is an existing folder, not a file: give a file name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(dest):
        tmp = _sibling(dest, "new")
        _remove(tmp)
        try:
            yield tmp
            if tmp.exists():
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, dest)
        finally:
            _remove(tmp)


def remove_file(dest: str | os.PathLike) -> None:
    """Remove the file ``dest`` under its writer lock (nothing when it does not exist)."""
    dest = _real(dest)
    with writer_lock(dest):
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()


# -- reading -------------------------------------------------------------------------------
def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_folder(folder: str | os.PathLike, load: Callable[[], object], attempts: int = 5) -> object:
    """``load()`` (which reads ``folder``), run again when ``folder`` was replaced by a
    writer while it read (its inode changed, or it was gone for a moment), so that what it
    returns comes from one complete folder; a folder a killed writer left in ``.NAME.old``
    (the fallback without an atomic exchange) is put back first. The last attempt's error or
    result stands."""
    folder = Path(folder)
    for attempt in range(attempts):
        before = _identity(folder)
        if before is None and _sibling(_real(folder), "old").exists():
            # Between the two renames of a writer without an atomic exchange (wait for it), or left
            # there by one that was killed (put the old folder back).
            with contextlib.suppress(OSError):
                with writer_lock(folder):
                    _recover(_real(folder))
            before = _identity(folder)
        try:
            result = load()
        except (RegionmedError, OSError):
            if attempt < attempts - 1 and _identity(folder) != before:
                continue
            raise
        if _identity(folder) == before or attempt == attempts - 1:
            return result
    raise AssertionError("unreachable")  # pragma: no cover
