"""MedRegion shards on disk: WebDataset tar files plus ``manifest.json``.

Writing uses :class:`webdataset.ShardWriter` (size- and count-bounded shards).
While it writes, :class:`MedRegionWriter` records each sample's member offsets and
sizes and the split's statistics; :meth:`MedRegionWriter.summary` saves the offsets
as ``<split>-index.npz`` beside the shards (numpy arrays, listed in the manifest
with its SHA-256) and returns the statistics (``stats``) for ``manifest.json``.

Reading is random access (:class:`MedRegionDataset`): the index is loaded from that
file, so no tar header is walked at start, and a sampler can pick any sample, which
is what makes exact resumption and per-rank sharding simple. A dataset written
before the index existed is indexed by walking its tar headers (once per process,
with a warning); :func:`index_dataset` (``regionmed index-shards DIR``) adds the index
and the statistics to such a dataset. The same tar files also stream with
WebDataset pipelines (:mod:`regionmed.data.stream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from regionmed.data.decode import check_stored_image, decode_image
from regionmed.data.schema import (
    FORMAT_NAME,
    IMAGE_EXTENSIONS,
    SCHEMA_VERSION,
    SPLITS,
    BoxStats,
    RecordError,
    sanitize_regions,
    validate_record,
)
from regionmed.errors import RegionmedError
from regionmed.io import write_json_atomic as _write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
INDEX_VERSION = 1
STATS_VERSION = 1
DEFAULT_MAX_OPEN_FILES = 16


class DatasetError(RegionmedError, RuntimeError):
    """A dataset folder that cannot be read (missing, empty or inconsistent)."""


class SampleError(RegionmedError, ValueError):
    """One sample that cannot be read (an image member that does not decode, a broken
    record). ``where`` is ``<shard path>:<key>``; the message starts with it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename
    (:func:`regionmed.io.write_json_atomic`, sorted keys; kept here for its many callers)."""
    _write_json_atomic(path, data)


#: How many unreadable records a manifest's ``stats`` names (all are counted).
UNREADABLE_EXAMPLES = 20


class SplitStats:
    """Counts over the records of one split, taken once (at build time, or by
    :func:`index_dataset`), for the trainer's data checks and data log.

    ``as_dict()`` is the manifest's ``stats`` entry: ``samples``; ``regions`` (usable
    boxes with captions, after :func:`~regionmed.data.schema.sanitize_regions`);
    ``boxes_*`` (:class:`~regionmed.data.schema.BoxStats`); and three histograms,
    ``{count: how many}`` with string keys (JSON): ``regions_per_image``,
    ``negatives_per_region`` (over usable regions) and ``negatives_per_image``. The
    histograms let a reader derive capped counts (``max_rois``, ``max_negatives``)
    without a pass over the records (:func:`counts_from_stats`). ``records_unreadable``:
    the records that could not be read (left out of every other count; 0 at build time,
    where every record is validated before it is written), with up to
    :data:`UNREADABLE_EXAMPLES` of them as ``records_unreadable_examples``
    (``[["<shard>:<key>", reason], ...]``).
    """

    def __init__(self) -> None:
        self.unreadable = 0
        self.unreadable_examples: list[list[str]] = []
        self.samples = 0
        self.boxes = BoxStats()
        self.regions_per_image: Counter[int] = Counter()
        self.negatives_per_region: Counter[int] = Counter()
        self.negatives_per_image: Counter[int] = Counter()

    def add(self, record: dict) -> None:
        regions, _ = sanitize_regions(record, self.boxes)
        self.samples += 1
        self.regions_per_image[len(regions)] += 1
        for region in regions:
            self.negatives_per_region[len(region.get("negatives", []))] += 1
        self.negatives_per_image[len(record.get("negatives", []))] += 1

    def add_unreadable(self, where: str, reason: str) -> None:
        """Count a record that cannot be read (``where``: ``<shard>:<key>``)."""
        self.unreadable += 1
        if len(self.unreadable_examples) < UNREADABLE_EXAMPLES:
            self.unreadable_examples.append([where, reason])

    def as_dict(self) -> dict:
        hist = lambda c: {str(k): v for k, v in sorted(c.items())}  # noqa: E731
        return {"version": STATS_VERSION, "samples": self.samples, "records_unreadable": self.unreadable,
                "records_unreadable_examples": list(self.unreadable_examples),
                "regions": sum(k * v for k, v in self.regions_per_image.items()),
                **{f"boxes_{k}": v for k, v in self.boxes.as_dict().items()},
                "regions_per_image": hist(self.regions_per_image),
                "negatives_per_region": hist(self.negatives_per_region),
                "negatives_per_image": hist(self.negatives_per_image)}


def counts_from_stats(stats: dict, max_rois: int, max_negatives: int, max_image_negatives: int) -> Counter:
    """The trainer's data counts from a manifest ``stats`` entry (:class:`SplitStats`),
    equal to those of one pass over the records (:meth:`regionmed.data.loader.RegionSampleDataset.audit`):
    ``samples``, ``regions``, ``region_negatives`` / ``image_negatives`` (capped at
    ``max_negatives`` / ``max_image_negatives`` per region / image), ``rois_over_max``
    (regions beyond ``max_rois`` per image), ``boxes_*`` and ``records_unreadable`` (when
    any; :func:`unreadable_from_stats` names them). Raises :class:`DatasetError`
    for an entry of another version or without the histograms."""
    try:
        if stats.get("version") != STATS_VERSION:
            raise KeyError("version")
        rpi = {int(k): int(v) for k, v in stats["regions_per_image"].items()}
        npr = {int(k): int(v) for k, v in stats["negatives_per_region"].items()}
        npi = {int(k): int(v) for k, v in stats["negatives_per_image"].items()}
        counts = Counter({"samples": int(stats["samples"]), "regions": int(stats["regions"])})
        counts["region_negatives"] = sum(min(k, max_negatives) * v for k, v in npr.items())
        counts["image_negatives"] = sum(min(k, max_image_negatives) * v for k, v in npi.items())
        counts["rois_over_max"] = sum(max(0, k - max_rois) * v for k, v in rpi.items())
        for name in BoxStats.__dataclass_fields__:
            counts[f"boxes_{name}"] = int(stats[f"boxes_{name}"])
        if int(stats.get("records_unreadable", 0)):
            counts["records_unreadable"] = int(stats["records_unreadable"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DatasetError(f"manifest 'stats' entry is not of version {STATS_VERSION} or lacks field {err}") from err
    return counts


def unreadable_from_stats(stats: dict | None) -> list[tuple[str, str]]:
    """The unreadable records a manifest ``stats`` entry names: ``[(where, reason)]`` (at
    most :data:`UNREADABLE_EXAMPLES`; ``stats["records_unreadable"]`` counts them all)."""
    return [(str(w), str(r)) for w, r in (stats or {}).get("records_unreadable_examples", [])]


class _IndexBuilder:
    """Member offsets and sizes of one split's samples, appended in shard order."""

    def __init__(self) -> None:
        self.cols: dict[str, list[int]] = {k: [] for k in ("shard", "ext", "image_offset", "image_size", "json_offset", "json_size")}
        self.keys: list[bytes] = []

    def add(self, shard: int, key: str, ext: str, image: tuple[int, int], js: tuple[int, int]) -> None:
        for name, value in zip(self.cols, (shard, IMAGE_EXTENSIONS.index(ext), *image, *js)):
            self.cols[name].append(value)
        self.keys.append(key.encode())

    def __len__(self) -> int:
        return len(self.keys)

    def save(self, path: Path, shard_names: list[str]) -> str:
        """Write the index (atomically) and return its SHA-256."""
        lengths = np.fromiter((len(k) for k in self.keys), dtype=np.int64, count=len(self.keys))
        arrays = {
            "version": np.array([INDEX_VERSION], dtype=np.int64),
            "shard": np.asarray(self.cols["shard"], dtype=np.int32),
            "ext": np.asarray(self.cols["ext"], dtype=np.uint8),
            "image_offset": np.asarray(self.cols["image_offset"], dtype=np.int64),
            "image_size": np.asarray(self.cols["image_size"], dtype=np.int64),
            "json_offset": np.asarray(self.cols["json_offset"], dtype=np.int64),
            "json_size": np.asarray(self.cols["json_size"], dtype=np.int64),
            "key_bytes": np.frombuffer(b"".join(self.keys), dtype=np.uint8),
            "key_start": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "shard_names": np.array(shard_names, dtype=np.str_),
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_name(split: str) -> str:
    return f"{split}-index.npz"


class MedRegionWriter:
    """Write MedRegion samples of one split into bounded tar shards.

    Writes ``<out_dir>/<split>-NNNNNN.tar``. Use as a context manager; call
    :meth:`summary` after closing: it writes ``<out_dir>/<split>-index.npz`` (member
    offsets recorded while writing) and returns the manifest entry for the split,
    with the index's name and SHA-256 and the split's :class:`SplitStats`.
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
        self._index = _IndexBuilder()
        self._shard_names: list[str] = []
        self._verified: set[int] = set()
        self._shard_first: list[int] = []  # the index row of each shard's first sample
        self.stats = SplitStats()
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
        w = self._writer
        # Open the next shard ourselves when this sample would start one (ShardWriter's own
        # rule), so that the tar stream's offset below is this sample's shard's.
        if w.tarstream is None or w.count >= w.maxcount or w.size >= w.maxsize:
            w.next_stream()
        tar = w.tarstream.tarstream  # the tarfile.TarFile being written
        members = {image_ext: image_bytes, "json": json.dumps(record, ensure_ascii=False).encode()}
        start = tar.offset
        w.write({"__key__": key, **members})
        # TarWriter adds the members in sorted order: each is a header, then its data padded
        # to 512-byte blocks; a member's data starts after its header (recomputed exactly).
        where: dict[str, tuple[int, int]] = {}
        pos = start
        for info in tar.members[-len(members):]:
            header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
            where[info.name.split(".", 1)[1]] = (pos + header, info.size)
            pos += header + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        del tar.members[:]  # tarfile keeps every member in write mode: not needed, bounded memory
        name = Path(w.fname).name
        if not self._shard_names or self._shard_names[-1] != name:
            if self._shard_names:  # the previous shard was closed by next_stream()
                self._verify_shard(len(self._shard_names) - 1)
            self._shard_names.append(name)
            self._shard_first.append(len(self._index))
        self._index.add(len(self._shard_names) - 1, key, image_ext, where[image_ext], where["json"])
        self._per_shard[name] += 1
        self.stats.add(record)
        self.samples += 1
        self.regions += len(record.get("regions", []))
        self.modalities[record.get("modality", "unknown")] += 1
        for label, value in record.get("labels", {}).items():
            if value:
                self.labels[label] += 1

    def close(self) -> None:
        self._writer.close()
        if self._shard_names and len(self._shard_names) - 1 not in self._verified:
            self._verify_shard(len(self._shard_names) - 1)

    def _verify_shard(self, shard: int) -> None:
        """Check, in the closed shard file, that the member offsets recorded for its first
        and last sample point at those members (the header block just before each offset
        names the member and gives its size; the json member holds the record). The
        offsets come from the tar stream being written (webdataset's ``ShardWriter``
        internals): a version that writes otherwise fails here, at build time. Raises
        :class:`DatasetError` naming the shard."""
        self._verified.add(shard)
        cols, path = self._index.cols, self.out_dir / self._shard_names[shard]
        first = self._shard_first[shard]
        last = self._shard_first[shard + 1] - 1 if shard + 1 < len(self._shard_first) else len(self._index) - 1
        with open(path, "rb") as fh:
            for i in sorted({first, last}):
                key = self._index.keys[i].decode()
                ext = IMAGE_EXTENSIONS[cols["ext"][i]]
                for member, offset, size in ((ext, cols["image_offset"][i], cols["image_size"][i]),
                                             ("json", cols["json_offset"][i], cols["json_size"][i])):
                    problem = None
                    try:
                        fh.seek(offset - tarfile.BLOCKSIZE)
                        info = tarfile.TarInfo.frombuf(fh.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
                        expected = f"{key}.{member}"
                        if info.size != size or not info.name or not expected.startswith(info.name):
                            problem = f"the header there is {info.name!r} ({info.size} bytes)"
                        elif member == "json" and _safe_key(json.loads(fh.read(size))["id"]) != key:
                            problem = "the json member there holds another record"
                    except (tarfile.TarError, OSError, ValueError, KeyError, TypeError) as err:
                        problem = f"no member header there ({type(err).__name__}: {err})"
                    if problem:
                        raise DatasetError(
                            f"shard {path}: the offset recorded for member {key}.{member} ({offset}) is wrong: {problem}. "
                            "The index is computed from webdataset's tar writer; this webdataset version writes otherwise "
                            "(pyproject pins the tested versions)")

    def __enter__(self) -> "MedRegionWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict:
        """The manifest entry of the split (call after :meth:`close`); writes the split's index."""
        shards = [{"name": name, "samples": self._per_shard[name]} for name in self._shard_names]
        # ShardWriter may leave an empty trailing tar when the last shard filled exactly.
        for tar in self.out_dir.glob(f"{self.split}-*.tar"):
            if tar.name not in self._per_shard:
                tar.unlink()
        entry = {
            "shards": shards,
            "samples": self.samples,
            "regions": self.regions,
            "modalities": dict(self.modalities),
            "labels": dict(self.labels),
            "stats": self.stats.as_dict(),
        }
        if self.samples:
            path = self.out_dir / index_name(self.split)
            entry["index"] = {"name": path.name, "sha256": self._index.save(path, self._shard_names), "version": INDEX_VERSION}
        return entry


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


def index_tar(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """List the samples of a tar shard by walking its headers: ``[(key, {ext: (offset, size)})]``
    in file order. Raises :class:`DatasetError` for a file that is not a readable tar."""
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


class SplitIndex:
    """Where each sample of a split lies in its shards, held in numpy arrays (about 40
    bytes per sample plus its key; shared copy-on-write by forked DataLoader workers, no
    per-sample Python object).

    Arrays (length ``n``): ``shard`` (position in :attr:`shard_names`), ``ext`` (position
    in :data:`~regionmed.data.schema.IMAGE_EXTENSIONS`), ``image_offset``, ``image_size``,
    ``json_offset``, ``json_size`` (bytes within the tar file); keys as one byte string
    ``key_bytes`` cut at ``key_start`` (length ``n + 1``).
    """

    FIELDS = ("shard", "ext", "image_offset", "image_size", "json_offset", "json_size", "key_bytes", "key_start")

    def __init__(self, arrays: dict[str, np.ndarray], shard_names: list[str]):
        for name in self.FIELDS:
            setattr(self, name, arrays[name])
        self.shard_names = list(shard_names)

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        return bytes(self.key_bytes[self.key_start[i]: self.key_start[i + 1]]).decode()

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "SplitIndex":
        """Read ``<split>-index.npz``; raises :class:`DatasetError` when it is unreadable, of
        another version, or its SHA-256 differs from the manifest's."""
        if sha256 is not None and _sha256(path) != sha256:
            raise DatasetError(f"{path}: its SHA-256 differs from the one in {MANIFEST_NAME}: the index does not belong to "
                               f"these shards (rebuild it: regionmed index-shards {path.parent})")
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"][0]) != INDEX_VERSION:
                    raise DatasetError(f"{path}: index version {int(z['version'][0])}, this regionmed reads {INDEX_VERSION}")
                arrays = {name: z[name] for name in cls.FIELDS}
                names = [str(n) for n in z["shard_names"]]
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(f"{path}: not a readable MedRegion index ({type(err).__name__}: {err})") from err
        return cls(arrays, names)

    @classmethod
    def from_headers(cls, root: Path, shard_names: list[str]) -> "SplitIndex":
        """Index shards by walking their tar headers (datasets without an index file).
        Raises :class:`DatasetError` for a missing, unreadable or empty shard or a sample
        without an image or a json member."""
        builder = _IndexBuilder()
        for shard_idx, name in enumerate(shard_names):
            path = root / name
            if not path.is_file():
                raise DatasetError(f"shard {path} is listed in the manifest but missing")
            samples = index_tar(path)
            if not samples:
                raise DatasetError(f"shard {path} is empty (no samples)")
            for key, members in samples:
                image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
                if image_ext is None or "json" not in members:
                    raise DatasetError(f"shard {path}: sample {key!r} lacks an image or a json member ({sorted(members)})")
                builder.add(shard_idx, key, image_ext, members[image_ext], members["json"])
        lengths = np.fromiter((len(k) for k in builder.keys), dtype=np.int64, count=len(builder))
        arrays = {name: np.asarray(v, dtype=np.int64) for name, v in builder.cols.items()}
        arrays["key_bytes"] = np.frombuffer(b"".join(builder.keys), dtype=np.uint8)
        arrays["key_start"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(arrays, shard_names)


@dataclass(frozen=True)
class SampleEntry:
    shard: int
    key: str
    image_ext: str
    image_offset: int
    image_size: int
    json_offset: int
    json_size: int


class _EntryView:
    def __init__(self, ds: "MedRegionDataset"):
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> SampleEntry:
        return self._ds.entry(index)


_warned_unindexed: set[tuple[str, str]] = set()


class MedRegionDataset:
    """Random-access reader of one split of a MedRegion dataset.

    Reads ``<root>/manifest.json`` and the split's index (``<split>-index.npz``, written
    at build time): no shard is opened at construction. A split without an index file is
    indexed by walking its tar headers, with one warning naming
    ``regionmed index-shards DIR`` (:func:`index_dataset`), which adds it; so is a split
    whose manifest lists an index file that is missing (the warning says so).

    ``ds[i]`` returns ``(PIL.Image, record)``; ``ds.record(i)`` the record only. At most
    ``max_open_files`` shard files are open at once per process (least recently used
    closed first), so a split of any number of shards reads under a small ``ulimit -n``.

    Raises :class:`DatasetError` for a missing folder, a missing or empty shard (every
    shard file the split lists is checked at construction: one ``stat`` each, all missing
    ones named), an index that does not match the manifest, or counts that disagree with
    the manifest.
    """

    def __init__(self, root: str | Path, split: str = "train", max_open_files: int = DEFAULT_MAX_OPEN_FILES):
        if max_open_files < 1:
            raise ValueError(f"max_open_files must be >= 1, got {max_open_files}")
        self.root = Path(root)
        self.split = split
        self.max_open_files = max_open_files
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise DatasetError(
                f"{self.root / MANIFEST_NAME}: no split {split!r} (has {sorted(manifest['splits'])})"
            )
        info = manifest["splits"][split]
        self.info = info
        names = [shard["name"] for shard in info.get("shards", [])]
        self.shard_paths: list[Path] = [self.root / name for name in names]
        # One stat per shard: a deleted shard stops the run here, not one skipped sample at a time.
        missing = [name for name, path in zip(names, self.shard_paths) if not path.is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise DatasetError(f"{self.root}: {len(missing)} of the {len(names)} shard(s) that {MANIFEST_NAME} lists for "
                               f"split {split!r} are missing: {shown} (restore them, or rebuild the dataset)")
        index_info = info.get("index")
        self.index: SplitIndex | None = None
        index_path = self.root / index_info["name"] if index_info else None
        if index_path is not None and not index_path.is_file():
            if (str(self.root), split) not in _warned_unindexed:
                _warned_unindexed.add((str(self.root), split))
                log.warning("%s: %s lists the index %s of split %r, but the file is missing: walking the tar headers of "
                            "its %d shard(s) instead (slow on network storage); restore it with: regionmed index-shards %s",
                            self.root, MANIFEST_NAME, index_info["name"], split, len(names), self.root)
        elif index_path is not None:
            index = SplitIndex.load(index_path, index_info.get("sha256"))
            if index.shard_names == names:
                self.index = index
            else:  # the manifest's shard list was changed after the index was written
                log.warning("%s: the index %s lists other shards than %s (%d vs %d): walking the tar headers instead; "
                            "rebuild it with: regionmed index-shards %s", self.root, index_info["name"], MANIFEST_NAME,
                            len(index.shard_names), len(names), self.root)
        elif (str(self.root), split) not in _warned_unindexed:
            _warned_unindexed.add((str(self.root), split))
            log.warning("%s: split %r has no index file: walking the tar headers of its %d shard(s) (slow on network "
                        "storage); add the index once with: regionmed index-shards %s", self.root, split, len(names), self.root)
        self.indexed = self.index is not None
        if self.index is None:
            self.index = SplitIndex.from_headers(self.root, names)
        if len(self.index) == 0:
            raise DatasetError(f"{self.root}: split {split!r} has no samples")
        if info.get("samples") is not None and info["samples"] != len(self.index):
            raise DatasetError(
                f"{self.root / MANIFEST_NAME}: split {split!r} lists {info['samples']} samples, shards hold {len(self.index)}"
            )
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def open_files(self) -> int:
        """Shard files this process holds open now (at most ``max_open_files``)."""
        return len(self._handles) if self._pid == os.getpid() else 0

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: do not share file offsets with the parent
            self._handles, self._pid = OrderedDict(), os.getpid()
        fh = self._handles.get(shard)
        if fh is None:
            while len(self._handles) >= self.max_open_files:
                self._handles.popitem(last=False)[1].close()
            try:
                fh = self._handles[shard] = open(self.shard_paths[shard], "rb")
            except FileNotFoundError as err:
                raise DatasetError(f"shard {self.shard_paths[shard]} is listed in the manifest but missing") from err
        else:
            self._handles.move_to_end(shard)
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise SampleError(f"{self.shard_paths[shard]}", f"shard ends at {offset + len(data)}, before the member's "
                                                            f"{size} bytes at {offset} (truncated shard or stale index)")
        return data

    def entry(self, index: int) -> "SampleEntry":
        """Where sample ``index`` lies: shard, key, image extension, member offsets and sizes."""
        ix = self.index
        return SampleEntry(int(ix.shard[index]), ix.key(index), IMAGE_EXTENSIONS[int(ix.ext[index])],
                           int(ix.image_offset[index]), int(ix.image_size[index]),
                           int(ix.json_offset[index]), int(ix.json_size[index]))

    @property
    def _entries(self) -> "_EntryView":  # the former list of entries, as a view (made per access)
        return _EntryView(self)

    def where(self, index: int) -> str:
        """``<shard path>:<key>`` of sample ``index``: how errors name a sample."""
        return f"{self.shard_paths[int(self.index.shard[index])]}:{self.index.key(index)}"

    def record(self, index: int) -> dict:
        ix = self.index
        raw = self._read(int(ix.shard[index]), int(ix.json_offset[index]), int(ix.json_size[index]))
        where = self.where(index)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"{where}: json member is not valid JSON ({err})") from err
        return validate_record(record, where)

    def image(self, index: int) -> Image.Image:
        ix = self.index
        raw = self._read(int(ix.shard[index]), int(ix.image_offset[index]), int(ix.image_size[index]))
        try:
            image, _ = decode_image(raw, exif_orientation=False)  # 8-bit L/RGB; the stored grid is upright by format
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, ...
            raise SampleError(self.where(index), f"image member .{IMAGE_EXTENSIONS[int(ix.ext[index])]} cannot be decoded "
                                                 f"({type(err).__name__}: {err})") from err
        return image

    def __getitem__(self, index: int) -> tuple[Image.Image, dict]:
        return self.image(index), self.record(index)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = OrderedDict()


def _index_records(root: Path, names: list[str], index: SplitIndex):
    """``(where, record or None, reason)`` for each sample of ``index``, read shard by shard."""
    for shard, name in enumerate(names):
        rows = np.flatnonzero(index.shard == shard)
        with open(root / name, "rb") as fh:
            for i in rows:
                where = f"{root / name}:{index.key(int(i))}"
                fh.seek(int(index.json_offset[i]))
                raw = fh.read(int(index.json_size[i]))
                try:
                    if len(raw) != int(index.json_size[i]):
                        raise RecordError(f"{where}: the shard ends inside the json member (truncated shard)")
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise RecordError(f"{where}: json member is not valid JSON ({err})") from err
                    yield where, validate_record(record, where), ""
                except RecordError as err:
                    yield where, None, str(err)


def index_dataset(root: str | Path, splits: list[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """Add ``<split>-index.npz`` and the split's statistics (:class:`SplitStats`) to a
    MedRegion dataset written without them (``regionmed index-shards DIR``): one walk of
    the tar headers and one pass over the records per split, then the index files are
    written and ``manifest.json`` is rewritten once (atomically) with ``index`` and
    ``stats`` for each split. Returns ``{split: {"samples", "records_unreadable"}}``;
    records that cannot be read are left out of the other statistics, counted in
    ``stats["records_unreadable"]`` (a few named in ``records_unreadable_examples``) and
    named in the log. Raises :class:`DatasetError` for an unreadable dataset."""
    from tqdm import tqdm

    root = Path(root)
    manifest = read_manifest(root)
    done: dict[str, dict] = {}
    pending: list[tuple[dict, _IndexBuilder, list[str], SplitStats, str]] = []
    for split, info in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        names = [shard["name"] for shard in info.get("shards", [])]
        index = SplitIndex.from_headers(root, names)
        builder = _IndexBuilder()
        builder.cols = {name: list(map(int, getattr(index, name))) for name in builder.cols}
        builder.keys = [index.key(i).encode() for i in range(len(index))]
        stats = SplitStats()
        for where, record, reason in tqdm(_index_records(root, names, index), total=len(index), desc=f"stats {split}",
                                          disable=not progress):
            if record is None:
                stats.add_unreadable(where, reason)
                log.warning("%s", reason)
            else:
                stats.add(record)
        pending.append((info, builder, names, stats, split))
        done[split] = {"samples": len(index), "records_unreadable": stats.unreadable}
    # Everything was read: now write (the index files, then the manifest that names them).
    for info, builder, names, stats, split in pending:
        path = root / index_name(split)
        info["index"] = {"name": path.name, "sha256": builder.save(path, names), "version": INDEX_VERSION}
        info["stats"] = stats.as_dict()
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return done
