"""Streaming reader: MedRegion shards read in order, from local paths or URLs, on
WebDataset's own pipeline (``webdataset.gopen`` for ``file``/``pipe:``/``http(s)``,
``tar_file_expander`` + ``group_by_keys`` for tar members, ``shuffle`` for the buffer).

For pretraining at scale, where a random seek per sample is slow (network file
systems) or impossible (object storage). Each rank and each DataLoader worker (a
*slot*, ``rank * num_workers + worker``) reads its own shards:

* **Shard order.** Without resampling, the shards of a source are permuted per pass
  (seeded by ``(seed, source, pass)``) and slot ``i`` of ``n`` takes every ``n``-th one
  (split by node, then by worker), so one pass reads every shard exactly once over all
  slots. With ``resampled``, each slot draws shards with replacement (seeded by
  ``(seed, source, slot)``), endlessly; a source then needs no more shards than slots.
* **Samples.** A seeded shuffle buffer (``shuffle_buffer`` samples per slot) mixes
  samples of consecutive shards. It is filled before the first sample leaves it and
  holds the samples as read from the tar files (each sample's members: the encoded
  image file and its JSON record, as bytes; not decoded, not preprocessed), so its
  memory per slot is about ``shuffle_buffer`` x the mean size of a sample in the
  shards. When every source has a manifest (so the samples a slot reads per pass are
  known: their counts over the slots), the buffer is capped at that, with a warning.
  Several sources are mixed per sample with their weights (seeded draws, the role of
  ``webdataset.RandomMix``), each sample tagged with its source. Decoding, preprocessing and :func:`~regionmed.data.loader.collate`
  are those of the indexed reader; an unreadable sample is named (``<url>:<key>``),
  skipped and listed in the next batch's ``bad_samples``, as the indexed reader does.
* **Resume at shard granularity.** Each batch carries, per slot and source, how many
  shards of the slot's sequence were *fully delivered* (all their samples left the
  buffer in a batch). Resumed with that state and the same number of slots, every slot
  restarts at its first shard not fully delivered: no shard is skipped, the samples of
  shards that were partly delivered at the checkpoint are delivered again (at most the
  shuffle buffer plus the shards being read, per slot), and the order after the resume
  differs from an uninterrupted run's (the buffer and mixing draws are reseeded with
  the step). With another number of slots (world size × workers) the shard sequences
  differ: every slot restarts at the start of the earliest pass any slot had not
  finished (:data:`RESUME_PASS`). Resampled streams are reseeded with the step
  (:data:`RESUME_RESAMPLED`): they have no coverage to keep.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from regionmed.data.decode import decode_image
from regionmed.data.loader import Batch, collate, loader_options, prepare_sample
from regionmed.data.schema import FORMAT_NAME, IMAGE_EXTENSIONS, SCHEMA_VERSION, RecordError, validate_record
from regionmed.data.shards import MANIFEST_NAME, DatasetError, SampleError, trusted_stats, verify_shards
from regionmed.data.transforms import Preprocessor
from regionmed.io import decode_utf8, parse_json

log = logging.getLogger(__name__)

# The resume guarantees a run records (trainer state and the metrics' "data" record).
#: ``Batch.bad_samples`` index of a shard that cannot be read or breaks off (its other samples
#: are lost unseen), as opposed to one unreadable sample (index -1).
SHARD_FAILURE = -2

RESUME_EXACT = "exact"  # indexed reader: the same batches as an uninterrupted run, any world size
RESUME_SHARD = "shard"  # streaming, same slots: no shard skipped, partly delivered shards read again
RESUME_PASS = "pass"  # streaming, other slots: restart at the earliest unfinished pass
RESUME_RESAMPLED = "resampled"  # streaming with resampled shards: reseeded, no coverage guarantee


def _is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if _is_url(base) else str(Path(base) / name)


#: What curl's common exit statuses mean (``man curl``, "EXIT CODES"); ``gopen`` reads http(s) URLs with curl.
CURL_EXIT = {6: "could not resolve the host", 7: "connection refused", 22: "an HTTP error such as 404",
             28: "timed out"}


def read_error_reason(url: str, err: BaseException) -> str:
    """One line saying why ``url`` (a manifest or a shard) could not be read, from what
    ``webdataset.gopen`` or ``tarfile`` raised: the exit status of curl (with its meaning
    for the common ones, :data:`CURL_EXIT`) or of a ``pipe:`` command; an empty stream
    (what a failed download gives the tar reader); else the exception's own message,
    without the reprs of the pipe objects webdataset adds to it."""
    text = str(err.args[0]) if err.args else str(err)
    status = re.search(r"exit (-?\d+) \(read\)", text)
    if status:
        code = int(status.group(1))
        if url.startswith("pipe:"):
            return f"the command exited with status {code}"
        meaning = CURL_EXIT.get(code)
        return f"curl exit {code}" + (f" ({meaning})" if meaning else " (see 'man curl', EXIT CODES)")
    if text == "empty file":
        return ("empty or unreadable shard (an HTTP error such as 404?)" if _is_url(url) and not url.startswith("file:")
                else "empty or unreadable shard")
    if isinstance(err, FileNotFoundError):
        return "no such file"
    return f"{type(err).__name__}: {text}"


def read_remote_manifest(base: str) -> dict:
    """``<base>/manifest.json`` of a local folder or a URL (``http(s)://``, ``file://``), read
    with ``webdataset.gopen``. Raises :class:`DatasetError` naming it when it cannot be read
    or is not a MedRegion manifest."""
    where = _join(base, MANIFEST_NAME)
    try:
        with gopen(where, "rb") as fh:
            raw = fh.read()
    except Exception as err:  # gopen raises OSError, or IOError from curl's exit status
        raise DatasetError(f"{where}: cannot be read ({read_error_reason(where, err)})") from err
    manifest = parse_json(decode_utf8(raw, where, "the dataset manifest", DatasetError), where, "the dataset manifest",
                          DatasetError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{where}: not a MedRegion manifest (field 'format' is not {FORMAT_NAME!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{where}: field 'schema_version' is {manifest.get('schema_version')!r}, this regionmed reads {SCHEMA_VERSION}")
    return manifest


@dataclass
class StreamSource:
    """One dataset of a streamed run: its shard URLs (local paths, ``pipe:``, ``http(s)://``),
    its mixing weight, and, when it came from a manifest, the samples per shard and the
    split's build-time statistics."""

    name: str
    urls: list[str]
    weight: float = 1.0
    samples: int | None = None  # None: unknown (URLs without a manifest)
    stats: dict | None = None
    manifest_entry: dict | None = None
    #: Per shard (same order as ``urls``): ``(size in bytes or None, samples or None)`` the
    #: manifest records; a shard read whole that differs is reported (:data:`SHARD_FAILURE`).
    expected: list[tuple[int | None, int | None]] | None = None

    @classmethod
    def from_dataset(cls, name: str, base: str, split: str, weight: float = 1.0) -> "StreamSource":
        """The shards of ``split`` listed in ``<base>/manifest.json`` (``base``: a folder or a URL).

        For a local folder every shard is checked against its manifest entry first
        (:func:`~regionmed.data.shards.verify_shards`: a deleted, truncated or re-packed
        shard is an error naming it); for a URL, each shard's size and sample count are
        compared when it has been read. The statistics are kept only when they describe
        the shards listed (:func:`~regionmed.data.shards.trusted_stats`)."""
        manifest = read_remote_manifest(base)
        entry = manifest.get("splits", {}).get(split)
        if not entry or not entry.get("shards"):
            raise DatasetError(f"{_join(base, MANIFEST_NAME)}: no shards for split {split!r} (has {sorted(manifest.get('splits', {}))})")
        if not _is_url(base) or base.startswith("file://"):
            verify_shards(Path(base[len("file://"):] if base.startswith("file://") else base), split, entry["shards"])
        expected = [(s.get("size") if isinstance(s.get("size"), int) else None,
                     s.get("samples") if isinstance(s.get("samples"), int) else None) for s in entry["shards"]]
        return cls(name, [_join(base, s["name"]) for s in entry["shards"]], weight, entry.get("samples"),
                   trusted_stats(entry, base, split), entry, expected)

    @classmethod
    def from_urls(cls, name: str, urls: list[str], weight: float = 1.0) -> "StreamSource":
        """Explicit shard URLs; brace patterns (``shards-{000000..000099}.tar``) are expanded."""
        expanded = [u for url in urls for u in braceexpand.braceexpand(url)]
        if not expanded:
            raise DatasetError(f"source {name!r}: no shard URL given")
        return cls(name, expanded, weight)


def _too_few_shards(what: str, n_shards: int, n_slots: int) -> DatasetError:
    return DatasetError(f"{what} has {n_shards} shard(s), fewer than the {n_slots} reading slots (world size x "
                        "data.num_workers): give more shards, fewer workers, or data.resampled: true")


#: At most this many unreadable samples/shards are kept between two batches (or
#: ``4 x batch_size`` if larger); reaching it without a batch is a :class:`DatasetError`.
MAX_BAD_BETWEEN_BATCHES = 10_000


def _rng(*parts: int) -> random.Random:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63)
    return random.Random(seed)


def slot_shards(n_shards: int, seed: int, source: int, slot: int, n_slots: int, resampled: bool, start: int = 0):
    """The endless sequence of shard indices one slot reads from one source, from position
    ``start`` on: ``(position, pass, shard index)``. Deterministic in its arguments."""
    if resampled:
        rng = _rng(seed, source, slot, 1)
        pos = 0
        while True:
            shard = rng.randrange(n_shards)
            if pos >= start:
                yield pos, 0, shard
            pos += 1
    per_pass = len(range(slot, n_shards, n_slots))
    if per_pass == 0:
        raise _too_few_shards(f"source {source}", n_shards, n_slots)
    p, i = divmod(start, per_pass)
    while True:
        order = list(range(n_shards))
        _rng(seed, source, p, 2).shuffle(order)
        mine = order[slot::n_slots]
        for k in range(i, per_pass):
            yield p * per_pass + k, p, mine[k]
        p, i = p + 1, 0


class _CountingReader:
    """A read-only stream that counts the bytes read through it (for the size check of a
    shard read whole); :meth:`finish` reads what the tar reader left (the end-of-archive
    padding) and closes it."""

    def __init__(self, stream):
        self._stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self.count += len(data)
        return data

    def finish(self) -> int | None:
        """All bytes of the stream, or None when it cannot be read to its end."""
        try:
            while self.read(1 << 16):
                pass
            return self.count
        except Exception:  # noqa: BLE001 - a stream that fails here was reported by the tar reader
            return None
        finally:
            try:
                self._stream.close()
            except Exception:  # noqa: BLE001
                pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _Progress:
    """Per source: shards read to the end (their sample counts) and samples delivered; the
    number of fully delivered shards of the slot's sequence (the resume point)."""

    def __init__(self, starts: list[int]):
        self.done = list(starts)
        self.read: list[dict[int, int]] = [{} for _ in starts]
        self.delivered: list[Counter] = [Counter() for _ in starts]

    def finished_reading(self, j: int, pos: int, n: int) -> None:
        self.read[j][pos] = n
        self._advance(j)

    def deliver(self, j: int, pos: int) -> None:
        self.delivered[j][pos] += 1
        self._advance(j)

    def _advance(self, j: int) -> None:
        while self.done[j] in self.read[j] and self.delivered[j][self.done[j]] >= self.read[j][self.done[j]]:
            pos = self.done[j]
            del self.read[j][pos]
            self.delivered[j].pop(pos, None)
            self.done[j] += 1


class MedRegionStream(IterableDataset):
    """This rank's training batches, streamed (see the module docstring); an endless
    iterable of :class:`~regionmed.data.loader.Batch` (``batch_size`` samples each), for a
    ``DataLoader(batch_size=None)`` (:func:`make_stream_loader`).

    ``resume``: the trainer's saved stream state ``{"slots": n, "step": s, "done":
    {"<slot>": [shards done per source]}}`` or None. :attr:`resume_guarantee` says what
    the resume keeps (:data:`RESUME_SHARD`, :data:`RESUME_PASS` with a warning, or
    :data:`RESUME_RESAMPLED`); for a new run (``resume`` None), the guarantee its resume
    will have with the same slots (:data:`RESUME_SHARD`, or :data:`RESUME_RESAMPLED`). Raises :class:`DatasetError` for a source without shards or
    with fewer shards than slots (without resampling); while iterating, for a source none
    of whose shards a slot reads in a whole pass holds a readable sample, and when
    :data:`MAX_BAD_BETWEEN_BATCHES` unreadable samples come without a batch.
    """

    def __init__(self, sources: list[StreamSource], pre: Preprocessor, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000, resampled: bool = False,
                 use_rois: bool = True, max_negatives: int = 3, max_image_negatives: int = 2, resume: dict | None = None,
                 max_rois: int | None = None):
        if not sources:
            raise DatasetError("the streaming reader needs at least one source")
        self.sources, self.pre, self.batch_size = sources, pre, batch_size
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.use_rois, self.max_negatives, self.max_image_negatives = use_rois, max_negatives, max_image_negatives
        self.max_rois = (pre.max_rois if use_rois else 0) if max_rois is None else max_rois
        self.n_slots = world * max(1, num_workers)
        self.shuffle_buffer = self._capped_buffer(shuffle_buffer, rank)
        if not resampled:
            for j, src in enumerate(sources):
                if len(src.urls) < self.n_slots:
                    raise _too_few_shards(f"source {src.name!r}", len(src.urls), self.n_slots)
        self.resume_step = int(resume.get("step", 0)) if resume else 0
        self.starts: dict[int, list[int]] = {}
        if not resume:  # a new run: the guarantee its resume will have (same slots)
            self.resume_guarantee = RESUME_RESAMPLED if resampled else RESUME_SHARD
        elif resampled:
            self.resume_guarantee = RESUME_RESAMPLED
        elif int(resume.get("slots", -1)) == self.n_slots and len(resume.get("done", {})) == self.n_slots:
            self.resume_guarantee = RESUME_SHARD
            self.starts = {int(k): list(v) for k, v in resume["done"].items()}
        else:
            self.resume_guarantee = RESUME_PASS
            old_slots = max(1, int(resume.get("slots", 1)))
            if rank == 0:
                log.warning("resuming a stream read by %d reading slot(s) with %d (world size %d x data.num_workers %d): "
                            "resume guarantee %r, not %r: the shard sequences differ, so every slot restarts at the start of "
                            "the earliest pass any slot had not finished, and samples of that pass delivered before the "
                            "checkpoint are delivered again; resume with the checkpoint's world size and data.num_workers "
                            "to restart at shard granularity", old_slots, self.n_slots, world, max(1, num_workers),
                            RESUME_PASS, RESUME_SHARD)
            for j, src in enumerate(sources):
                passes = []
                for slot, done in resume.get("done", {}).items():
                    per_pass = max(1, len(range(int(slot), len(src.urls), old_slots)))
                    passes.append(done[j] // per_pass if j < len(done) else 0)
                first = min(passes, default=0)
                for slot in range(self.n_slots):
                    self.starts.setdefault(slot, [0] * len(sources))[j] = first * len(range(slot, len(src.urls), self.n_slots))

    def _capped_buffer(self, requested: int, rank: int) -> int:
        """``requested`` capped at the samples one slot reads per pass (the sources' manifest
        counts over the slots, rounded up) when every source has a count: a larger buffer
        is filled by reading the slot's shards several times over before the first sample,
        and then holds (and delivers close together) several copies of each sample."""
        counts = [src.samples for src in self.sources]
        if requested <= 1 or any(c is None for c in counts):
            return requested
        per_slot = max(1, -(-sum(counts) // self.n_slots))
        if requested <= per_slot:
            return requested
        if rank == 0:
            log.warning("data.shuffle_buffer %d is more than the %d sample(s) each of the %d reading slot(s) (world size x "
                        "data.num_workers) reads per pass (%d sample(s) in the sources' manifests): using %d, as a larger "
                        "buffer would read every shard several times before the first batch and repeat samples in it",
                        requested, per_slot, self.n_slots, sum(counts), per_slot)
        return per_slot

    def initial_state(self) -> dict[str, list[int]]:
        """This rank's slots and where each starts (shards done per source): the stream state
        before the first batch."""
        w = max(1, self.num_workers)
        return {str(slot): list(self.starts.get(slot, [0] * len(self.sources)))
                for slot in range(self.rank * w, (self.rank + 1) * w)}

    def _slot(self) -> int:
        info = get_worker_info()
        return self.rank * max(1, self.num_workers) + (info.id if info is not None else 0)

    def _shard_samples(self, url: str, bad: list, expected: tuple[int | None, int | None] = (None, None)):
        """The raw samples of one shard (``{"__key__", "__url__", "json", "png"|"jpg"...}``).

        ``expected``: the shard's size and sample count as its manifest records them. When
        the shard was read without an error but its bytes (counted to the end of the
        stream) or samples differ, it is reported like an unreadable shard: it was
        truncated or re-packed since it was indexed (a tar cut at a member boundary reads
        as a shorter, valid one)."""
        failures = len(bad)

        def handler(exn: Exception) -> bool:
            bad.append((SHARD_FAILURE, url, f"shard cannot be read ({read_error_reason(url, exn)})"))
            return True  # go on with the next shard

        opened: list[_CountingReader] = []

        def counted():
            for source in url_opener([{"url": url}], handler=handler):
                source["stream"] = _CountingReader(source["stream"])
                opened.append(source["stream"])
                yield source

        # A shard that cannot be opened or ends early is named in bad_samples; its readable samples count.
        n = 0
        for sample in group_by_keys(tar_file_expander(counted(), handler=handler), handler=handler):
            n += 1
            yield sample
        size, samples = expected
        for stream in opened:
            read = stream.finish()
            if len(bad) > failures or read is None:
                continue
            found = []
            if size is not None and read != size:
                found.append(f"{read} bytes, the manifest records {size}")
            if samples is not None and n != samples:
                found.append(f"{n} samples, the manifest lists {samples}")
            if found:
                bad.append((SHARD_FAILURE, url, f"the shard changed since it was indexed ({'; '.join(found)}): "
                                                 "truncated or re-packed? Restore it, or re-describe the dataset with "
                                                 "regionmed index-shards on its folder"))

    def _source_iter(self, j: int, slot: int, progress: _Progress, bad: list):
        """The raw samples of source ``j`` for ``slot``: ``(j, position, sample)``, endlessly.

        Raises :class:`DatasetError` (naming the source and the first reasons) when no
        sample could be read from a whole pass's worth of the slot's shards in a row
        (without resampling: as many consecutive shards as the slot reads per pass; with
        it: every distinct shard of the source, drawn since the last readable sample),
        instead of looping over unreadable shards forever."""
        src = self.sources[j]
        n_shards = len(src.urls)
        per_pass = len(range(slot, n_shards, self.n_slots))
        empty_run: list[int] = []  # shard indices read in a row without a sample
        reasons: list[str] = []
        for pos, _pass, shard in slot_shards(n_shards, self.seed, j, slot, self.n_slots, self.resampled, progress.done[j]):
            n = 0
            mine: list = []
            expected = src.expected[shard] if src.expected else (None, None)
            for raw in self._shard_samples(src.urls[shard], mine, expected):
                n += 1
                yield j, pos, raw
            bad += mine
            progress.finished_reading(j, pos, n)
            if n:
                empty_run, reasons = [], []
                continue
            empty_run.append(shard)
            if len(reasons) < 3:
                reasons.append(f"{src.urls[shard]}: {mine[0][2]}" if mine else f"{src.urls[shard]}: holds no sample")
            # every distinct shard of the slot failed since the last sample (a pass boundary may
            # repeat a failing shard in a row, which alone is not "every shard")
            if len(set(empty_run)) >= (n_shards if self.resampled else per_pass):
                raise DatasetError(
                    f"source {src.name!r}: no sample could be read from {len(empty_run)} shard(s) in a row "
                    f"({len(set(empty_run))} distinct of {n_shards}; reading slot {slot}), e.g. {'; '.join(reasons)}: "
                    "check the shard paths/URLs, or rebuild the shards")

    def _prepare(self, j: int, raw: dict) -> dict:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if image_ext is None or "json" not in raw:
            raise SampleError(where, f"lacks an image or a json member ({sorted(k for k in raw if not k.startswith('__'))})")
        try:
            record = validate_record(json.loads(raw["json"]), where)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SampleError(where, f"json member is not valid JSON ({err})") from err
        except RecordError as err:
            raise SampleError(where, str(err)[len(where):].lstrip(": ") if str(err).startswith(where) else str(err)) from err
        try:
            image, _ = decode_image(raw[image_ext], exif_orientation=False)
        except Exception as err:  # not an image, truncated, a decompression bomb, ...
            raise SampleError(where, f"image member .{image_ext} cannot be decoded ({type(err).__name__}: {err})") from err
        sample = prepare_sample(image, record, self.pre, self.use_rois, self.max_negatives, self.max_image_negatives, where)
        sample["source"] = self.sources[j].name
        return sample

    def __iter__(self):
        slot = self._slot()
        progress = _Progress(self.starts.get(slot, [0] * len(self.sources)))
        bad: list[tuple[int, str, str]] = []
        cap = max(MAX_BAD_BETWEEN_BATCHES, 4 * self.batch_size)
        iters = [self._source_iter(j, slot, progress, bad) for j in range(len(self.sources))]
        weights = [s.weight for s in self.sources]
        mix_rng = _rng(self.seed, slot, self.resume_step, 3)

        def mixed():
            while True:
                j = mix_rng.choices(range(len(iters)), weights)[0] if len(iters) > 1 else 0
                yield next(iters[j])

        stream = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=_rng(self.seed, slot, self.resume_step, 4))(mixed()) \
            if self.shuffle_buffer > 1 else mixed()
        samples: list[dict] = []
        for j, pos, raw in stream:
            try:
                sample = self._prepare(j, raw)
            except SampleError as err:
                bad.append((-1, err.where, err.reason))
                sample = None
            progress.deliver(j, pos)
            if len(bad) >= cap:
                raise DatasetError(
                    f"{len(bad)} samples or shards in a row cannot be read without a batch of {self.batch_size} readable "
                    f"samples (e.g. {'; '.join(f'{w}: {r}' for _, w, r in bad[:3])}): check the sources "
                    f"({', '.join(repr(s.name) for s in self.sources)})")
            if sample is None:
                continue
            samples.append(sample)
            if len(samples) == self.batch_size:
                # The readers hold this very list: hand a copy to the batch and empty it in place.
                samples[0]["bad"] = list(bad)
                bad.clear()
                batch = collate(samples, max_rois=self.max_rois)
                batch.stream_state = {str(slot): list(progress.done)}
                samples = []
                yield batch


def make_stream_loader(stream: MedRegionStream, pin_memory: bool | None = None, prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader over a :class:`MedRegionStream` (its own workers: ``stream.num_workers``);
    each item is one step's :class:`~regionmed.data.loader.Batch` for this rank."""
    return DataLoader(stream, batch_size=None, persistent_workers=False,
                      **loader_options(stream.num_workers, pin_memory, prefetch_factor))


@dataclass
class StreamState:
    """What a trainer keeps of the batches it consumed: per slot, the shards done per source."""

    slots: int
    done: dict[str, list[int]] = field(default_factory=dict)

    def update(self, batch: Batch) -> None:
        self.done.update(batch.stream_state)

    def as_dict(self, step: int) -> dict:
        return {"slots": self.slots, "step": step, "done": dict(self.done)}


def gather_stream_state(state: StreamState, world: int) -> StreamState:
    """The union of every rank's slots (a collective under data parallelism)."""
    if world > 1 and torch.distributed.is_initialized():
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, state.done)
        merged = StreamState(state.slots)
        for part in parts:
            merged.done.update(part)
        return merged
    return state
