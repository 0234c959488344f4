"""MedRegion shards on disk: WebDataset tar files plus ``manifest.json``.

Writing uses :class:`webdataset.ShardWriter` (size- and count-bounded shards).
Reading is random access: each tar is indexed once (member offsets, stdlib
``tarfile``), so a sampler can pick any sample, which is what makes exact
resumption and per-rank sharding simple. The same tar files also stream with
plain ``webdataset.WebDataset`` pipelines.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from regionmed.data.decode import check_stored_image, decode_image
from regionmed.data.schema import FORMAT_NAME, IMAGE_EXTENSIONS, SCHEMA_VERSION, SPLITS, RecordError, validate_record
from regionmed.errors import RegionmedError

MANIFEST_NAME = "manifest.json"


class DatasetError(RegionmedError, RuntimeError):
    """A dataset folder that cannot be read (missing, empty or inconsistent)."""


class SampleError(RegionmedError, ValueError):
    """One sample that cannot be read (an image member that does not decode, a broken
    record). ``where`` is ``<shard path>:<key>``; the message starts with it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MedRegionWriter:
    """Write MedRegion samples of one split into bounded tar shards.

    Writes ``<out_dir>/<split>-NNNNNN.tar``. Use as a context manager; call
    :meth:`summary` after closing to get the manifest entry for the split.
    """

    def __init__(self, out_dir: str | Path, split: str, max_count: int = 1000, max_size: float = 256e6):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self._writer = wds.ShardWriter(
            str(self.out_dir / f"{split}-%06d.tar"), maxcount=max_count, maxsize=max_size, verbose=0
        )
        self._per_shard: Counter[str] = Counter()
        self.samples = 0
        self.regions = 0
        self.labels: Counter[str] = Counter()
        self.modalities: Counter[str] = Counter()

    def write(self, record: dict, image_bytes: bytes, image_ext: str = "png") -> None:
        """Validate ``record`` and append it with its encoded image.

        The image must keep the format's promise (:func:`regionmed.data.decode.check_stored_image`):
        an 8-bit L or RGB JPEG/PNG, opaque, upright (no EXIF orientation), of the record's
        width × height; otherwise :class:`RecordError` names the record and the problem."""
        image_ext = image_ext.lower().lstrip(".")
        if image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension {image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        validate_record(record)
        problem = check_stored_image(image_bytes, image_ext, record["width"], record["height"])
        if problem:
            raise RecordError(f"record {record['id']!r}: its .{image_ext} image breaks the MedRegion format: {problem}")
        if record["split"] != self.split:
            raise RecordError(f"record {record['id']!r} has split {record['split']!r}, writer is for {self.split!r}")
        key = _safe_key(record["id"])
        self._writer.write({"__key__": key, image_ext: image_bytes, "json": json.dumps(record, ensure_ascii=False).encode()})
        self._per_shard[Path(self._writer.fname).name] += 1
        self.samples += 1
        self.regions += len(record.get("regions", []))
        self.modalities[record.get("modality", "unknown")] += 1
        for name, value in record.get("labels", {}).items():
            if value:
                self.labels[name] += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "MedRegionWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict:
        shards = [{"name": name, "samples": n} for name, n in sorted(self._per_shard.items()) if n > 0]
        # ShardWriter may leave an empty trailing tar when the last shard filled exactly.
        for tar in self.out_dir.glob(f"{self.split}-*.tar"):
            if tar.name not in self._per_shard:
                tar.unlink()
        return {
            "shards": shards,
            "samples": self.samples,
            "regions": self.regions,
            "modalities": dict(self.modalities),
            "labels": dict(self.labels),
        }


def _safe_key(sample_id: str) -> str:
    # WebDataset splits a member name at its first dot: keys must not contain one.
    return "".join(c if (c.isalnum() or c in "-_") else "_" for c in sample_id)


def write_manifest(out_dir: str | Path, splits: dict[str, dict], provenance: dict | None = None) -> Path:
    """Write ``<out_dir>/manifest.json`` (atomically) and return its path."""
    manifest = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "splits": splits,
        "provenance": provenance or {},
    }
    path = Path(out_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(root: str | Path) -> dict:
    """Read and check ``<root>/manifest.json``; raise :class:`DatasetError` if unusable."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{path} is missing: {root} is not a MedRegion dataset (run 'regionmed synth' or 'regionmed build')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: field 'schema_version' is {manifest.get('schema_version')!r}, this regionmed reads {SCHEMA_VERSION}"
        )
    return manifest


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    image_ext: str
    image_offset: int
    image_size: int
    json_offset: int
    json_size: int


def index_tar(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """List the samples of a tar shard: ``[(key, {ext: (offset, size)})]`` in file order."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except tarfile.TarError as err:
        raise DatasetError(f"shard {path}: not a readable tar file ({err})") from err
    return list(samples.items())


class MedRegionDataset:
    """Random-access reader of one split of a MedRegion dataset.

    Reads ``<root>/manifest.json`` and the split's tar shards (indexed once at
    construction). ``ds[i]`` returns ``(PIL.Image, record)``; ``ds.record(i)`` the
    record only. Raises :class:`DatasetError` for a missing folder, a missing or
    empty shard, or counts that disagree with the manifest.
    """

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        self.split = split
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise DatasetError(
                f"{self.root / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['splits'])})"
            )
        info = manifest["splits"][split]
        self.shard_paths: list[Path] = []
        self._entries: list[_Entry] = []
        for shard_idx, shard in enumerate(info.get("shards", [])):
            path = self.root / shard["name"]
            if not path.is_file():
                raise DatasetError(f"shard {path} is listed in the manifest but missing")
            samples = index_tar(path)
            if not samples:
                raise DatasetError(f"shard {path} is empty (no samples)")
            for key, members in samples:
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None or "json" not in members:
                    raise DatasetError(f"shard {path}: sample {key!r} lacks an image or a json member ({sorted(members)})")
                self._entries.append(_Entry(shard_idx, key, image_ext, *members[image_ext], *members["json"]))
            self.shard_paths.append(path)
        if not self._entries:
            raise DatasetError(f"{self.root}: split {split!r} has no samples")
        if info.get("samples") is not None and info["samples"] != len(self._entries):
            raise DatasetError(
                f"{self.root / MANIFEST_NAME}: split {split!r} lists {info['samples']} samples, shards hold {len(self._entries)}"
            )
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._entries)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: do not share file offsets with the parent
            self._handles, self._pid = {}, os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            fh = self._handles[shard] = open(self.shard_paths[shard], "rb")
        fh.seek(offset)
        return fh.read(size)

    def where(self, index: int) -> str:
        """``<shard path>:<key>`` of sample ``index``: how errors name a sample."""
        entry = self._entries[index]
        return f"{self.shard_paths[entry.shard]}:{entry.key}"

    def record(self, index: int) -> dict:
        entry = self._entries[index]
        raw = self._read(entry.shard, entry.json_offset, entry.json_size)
        where = self.where(index)
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise RecordError(f"{where}: json member is not valid JSON ({err})") from err
        return validate_record(record, where)

    def image(self, index: int) -> Image.Image:
        entry = self._entries[index]
        raw = self._read(entry.shard, entry.image_offset, entry.image_size)
        try:
            image, _ = decode_image(raw, exif_orientation=False)  # 8-bit L/RGB; the stored grid is upright by format
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, ...
            raise SampleError(self.where(index), f"image member .{entry.image_ext} cannot be decoded "
                                                 f"({type(err).__name__}: {err})") from err
        return image

    def __getitem__(self, index: int) -> tuple[Image.Image, dict]:
        return self.image(index), self.record(index)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}
