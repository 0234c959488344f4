"""Listing the images of a folder: every entry is an image to decode or a problem with its reason.

The one folder walk of the inference commands (``regionmed embed``, ``classify``,
``ground``, ``index``). Nothing is skipped without a word:

* a file is an image candidate when its bytes need a decoder regionmed has: the DICOM
  part-10 magic (``DICM`` at byte 128, whatever the name: PACS exports often have no
  extension) or a ``.dcm`` / ``.dicom`` name, any extension Pillow opens (``.jpe``,
  ``.jfif``, ``.tif``, ``.webp``, ...; :data:`PILLOW_EXTENSIONS`), or, for other names,
  a header Pillow recognises (a PNG saved as ``scan.bin``);
* every other file is a problem: ``unsupported_format`` for a known format regionmed does
  not read (NIfTI, NRRD, MetaImage, ...: :data:`UNSUPPORTED_FORMATS`), ``not_an_image``
  otherwise;
* symbolic links are followed: a linked sub-folder is walked once (a second link to a
  folder already walked is a ``duplicate_folder`` problem, a link back to one of its own
  ancestors a ``symlink_loop`` problem, never a hang), a link to nothing is a
  ``missing_file`` problem;
* a file or folder that cannot be read (permissions) is an ``unreadable_image`` /
  ``unreadable_folder`` problem.

Entries come in a stable order (sorted by their path relative to the folder, which is
also their id).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from regionmed.data.dicom import is_dicom

__all__ = ["FolderListing", "ListedProblem", "PILLOW_EXTENSIONS", "UNSUPPORTED_FORMATS", "file_problem", "list_folder"]

HEAD_BYTES = 132  # enough for the DICOM preamble + magic


def _pillow_extensions() -> frozenset[str]:
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


# Extensions of the formats Pillow can open (not those it only writes, such as .pdf).
PILLOW_EXTENSIONS = _pillow_extensions()

# Medical and array formats regionmed does not decode: (name suffixes, what they are).
UNSUPPORTED_FORMATS = (
    ((".nii", ".nii.gz"), "a NIfTI volume"),
    ((".hdr", ".img"), "an Analyze volume"),
    ((".nrrd", ".nhdr"), "an NRRD volume"),
    ((".mha", ".mhd"), "a MetaImage volume"),
    ((".mgz", ".mgh"), "a FreeSurfer volume"),
    ((".npy", ".npz"), "a NumPy array file"),
    ((".svs", ".ndpi", ".mrxs", ".scn"), "a whole-slide image"),
)


@dataclass
class ListedProblem:
    """A folder entry that is not an image to decode: ``id`` (its path relative to the
    folder), ``path``, ``reason`` (a short key, as in the module docstring) and ``detail``."""

    id: str
    path: str
    reason: str
    detail: str


@dataclass
class FolderListing:
    """``images``: (id, path) of the image candidates; ``problems``: every other entry."""

    images: list[tuple[str, str]] = field(default_factory=list)
    problems: list[ListedProblem] = field(default_factory=list)


def _unsupported(name: str) -> str | None:
    low = name.lower()
    for suffixes, what in UNSUPPORTED_FORMATS:
        if low.endswith(suffixes):
            return what
    return None


def file_problem(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(reason, detail)`` when the file ``path`` is not an image regionmed can decode
    (see the module docstring), None when it is a candidate (its decoder has the last
    word). Reads at most the file's header."""
    name = os.fsdecode(os.fspath(path))
    low = name.lower()
    what = _unsupported(low)
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as err:
        return "unreadable_image", f"cannot read file ({err.strerror or type(err).__name__})"
    if is_dicom(head, low):
        return None
    if what:
        return "unsupported_format", f"{what}: regionmed reads 2-D images (PNG, JPEG, any format Pillow opens) and DICOM; export it as those"
    if os.path.splitext(low)[1] in PILLOW_EXTENSIONS:
        return None
    if not head:
        return "not_an_image", "empty file"
    try:
        with Image.open(path):  # the header only
            return None
    except Exception:  # noqa: BLE001 - Pillow raises many types for "not an image"
        pass
    return "not_an_image", "no image decoder for this file (not a format Pillow opens, no DICOM preamble)"


def _stat_errno(path: Path) -> int | None:
    try:
        os.stat(path)
    except OSError as err:
        return err.errno
    return None


def list_folder(root: str | os.PathLike) -> FolderListing:
    """Every entry under the folder ``root`` (recursively): an image candidate or a problem
    (see the module docstring). Symbolic links are followed once; loops are problems."""
    root = Path(root)
    out = FolderListing()
    visited: dict[tuple[int, int], str] = {}

    def walk(folder: Path, rel: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        try:
            st = os.stat(folder)
        except OSError as err:
            out.problems.append(ListedProblem(rel or ".", str(folder), "unreadable_folder",
                                              f"cannot read folder ({err.strerror or type(err).__name__})"))
            return
        ident = (st.st_dev, st.st_ino)
        if ident in ancestors:
            out.problems.append(ListedProblem(rel, str(folder), "symlink_loop",
                                              "a symbolic link to a folder that contains it: not followed"))
            return
        if ident in visited:
            first = visited[ident] or "."
            out.problems.append(ListedProblem(rel, str(folder), "duplicate_folder",
                                              f"the same folder as {first} (through a symbolic link): listed once, there"))
            return
        visited[ident] = rel
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            out.problems.append(ListedProblem(rel or ".", str(folder), "unreadable_folder",
                                              f"cannot list folder ({err.strerror or type(err).__name__})"))
            return
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if is_dir:
                walk(path, sub, (*ancestors, ident))
            elif is_file:
                problem = file_problem(path)
                if problem:
                    out.problems.append(ListedProblem(sub, str(path), *problem))
                else:
                    out.images.append((sub, str(path)))
            elif entry.is_symlink() and not os.path.exists(path):
                loop = _stat_errno(path) == errno.ELOOP
                out.problems.append(ListedProblem(sub, str(path), "symlink_loop" if loop else "missing_file",
                                                  "a loop of symbolic links" if loop else "a symbolic link to nothing"))
            else:
                out.problems.append(ListedProblem(sub, str(path), "not_an_image",
                                                  "not a regular file (a device, pipe or socket)"))
    walk(root, "", ())
    return out

