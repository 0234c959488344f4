"""From MedRegion shards to training batches.

:class:`RegionSampleDataset` turns a record into tensors (boxes sanitised and
counted), :func:`collate` pads ROIs, and :class:`StepBatchSampler` gives a
deterministic, resumable order: the global batch of step ``s`` depends only on
``(seed, s)``, and rank ``r`` takes its slice of it. :class:`MixedSampleDataset` and
:class:`MixedStepBatchSampler` do the same over several datasets drawn with weights.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from regionmed.data.schema import BoxStats, RecordError, sanitize_regions
from regionmed.data.shards import (
    DEFAULT_MAX_OPEN_FILES,
    DatasetError,
    MedRegionDataset,
    SampleError,
    StaleShardError,
    counts_from_stats,
    trusted_stats,
    unreadable_from_stats,
)
from regionmed.data.transforms import ImageFeatures, Preprocessor
from regionmed.errors import RegionmedError

log = logging.getLogger(__name__)


@dataclass
class ImageBatch:
    """The image side of a batch: what :meth:`RegionMedCLIP.encode_batch
    <regionmed.model.clip.RegionMedCLIP.encode_batch>` takes, in training, evaluation and
    inference alike (a training :class:`Batch` is one). Built by :meth:`from_samples`.

    With a locked image tower (``train.lock.image``) ``images`` and ``roi_crops`` are None
    and ``features`` holds the tower's cached outputs instead (:mod:`regionmed.features`)."""

    images: torch.Tensor | None  # (B, 3, S, S); None when ``features`` holds the image tower's outputs instead
    boxes: torch.Tensor  # (B, K, 4) in [0, 1]
    roi_mask: torch.Tensor  # (B, K) bool
    roi_crops: torch.Tensor | None  # (N_valid, 3, r, r), order of roi_mask.nonzero()
    # (B, 4) where each image lies in its letterboxed square (normalised xyxy); None when unknown
    content: torch.Tensor | None = field(default=None, kw_only=True)
    # a locked image tower's cached outputs, in place of images and roi_crops
    features: ImageFeatures | None = field(default=None, kw_only=True)

    @classmethod
    def from_samples(cls, samples: list[dict], max_rois: int | None = None) -> "ImageBatch":
        """Stack the ``image`` (or cached ``features``) of prepared samples
        (:class:`~regionmed.data.transforms.Preprocessor` outputs), their ``content`` boxes,
        and pad their ``boxes`` / ``crops`` (:func:`pad_rois`)."""
        boxes, mask, crops = pad_rois(samples, max_rois)
        features = None
        if samples[0].get("features") is not None:
            crop_feats = [s["features"]["crops"] for s in samples if s["features"].get("crops") is not None]
            features = ImageFeatures(pooled=torch.stack([s["features"]["pooled"] for s in samples]),
                                     grid=torch.stack([s["features"]["grid"] for s in samples]),
                                     crops=torch.cat(crop_feats) if crop_feats else None)
        content = torch.stack([s["content"] for s in samples]) if all("content" in s for s in samples) else None
        images = None if features is not None else torch.stack([s["image"] for s in samples])
        return cls(images, boxes, mask, crops, content=content, features=features)

    @property
    def device(self) -> torch.device:
        return (self.images if self.images is not None else self.features.pooled).device

    def _apply(self, fn) -> None:
        for name in ("images", "boxes", "roi_mask", "roi_crops", "content", "features"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def to(self, device: torch.device | str) -> "ImageBatch":
        self._apply(lambda t: t.to(device, non_blocking=True))
        return self

    def pin_memory(self) -> "ImageBatch":
        """Page-locked copies of the tensors (called by the DataLoader's pin-memory thread)."""
        self._apply(lambda t: t.pin_memory())
        return self

    def __len__(self) -> int:
        return self.boxes.shape[0]


@dataclass
class Batch(ImageBatch):
    """A training batch: the images (:class:`ImageBatch`) and their texts."""

    reports: list[str]
    summaries: list[str]
    captions: list[str]  # N_valid, same order as the crops
    roi_negatives: list[list[str]]  # N_valid lists
    image_negatives: list[list[str]]  # B lists
    ids: list[str]
    roi_negative_rules: list[list[str]] = field(default_factory=list)  # N_valid lists, parallel to roi_negatives
    region_labels: list[str] = field(default_factory=list)  # N_valid region labels ("" when a region has none)
    # Unreadable samples met while making this batch: (dataset index, "<shard>:<key>", reason).
    # Training replaced each by the next readable one; evaluation left it out.
    bad_samples: list[tuple[int, str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # B names of the dataset each sample came from (mixing)
    # Streaming reader only: {"rank/worker": shards fully delivered} after this batch (resume point).
    stream_state: dict = field(default_factory=dict)


BAD_SAMPLE_POLICIES = ("raise", "substitute", "drop")

# What reading and preparing one sample can raise when the sample itself is bad.
_SAMPLE_FAULTS = (RegionmedError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class RegionSampleDataset(Dataset):
    """Map-style dataset over one split: ``ds[i]`` → a dict of tensors and texts.

    A sample that cannot be read or prepared (an image member that does not decode, a
    broken record) is a :class:`~regionmed.data.shards.SampleError` naming its shard and
    key. ``on_bad`` says what ``ds[i]`` does with it — the one place where bad samples
    are handled, for training and evaluation alike:

    * ``"raise"``: raise the :class:`SampleError`;
    * ``"substitute"`` (training): return the next readable sample, ``(i + 1) % n``, ...
      — deterministic, so exact resumption and equal per-rank batch shapes hold; the
      skipped ones are listed in the sample's ``bad`` (then :attr:`Batch.bad_samples`);
    * ``"drop"`` (evaluation): return a marker that :func:`collate` leaves out of the
      batch and lists in :attr:`Batch.bad_samples`.
    """

    def __init__(self, root: str | MedRegionDataset, split: str, preprocessor: Preprocessor, max_negatives: int = 3,
                 use_rois: bool = True, max_image_negatives: int | None = None, on_bad: str = "raise",
                 max_open_files: int = DEFAULT_MAX_OPEN_FILES, source: str = ""):
        """``root``: a dataset folder, whose ``split`` is opened here, or an opened split (``split`` is then its own)."""
        if on_bad not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad must be one of {BAD_SAMPLE_POLICIES}, got {on_bad!r}")
        self.data = root if isinstance(root, MedRegionDataset) else MedRegionDataset(root, split, max_open_files=max_open_files)
        self.source = source  # tag of every sample (dataset mixing); "" = untagged
        self.pre = preprocessor
        self.max_negatives = max_negatives
        self.max_image_negatives = max_negatives if max_image_negatives is None else max_image_negatives
        self.use_rois = use_rois
        self.on_bad = on_bad
        self.unreadable_records: list[tuple[str, str]] = []  # filled by audit()
        # A locked image tower's outputs for every sample (regionmed.features.ImageFeatureCache): when
        # set, samples carry them instead of pixels and no image is decoded.
        self.features = None

    def __len__(self) -> int:
        return len(self.data)

    @property
    def max_rois(self) -> int:
        """ROI slots per image in a batch (0 when ROIs are off)."""
        return self.pre.max_rois if self.use_rois else 0

    def __getitem__(self, index: int) -> dict:
        if self.on_bad == "raise":
            return self.load(index)
        bad: list[tuple[int, str, str]] = []
        n = len(self)
        for probe in range(n if self.on_bad == "substitute" else 1):
            i = (index + probe) % n
            try:
                sample = self.load(i)
            except SampleError as err:
                bad.append((i, err.where, err.reason))
                continue
            sample["bad"] = bad
            return sample
        if self.on_bad == "drop":
            return {"bad": bad, "error": bad[0][2]}
        raise DatasetError(f"{self.data.root}: no sample of split {self.data.split!r} can be read "
                           f"(e.g. {bad[0][1]}: {bad[0][2]})")

    def load(self, index: int) -> dict:
        """Sample ``index`` as tensors and texts; raises :class:`SampleError` naming its shard
        and key when it cannot be read or prepared."""
        try:
            if self.features is not None:
                image, record = None, self.data.record(index)
                feats = self.features.row(index)
            else:
                (image, record), feats = self.data[index], None
        except (SampleError, StaleShardError):  # a stale shard stops the run: its index describes other bytes
            raise
        except _SAMPLE_FAULTS as err:
            raise _sample_error(self.data.where(index), err) from err
        sample = prepare_sample(image, record, self.pre, self.use_rois, self.max_negatives, self.max_image_negatives,
                                self.data.where(index), features=feats)
        if self.source:
            sample["source"] = self.source
        return sample

    def manifest_counts(self) -> Counter | None:
        """The counts of :meth:`audit` from the split's build-time statistics in manifest.json
        (no pass over the records), or None when the manifest has none. The unreadable
        records the statistics name go to :attr:`unreadable_records` (a few; all are
        counted in ``records_unreadable``). Statistics computed over other shard bytes than
        the manifest lists are not used (:func:`~regionmed.data.shards.trusted_stats`)."""
        stats = trusted_stats(self.data.info, self.data.root, self.data.split)
        if not stats:
            return None
        counts = counts_from_stats(stats, self.pre.max_rois, self.max_negatives, self.max_image_negatives)
        self.unreadable_records = unreadable_from_stats(stats)
        return counts

    def audit(self) -> Counter:
        """Count, once over all records (JSON only): samples, usable regions, region and
        image negatives, the boxes that will be clipped or dropped, the regions beyond
        ``max_rois``, and the records that cannot be read (``records_unreadable``; their
        names in :attr:`unreadable_records`). A full pass: training takes these counts
        from the manifest (:meth:`manifest_counts`) when the builder recorded them."""
        counts: Counter = Counter()
        stats = BoxStats()
        self.unreadable_records = []
        for i in range(len(self.data)):
            try:
                record = self.data.record(i)
            except RecordError as err:
                counts["records_unreadable"] += 1
                self.unreadable_records.append((self.data.where(i), str(err)))
                continue
            regions, _ = sanitize_regions(record, stats)
            counts["samples"] += 1
            counts["regions"] += len(regions)
            counts["region_negatives"] += sum(min(len(r.get("negatives", [])), self.max_negatives) for r in regions)
            counts["image_negatives"] += min(len(record.get("negatives", [])), self.max_image_negatives)
            counts["rois_over_max"] += max(0, len(regions) - self.pre.max_rois)
        counts.update({f"boxes_{k}": v for k, v in stats.as_dict().items()})
        return counts


def _sample_error(where: str, err: BaseException) -> SampleError:
    reason = str(err)
    if reason.startswith(where):  # a RecordError already names the sample
        reason = reason[len(where):].lstrip(": ")
    return SampleError(where, f"{reason} ({type(err).__name__})")


def prepare_sample(image: Image.Image | None, record: dict, pre: Preprocessor, use_rois: bool, max_negatives: int,
                   max_image_negatives: int, where: str, features: dict | None = None) -> dict:
    """One decoded sample (image and validated record) as tensors and texts, for
    :func:`collate`: the same for the indexed and the streaming reader. With ``features``
    (a locked image tower's cached ``{"pooled", "grid", "crops"}``) instead of ``image``,
    the boxes are placed from the record's size and the sample carries the features.
    Raises :class:`SampleError` naming ``where`` when it cannot be prepared."""
    try:
        regions = sanitize_regions(record)[0][: pre.max_rois] if use_rois else []
        if features is None:
            out = pre(image, [r["box"] for r in regions])
        else:
            boxes, content = pre.place(record["width"], record["height"], [r["box"] for r in regions])
            out = {"image": None, "boxes": boxes, "crops": None, "content": content}
            crops = features.get("crops")
            if pre.roi_mode == "crop" and (crops is None or crops.shape[0] != len(regions)):
                raise RecordError(f"the feature cache holds {None if crops is None else crops.shape[0]} ROI crop features "
                                  f"for the sample's {len(regions)} region(s): a stale cache")
    except _SAMPLE_FAULTS as err:
        raise _sample_error(where, err) from err
    return {
        "id": record["id"],
        "image": out["image"],
        "features": features,
        "boxes": out["boxes"],
        "crops": out["crops"],
        "report": record["report"],
        "summary": record["summary"],
        "captions": [r["caption"] for r in regions],
        "labels": [str(r.get("label") or "") for r in regions],
        "content": out["content"],
        "roi_negatives": [[n["text"] for n in r.get("negatives", [])][: max_negatives] for r in regions],
        "roi_negative_rules": [[n.get("rule", "unknown") for n in r.get("negatives", [])][: max_negatives] for r in regions],
        "image_negatives": [n["text"] for n in record.get("negatives", [])][: max_image_negatives],
    }


def pad_rois(samples: list[dict], max_rois: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each sample's ``boxes`` ``(n_i, 4)`` (and ``crops``) → ``boxes (B, K, 4)``, ``roi_mask (B, K)``,
    ``crops (sum n_i, 3, r, r)`` in ``roi_mask.nonzero()`` order (None without crops).

    ``K = max_rois`` when given (a fixed shape, the same on every data-parallel rank;
    raises ``ValueError`` when a sample has more boxes), else the largest ``n_i``.
    The one place ROIs are padded, for training batches and evaluation batches alike.
    """
    most = max((s["boxes"].shape[0] for s in samples), default=0)
    k = most if max_rois is None else max_rois
    if most > k:
        raise ValueError(f"a sample has {most} boxes, more than max_rois = {k}")
    counts = torch.tensor([s["boxes"].shape[0] for s in samples], dtype=torch.long)
    mask = torch.arange(k)[None, :] < counts[:, None]
    boxes = torch.zeros(len(samples), k, 4)
    if most:
        boxes[mask] = torch.cat([s["boxes"] for s in samples])
    crops = None
    if samples and samples[0]["crops"] is not None:
        crops = torch.cat([s["crops"] for s in samples])
    return boxes, mask, crops


def collate(samples: list[dict], max_rois: int | None = None) -> Batch:
    """Stack samples into a :class:`Batch`; boxes padded to ``max_rois`` slots per image.

    ``max_rois`` (the model's ``roi.max_rois``) fixes the ROI dimension ``K`` of
    ``boxes`` / ``roi_mask`` whatever the batch holds, so batches on every
    data-parallel rank have the same shapes; ``None`` pads to the batch's own
    maximum (evaluation). Raises ``ValueError`` when a sample has more boxes than
    ``max_rois``. Crops stay compact: ``(N_valid, 3, r, r)`` in ``roi_mask.nonzero()`` order.
    Markers of unreadable samples (see :class:`RegionSampleDataset`) are left out, and every
    sample's ``bad`` list goes to :attr:`Batch.bad_samples`; a batch of markers only is empty.
    """
    bad = [b for s in samples for b in s.get("bad", [])]
    samples = [s for s in samples if "error" not in s]
    if not samples:  # every sample of an evaluation batch was unreadable
        return Batch(images=torch.zeros(0, 3, 1, 1), boxes=torch.zeros(0, max_rois or 0, 4),
                     roi_mask=torch.zeros(0, max_rois or 0, dtype=torch.bool), roi_crops=None, reports=[], summaries=[],
                     captions=[], roi_negatives=[], image_negatives=[], ids=[], bad_samples=bad)
    images = ImageBatch.from_samples(samples, max_rois)
    return Batch(
        images=images.images,
        features=images.features,
        content=images.content,
        boxes=images.boxes,
        roi_mask=images.roi_mask,
        roi_crops=images.roi_crops,
        reports=[s["report"] for s in samples],
        summaries=[s["summary"] for s in samples],
        captions=[c for s in samples for c in s["captions"]],
        roi_negatives=[n for s in samples for n in s["roi_negatives"]],
        image_negatives=[s["image_negatives"] for s in samples],
        ids=[s["id"] for s in samples],
        roi_negative_rules=[n for s in samples for n in s["roi_negative_rules"]],
        region_labels=[lab for s in samples for lab in s.get("labels", [""] * len(s["captions"]))],
        bad_samples=bad,
        sources=[s.get("source", "") for s in samples],
    )


class _StepSampler(Sampler[list[int]]):
    """Yields this rank's indices for steps ``start_step .. total_steps - 1``: the
    ``rank``-th of ``world`` equal slices of :meth:`global_indices` (``step``), which a
    subclass defines (a function of the step only: exact resumption at any world size)."""

    def __init__(self, global_batch: int, seed: int, total_steps: int, start_step: int, rank: int, world: int):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by the world size {world}")
        self.global_batch, self.seed = global_batch, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world = rank, world

    def global_indices(self, step: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self):
        per_rank = self.global_batch // self.world
        for step in range(self.start_step, self.total_steps):
            batch = self.global_indices(step)
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class StepBatchSampler(_StepSampler):
    """Yields this rank's indices for steps ``start_step .. total_steps - 1``.

    Each epoch is a permutation seeded by ``(seed, epoch)``; global batch ``s`` is
    the ``s``-th block of ``global_batch`` indices (the incomplete tail of an epoch
    is dropped); rank ``r`` takes the ``r``-th of ``world`` equal slices.
    """

    def __init__(self, n: int, global_batch: int, seed: int, total_steps: int, start_step: int = 0, rank: int = 0, world: int = 1):
        super().__init__(global_batch, seed, total_steps, start_step, rank, world)
        if n < global_batch:
            raise DatasetError(f"the dataset has {n} samples, fewer than one batch of {global_batch}")
        self.n = n
        self.steps_per_epoch = n // global_batch
        self._perm_epoch, self._perm = -1, None

    def global_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch].tolist()

class MixedSampleDataset(Dataset):
    """Several :class:`RegionSampleDataset` s as one index space (dataset ``j`` at offsets
    ``starts[j] .. starts[j+1]-1``); each sample is tagged with its dataset's ``source`` name.
    Bad samples are substituted within their own dataset."""

    def __init__(self, datasets: list[RegionSampleDataset]):
        if not datasets:
            raise ValueError("MixedSampleDataset needs at least one dataset")
        self.datasets = datasets
        self.sizes = [len(d) for d in datasets]
        self.starts = [0]
        for n in self.sizes:
            self.starts.append(self.starts[-1] + n)
        self.max_rois = datasets[0].max_rois

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        j = next(k for k in range(len(self.datasets)) if index < self.starts[k + 1])
        sample = self.datasets[j][index - self.starts[j]]
        sample["bad"] = [(i + self.starts[j], w, r) for i, w, r in sample.get("bad", [])]
        return sample


def mixed_counts(weights: list[float], total: int) -> list[int]:
    """Per-source draws among the first ``total`` samples of a weighted mix: the largest-remainder
    rounding of ``total * w_j / sum(w)`` (each within 1 of its expected value; they sum to ``total``).
    Monotone in ``total`` per source, so step ``s`` draws ``counts(s+1) - counts(s)`` from each."""
    w = torch.tensor(weights, dtype=torch.float64)
    exact = w / w.sum() * total
    base = torch.floor(exact).long()
    rest = total - int(base.sum())
    if rest:
        # ties broken by position; the fractional parts decide which sources get one more
        order = sorted(range(len(weights)), key=lambda j: (-(float(exact[j]) - int(base[j])), j))
        for j in order[:rest]:
            base[j] += 1
    return base.tolist()


class MixedStepBatchSampler(_StepSampler):
    """A deterministic weighted mix of several datasets (the role of open_clip's upsampling
    factors): the global batch of step ``s`` depends only on ``(seed, s)``, as with
    :class:`StepBatchSampler`, so resumption is exact and independent of the world size.

    Of the first ``s * global_batch`` samples, source ``j`` contributes ``mixed_counts`` —
    its weighted share within one sample — and walks its own sequence of seeded
    permutations (an epoch of a source ends when all its samples were drawn; a small
    source with a large weight is repeated, i.e. upsampled). The global batch is then
    shuffled (seeded by step) and rank ``r`` takes the ``r``-th of ``world`` slices.
    Indices are those of :class:`MixedSampleDataset` over the same datasets.
    """

    def __init__(self, sizes: list[int], weights: list[float], global_batch: int, seed: int, total_steps: int,
                 start_step: int = 0, rank: int = 0, world: int = 1):
        super().__init__(global_batch, seed, total_steps, start_step, rank, world)
        if len(sizes) != len(weights) or not sizes or any(w <= 0 for w in weights) or any(n <= 0 for n in sizes):
            raise ValueError(f"sizes {sizes} and weights {weights}: one positive weight per non-empty dataset")
        self.sizes, self.weights = list(sizes), list(weights)
        self.starts = [0]
        for n in sizes:
            self.starts.append(self.starts[-1] + n)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _draw(self, j: int, pos: int) -> int:
        epoch, i = divmod(pos, self.sizes[j])
        perm = self._perms.get((j, epoch))
        if perm is None:
            for key in [k for k in self._perms if k[0] == j]:
                del self._perms[key]
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + j) * 1_000_033 + epoch)
            perm = self._perms[(j, epoch)] = torch.randperm(self.sizes[j], generator=gen)
        return self.starts[j] + int(perm[i])

    def global_indices(self, step: int) -> list[int]:
        before = mixed_counts(self.weights, step * self.global_batch)
        after = mixed_counts(self.weights, (step + 1) * self.global_batch)
        out = [self._draw(j, pos) for j in range(len(self.sizes)) for pos in range(before[j], after[j])]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_777_777 + step)
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def loader_options(num_workers: int, pin_memory: bool | None = None, prefetch_factor: int | None = None) -> dict:
    """DataLoader keyword arguments for the host: ``pin_memory`` when CUDA is present (page-locked
    host batches, copied asynchronously by ``Batch.to(non_blocking=True)``; ``None`` = auto) and
    ``prefetch_factor`` batches in flight per worker (only with workers; ``None`` = PyTorch's 2)."""
    opts: dict = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory}
    if num_workers > 0 and prefetch_factor is not None:
        opts["prefetch_factor"] = prefetch_factor
    return opts


def make_loader(dataset: RegionSampleDataset | MixedSampleDataset, sampler: Sampler, num_workers: int = 0, seed: int = 0,
                pin_memory: bool | None = None, prefetch_factor: int | None = None) -> DataLoader:
    """Training batches with a fixed ROI dimension (the dataset's ``max_rois``); see
    :func:`loader_options` for ``pin_memory`` and ``prefetch_factor``."""
    # A private generator: creating the iterator must not consume the global RNG (exact resume).
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, max_rois=dataset.max_rois),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
        **loader_options(num_workers, pin_memory, prefetch_factor),
    )
