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

**Knowing when they are stale.** The index and the statistics describe the bytes the
shards held when they were written. Each shard's manifest entry therefore records what
identifies those bytes (:func:`shard_identity`: the size and a SHA-256 of the first and
last :data:`SHARD_PROBE_BYTES`), the statistics record a digest of those identities
(``stats["shards_sha256"]``, :func:`shards_digest`), and the index records a CRC-32 of
each json member. A reader checks every shard when it opens a split
(:func:`verify_shards`), the tar header in front of every member it reads, and the CRC
of every record: a shard that was edited, re-packed, truncated or deleted is a
:class:`StaleShardError` naming it, never a silent read of other bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zlib
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
from regionmed.io import read_json
from regionmed.io import write_json_atomic as _write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
INDEX_VERSION = 1
STATS_VERSION = 1
DEFAULT_MAX_OPEN_FILES = 16


class DatasetError(RegionmedError, RuntimeError):
    """A dataset folder that cannot be read (missing, empty or inconsistent)."""


class StaleShardError(DatasetError):
    """A shard whose bytes are not those its manifest entry, index and statistics describe
    (edited, re-packed, truncated or replaced since they were written). The message names
    the shard and the command that re-describes it (``regionmed index-shards DIR``)."""


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

#: Bytes hashed at each end of a shard for its identity. A tar file ends with at least two
#: zero blocks padded to a 10 KiB record, so the tail must reach well into the last members.
SHARD_PROBE_BYTES = 64 * 1024
IDENTITY_FIELDS = ("size", "head_tail_sha256")


def shard_identity(path: str | Path) -> dict:
    """What identifies the bytes of a shard file, cheaply: ``{"size": bytes,
    "head_tail_sha256": hex}``, the SHA-256 of the size and of the first and last
    :data:`SHARD_PROBE_BYTES` (the whole file when it is smaller than two probes). Two
    reads per shard, whatever its size: a truncated or re-packed shard differs in size or
    in its first or last members; a same-size edit in its middle is caught when the
    member is read (the tar header in front of it, the record's CRC-32)."""
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        h = hashlib.sha256(size.to_bytes(8, "little"))
        h.update(fh.read(SHARD_PROBE_BYTES))
        if size > SHARD_PROBE_BYTES:
            fh.seek(max(SHARD_PROBE_BYTES, size - SHARD_PROBE_BYTES))
            h.update(fh.read(SHARD_PROBE_BYTES))
    return {"size": size, "head_tail_sha256": h.hexdigest()}


def shards_digest(shards: list[dict]) -> str | None:
    """A SHA-256 of a split's shard entries (name, samples, size, head/tail hash): the
    identity of the bytes a split's statistics were computed over. None when an entry
    lacks its identity (a dataset written before it was recorded)."""
    if not shards or any(not all(k in s for k in IDENTITY_FIELDS) for s in shards):
        return None
    rows = [[s["name"], s.get("samples"), s["size"], s["head_tail_sha256"]] for s in shards]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _shown(names: list[str]) -> str:
    return "; ".join(names[:5]) + (f"; and {len(names) - 5} more" if len(names) > 5 else "")


def verify_shards(root: str | Path, split: str, shards: list[dict]) -> bool:
    """Check every shard of a split against its manifest entry: present, and of the
    recorded size and head/tail hash (:func:`shard_identity`). Returns whether every entry
    had an identity to check (False for datasets written before it was recorded).

    A changed shard is an **error**, not a silent re-index: a reader must not write into
    the dataset it reads (several ranks and workers open it at once, and it may be
    read-only or shared); a changed shard is as often damage (a truncated copy, an
    interrupted sync) as an intended edit, and re-indexing damage would train on fewer or
    other samples without anyone deciding so; and the statistics need a pass over every
    record. ``regionmed index-shards DIR``, named in the message, re-describes the shards
    as they are when the change was meant.

    Raises :class:`DatasetError` naming the missing shards, :class:`StaleShardError`
    naming each changed shard, its size now and as recorded."""
    root = Path(root)
    missing: list[str] = []
    changed: list[str] = []
    identified = True
    for entry in shards:
        name = entry["name"]
        path = root / name
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            missing.append(name)
            continue
        if not path.is_file():
            missing.append(name)
            continue
        if not all(k in entry for k in IDENTITY_FIELDS):
            identified = False
            continue
        if size != entry["size"]:
            how = "truncated?" if size < entry["size"] else "appended to or re-packed?"
            changed.append(f"{name} is {size} bytes, {MANIFEST_NAME} records {entry['size']} ({how})")
        elif shard_identity(path)["head_tail_sha256"] != entry["head_tail_sha256"]:
            changed.append(f"{name} has its recorded size but other bytes in its first or last "
                           f"{SHARD_PROBE_BYTES // 1024} KiB (edited or re-packed?)")
    if missing:
        raise DatasetError(f"{root}: {len(missing)} of the {len(shards)} shard(s) that {MANIFEST_NAME} lists for "
                           f"split {split!r} are missing: {_shown(missing)} (restore them, or rebuild the dataset)")
    if changed:
        raise StaleShardError(
            f"{root}: {len(changed)} shard(s) of split {split!r} changed since they were indexed: {_shown(changed)}. "
            f"The index and statistics describe other bytes. If the change was meant, re-describe the shards with: "
            f"regionmed index-shards {root}; else restore them (or rebuild the dataset)")
    return identified


def trusted_stats(info: dict, root: str | Path, split: str) -> dict | None:
    """The split's build-time statistics (``info["stats"]``) when they describe the shards
    the manifest lists now (their ``shards_sha256`` equals :func:`shards_digest` of the
    entries, which :func:`verify_shards` checks against the files); None, with a warning
    naming ``regionmed index-shards``, when they describe other bytes, or when there are
    none. Statistics written before the digest existed are returned as they are (the
    reader warned about the dataset's age when it opened it)."""
    stats = info.get("stats")
    if not stats:
        return None
    recorded = stats.get("shards_sha256") if isinstance(stats, dict) else None
    if recorded is None:
        return stats
    if recorded != shards_digest(info.get("shards", [])):
        log.warning("%s: the statistics of split %r in %s were computed over other shard bytes than it lists now: "
                    "not used; refresh them with: regionmed index-shards %s", root, split, MANIFEST_NAME, root)
        return None
    return stats


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
        self.crcs: list[int] = []  # CRC-32 of each json member, when known for every sample

    def add(self, shard: int, key: str, ext: str, image: tuple[int, int], js: tuple[int, int], crc: int | None = None) -> None:
        for name, value in zip(self.cols, (shard, IMAGE_EXTENSIONS.index(ext), *image, *js)):
            self.cols[name].append(value)
        self.keys.append(key.encode())
        if crc is not None:
            self.crcs.append(crc)

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
        if len(self.crcs) == len(self.keys):
            arrays["json_crc32"] = np.asarray(self.crcs, dtype=np.uint32)
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
        self._index.add(len(self._shard_names) - 1, key, image_ext, where[image_ext], where["json"],
                        zlib.crc32(members["json"]))
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
                    try:
                        fh.seek(offset - tarfile.BLOCKSIZE)
                        problem = member_header_problem(fh.read(tarfile.BLOCKSIZE), f"{key}.{member}", size)
                        if problem is None and member == "json" and _safe_key(json.loads(fh.read(size))["id"]) != key:
                            problem = "the json member there holds another record"
                    except (OSError, ValueError, KeyError, TypeError) as err:
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
        """The manifest entry of the split (call after :meth:`close`); writes the split's index.
        Each shard entry carries the shard's identity (:func:`shard_identity`) and the
        statistics the digest of those (``shards_sha256``)."""
        shards = [{"name": name, "samples": self._per_shard[name], **shard_identity(self.out_dir / name)}
                  for name in self._shard_names]
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
            "stats": {**self.stats.as_dict(), "shards_sha256": shards_digest(shards)},
        }
        if self.samples:
            path = self.out_dir / index_name(self.split)
            entry["index"] = {"name": path.name, "sha256": self._index.save(path, self._shard_names), "version": INDEX_VERSION}
        return entry


def member_header_problem(block: bytes, name: str, size: int) -> str | None:
    """Why the 512-byte tar header ``block`` is not that of member ``name`` of ``size``
    bytes, or None when it is. The header's own name may be cut to 100 characters (long
    names live in an extended header before it), carry a folder, or show ``?`` for each
    non-ASCII character (PAX headers): all three are accepted."""
    try:
        info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as err:
        return f"no tar header there ({err})"
    if info.size != size:
        return f"the tar header there is for {info.size} bytes, not {size}"

    def fits(header_name: str) -> bool:
        return bool(header_name) and len(header_name) <= len(name) and all(
            h == e or h == "?" for h, e in zip(header_name, name))

    if not (fits(info.name) or fits(info.name.rsplit("/", 1)[-1])):
        return f"the tar header there names {info.name[:60]!r}"
    return None


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
    manifest = read_json(path, DatasetError, "the dataset manifest")  # a hand-edited one too: UTF-8 (BOM fine), else named
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: not a MedRegion manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(
            f"{path}: field 'schema_version' is {manifest.get('schema_version')!r}, this regionmed reads {SCHEMA_VERSION}"
        )
    return manifest


def index_tar(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """List the samples of a tar shard by walking its headers: ``[(key, {ext: (offset, size)})]``
    in file order. A member whose data the file does not hold to its end (a truncated
    shard) is left out. Raises :class:`DatasetError` for a file that is not a readable tar."""
    return _walk_tar(path)[0]


def _walk_tar(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], list[str], bool]:
    """``(samples, cut, ended)``: the samples of :func:`index_tar`; the keys of samples with a
    member the file ends inside; and whether the file ends with the tar end-of-archive
    marker (two zero blocks after the last member). ``tarfile`` reads a shard cut short as
    one that ends early, so these two are how a cut is seen."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    cut: list[str] = []
    end = 0
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError:
                    if not end:
                        raise
                    break  # "unexpected end of data" after the last member: the file was cut inside it
                if member is None:
                    break
                end = max(end, member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                key, ext = base.split(".", 1)
                if member.offset_data + member.size > size:
                    cut.append(key)
                    continue
                samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
        with open(path, "rb") as fh:
            fh.seek(end)
            ended = fh.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)
    except tarfile.TarError as err:
        raise DatasetError(f"shard {path}: not a readable tar file ({err})") from err
    return list(samples.items()), cut, ended


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
        #: CRC-32 of each json member (uint32), or None (an index written before they were recorded).
        self.json_crc32: np.ndarray | None = arrays.get("json_crc32")
        self.cut: list[tuple[str, str]] = []

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
                if "json_crc32" in z.files:
                    arrays["json_crc32"] = z["json_crc32"]
                names = [str(n) for n in z["shard_names"]]
        except (OSError, KeyError, ValueError) as err:
            raise DatasetError(f"{path}: not a readable MedRegion index ({type(err).__name__}: {err})") from err
        return cls(arrays, names)

    @classmethod
    def from_headers(cls, root: Path, shard_names: list[str], keep_cut: bool = False) -> "SplitIndex":
        """Index shards by walking their tar headers (datasets without an index file).

        A shard cut short (a member the file ends inside, or whose last sample lost its
        image or json member) is a :class:`StaleShardError` naming it; with ``keep_cut``
        (``regionmed index-shards``) its complete samples are indexed and the cut ones
        listed in :attr:`cut` (``[(shard name, key)]``). Raises :class:`DatasetError` for
        a missing, unreadable or empty shard or a sample without an image or a json member."""
        builder = _IndexBuilder()
        dropped: list[tuple[str, str]] = []
        for shard_idx, name in enumerate(shard_names):
            path = root / name
            if not path.is_file():
                raise DatasetError(f"shard {path} is listed in the manifest but missing")
            samples, cut, ended = _walk_tar(path)
            last = samples[-1] if samples else None
            if last and not ended and ("json" not in last[1] or not any(e in last[1] for e in IMAGE_EXTENSIONS)):
                cut.append(last[0])  # the file ends between the members of its last sample
                samples = samples[:-1]
            if (cut or not ended) and not keep_cut:
                where = f"inside sample {cut[0]!r}" if cut else "after a member, without the tar end-of-archive blocks"
                raise StaleShardError(f"shard {path} is cut short: the file ends {where}. Restore it, or index the "
                                      f"samples it still holds with: regionmed index-shards {root}")
            dropped += [(name, key) for key in dict.fromkeys(cut)] or ([(name, "")] if not ended else [])
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
        index = cls(arrays, shard_names)
        index.cut = dropped
        return index


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


_warned_unindexed: set[tuple[str, ...]] = set()


class MedRegionDataset:
    """Random-access reader of one split of a MedRegion dataset.

    Reads ``<root>/manifest.json`` and the split's index (``<split>-index.npz``, written
    at build time), and checks every shard against its manifest entry
    (:func:`verify_shards`: one ``stat`` and two 64 KiB reads each). A split without an index file is
    indexed by walking its tar headers, with one warning naming
    ``regionmed index-shards DIR`` (:func:`index_dataset`), which adds it; so is a split
    whose manifest lists an index file that is missing (the warning says so).

    ``ds[i]`` returns ``(PIL.Image, record)``; ``ds.record(i)`` the record only. At most
    ``max_open_files`` shard files are open at once per process (least recently used
    closed first), so a split of any number of shards reads under a small ``ulimit -n``.

    Every member read is checked against the tar header in front of it, and every record
    against its CRC-32 in the index: a shard that changed after the index was written is a
    :class:`StaleShardError` naming it and ``regionmed index-shards DIR``, never a sample
    read from other bytes.

    Raises :class:`DatasetError` for a missing folder, a missing or empty shard (all
    missing ones named), an index that does not match the manifest, or counts that
    disagree with the manifest; :class:`StaleShardError` for a shard whose size, head or
    tail, or sample count differs from its manifest entry (all changed ones named). A
    manifest without shard identities (an older regionmed) is read with one warning
    naming ``regionmed index-shards DIR``, which records them.
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
        # Every shard against its manifest entry (one stat and two small reads each): a deleted,
        # truncated or re-packed shard stops here, naming it, not one odd sample at a time.
        self.identified = verify_shards(self.root, split, info.get("shards", []))
        if not self.identified and (str(self.root), split, "identity") not in _warned_unindexed:
            _warned_unindexed.add((str(self.root), split, "identity"))
            log.warning("%s: %s records no size or digest for the shards of split %r (written by an older regionmed): "
                        "a shard changed since it was indexed is only found when a sample is read; record them with: "
                        "regionmed index-shards %s", self.root, MANIFEST_NAME, split, self.root)
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
        per_shard = np.bincount(self.index.shard, minlength=len(names))
        differ = [f"{entry['name']} holds {int(n)}, {MANIFEST_NAME} lists {entry['samples']}"
                  for entry, n in zip(info.get("shards", []), per_shard)
                  if isinstance(entry.get("samples"), int) and entry["samples"] != n]
        if differ:
            raise StaleShardError(f"{self.root}: split {split!r}: {_shown(differ)} samples: the shards changed since "
                                  f"they were indexed; re-describe them with: regionmed index-shards {self.root}")
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

    def _read(self, index: int, member: str) -> bytes:
        """The bytes of ``member`` (``"json"`` or the image extension) of sample ``index``,
        read with the tar header in front of them, which must name that member and its
        size: a shard re-packed or edited after it was indexed is a :class:`StaleShardError`
        naming it, never other bytes read as this sample's."""
        ix = self.index
        shard = int(ix.shard[index])
        offset, size = (int(ix.json_offset[index]), int(ix.json_size[index])) if member == "json" else \
            (int(ix.image_offset[index]), int(ix.image_size[index]))
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
        fh.seek(offset - tarfile.BLOCKSIZE)
        data = fh.read(size + tarfile.BLOCKSIZE)
        stale = f"(re-describe the shards with: regionmed index-shards {self.root}, or restore the shard)"
        if len(data) != size + tarfile.BLOCKSIZE:
            raise StaleShardError(f"{self.where(index)}: the shard ends at byte {offset - tarfile.BLOCKSIZE + len(data)}, "
                                  f"before the {size} bytes of member .{member} the index places at {offset}: it was "
                                  f"truncated since it was indexed {stale}")
        problem = member_header_problem(data[:tarfile.BLOCKSIZE], f"{ix.key(index)}.{member}", size)
        if problem:
            raise StaleShardError(f"{self.where(index)}: the index places member .{member} at byte {offset}, but {problem}: "
                                  f"the shard was re-packed or edited since it was indexed {stale}")
        return data[tarfile.BLOCKSIZE:]

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
        raw = self._read(index, "json")
        where = self.where(index)
        if ix.json_crc32 is not None and zlib.crc32(raw) != int(ix.json_crc32[index]):
            raise StaleShardError(f"{where}: the record differs from the one indexed (CRC-32): the shard was edited since "
                                  f"its index and statistics were written; re-describe it with: regionmed index-shards "
                                  f"{self.root}")
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"{where}: json member is not valid JSON ({err})") from err
        return validate_record(record, where)

    def image_bytes(self, index: int) -> bytes:
        """The stored (encoded) image member of sample ``index``, as :meth:`image` reads it."""
        return self._read(index, IMAGE_EXTENSIONS[int(self.index.ext[index])])

    def image(self, index: int) -> Image.Image:
        raw = self.image_bytes(index)
        try:
            image, _ = decode_image(raw, exif_orientation=False)  # 8-bit L/RGB; the stored grid is upright by format
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # not an image, truncated, ...
            raise SampleError(self.where(index), f"image member .{IMAGE_EXTENSIONS[int(self.index.ext[index])]} cannot be decoded "
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
    """``(where, record or None, reason, crc32 of the json member)`` for each sample of
    ``index``, read shard by shard."""
    for shard, name in enumerate(names):
        rows = np.flatnonzero(index.shard == shard)
        with open(root / name, "rb") as fh:
            for i in rows:
                where = f"{root / name}:{index.key(int(i))}"
                fh.seek(int(index.json_offset[i]))
                raw = fh.read(int(index.json_size[i]))
                crc = zlib.crc32(raw)
                try:
                    if len(raw) != int(index.json_size[i]):
                        raise RecordError(f"{where}: the shard ends inside the json member (truncated shard)")
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as err:
                        raise RecordError(f"{where}: json member is not valid JSON ({err})") from err
                    yield where, validate_record(record, where), "", crc
                except RecordError as err:
                    yield where, None, str(err), crc


def index_dataset(root: str | Path, splits: list[str] | None = None, progress: bool = False) -> dict[str, dict]:
    """Describe the shards of a MedRegion dataset as they are now (``regionmed index-shards
    DIR``): for each split, one walk of the tar headers and one pass over the records,
    then ``<split>-index.npz`` is written and ``manifest.json`` is rewritten once
    (atomically) with, per split, the index, the statistics (:class:`SplitStats`, with the
    digest of the shards they describe), the counts (``samples``, ``regions``,
    ``modalities``, ``labels``) and, per shard, its sample count and identity
    (:func:`shard_identity`).

    For a dataset written before the index existed, this adds it. For shards that changed
    since they were indexed (a :class:`StaleShardError` when a split is opened), this is
    the step that accepts the change: the new bytes are described, and what changed is
    returned and logged. A shard cut short keeps its complete samples; the cut ones are
    named. Returns ``{split: {"samples", "records_unreadable", "changes": [str]}}``;
    records that cannot be read are left out of the statistics, counted in
    ``stats["records_unreadable"]`` (a few named in ``records_unreadable_examples``) and
    named in the log. Raises :class:`DatasetError` for an unreadable dataset (a missing or
    empty shard, one that is not a tar file); the manifest is then left as it was."""
    from tqdm import tqdm

    root = Path(root)
    manifest = read_manifest(root)
    done: dict[str, dict] = {}
    pending: list[tuple[dict, _IndexBuilder, list[str], SplitStats, str, list[dict], dict]] = []
    for split, info in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        old_shards = list(info.get("shards", []))
        names = [shard["name"] for shard in old_shards]
        index = SplitIndex.from_headers(root, names, keep_cut=True)
        builder = _IndexBuilder()
        builder.cols = {name: list(map(int, getattr(index, name))) for name in builder.cols}
        builder.keys = [index.key(i).encode() for i in range(len(index))]
        stats = SplitStats()
        counts = {"regions": 0, "modalities": Counter(), "labels": Counter()}
        for where, record, reason, crc in tqdm(_index_records(root, names, index), total=len(index),
                                               desc=f"stats {split}", disable=not progress):
            builder.crcs.append(crc)
            if record is None:
                stats.add_unreadable(where, reason)
                log.warning("%s", reason)
                continue
            stats.add(record)
            counts["regions"] += len(record.get("regions", []))
            counts["modalities"][record.get("modality", "unknown")] += 1
            counts["labels"].update(label for label, value in record.get("labels", {}).items() if value)
        per_shard = np.bincount(index.shard, minlength=len(names)) if len(index) else np.zeros(len(names), dtype=int)
        shards = [{**entry, "samples": int(n), **shard_identity(root / entry["name"])}
                  for entry, n in zip(old_shards, per_shard)]
        changes = []
        for old, new in zip(old_shards, shards):
            if isinstance(old.get("samples"), int) and old["samples"] != new["samples"]:
                changes.append(f"{new['name']}: {old['samples']} -> {new['samples']} samples")
            elif all(k in old for k in IDENTITY_FIELDS) and any(old[k] != new[k] for k in IDENTITY_FIELDS):
                changes.append(f"{new['name']}: other bytes ({old['size']} -> {new['size']} bytes), same sample count")
        for name, key in index.cut:
            changes.append(f"{name}: cut short" + (f", sample {key!r} left out (the file ends inside it)" if key else
                                                  " (no tar end-of-archive blocks)"))
        for change in changes:
            log.warning("%s: split %r: %s", root, split, change)
        pending.append((info, builder, names, stats, split, shards, counts))
        done[split] = {"samples": len(index), "records_unreadable": stats.unreadable, "changes": changes}
    # Everything was read: now write (the index files, then the manifest that names them).
    for info, builder, names, stats, split, shards, counts in pending:
        path = root / index_name(split)
        info["shards"] = shards
        info["samples"] = sum(s["samples"] for s in shards)
        info["regions"] = counts["regions"]
        info["modalities"] = dict(counts["modalities"])
        info["labels"] = dict(counts["labels"])
        info["index"] = {"name": path.name, "sha256": builder.save(path, names), "version": INDEX_VERSION}
        info["stats"] = {**stats.as_dict(), "shards_sha256": shards_digest(shards)}
    write_json_atomic(root / MANIFEST_NAME, manifest)
    return done
