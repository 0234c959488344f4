"""A feature cache for locked towers: what a frozen tower outputs, computed once.

Locking a tower (LiT, Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning",
CVPR 2022; open_clip's ``--lock-image`` / ``--lock-text``) keeps it fixed: in eval mode
(BatchNorm statistics and dropout frozen) and out of every optimiser group. Its outputs on
a dataset are then a function of the weights, the data and the preprocessing only, so
they can be computed once and read back at every step; what trains on top of them (the
projections, the grid head, the ROI processor, the temperature) costs a fraction of a
tower pass. regionmed has no data augmentation, so training from the cache is the same
computation as training through the locked towers (tested to float tolerance).

What is cached:

* :class:`ImageFeatureCache` — per sample of one split: the image tower's pooled feature
  ``(C,)``, its feature grid ``(C, h, w)`` (before the grid head, which may train) and, in
  ``crop`` mode, the pooled feature of each ROI crop ``(n_i, C)``: exactly what
  :meth:`RegionMedCLIP.encode_image <regionmed.model.clip.RegionMedCLIP.encode_image>`
  takes as :class:`~regionmed.model.clip.ImageFeatures`. A sample that cannot be read is
  recorded with its reason and raises the same :class:`~regionmed.data.shards.SampleError`
  when read back, so the readers' bad-sample rules apply unchanged.
* :class:`TextFeatureCache` — per distinct text: the text tower's pooled feature ``(W,)``.

Keys. A cache lives in ``<cache dir>/<kind>-<key>/``; the key is a SHA-256 of everything
the features depend on: the cache format, the tower's config and a digest of its weights
(:func:`module_digest`), the preprocessing, and the dataset's identity (the manifest's
entry for the split and each shard file's size and modification time,
:func:`split_identity`) or the texts. Any change gives another key, so stale features
are never read.

On disk. Rows are written in chunks of ``chunk_rows``, each one safetensors file written
to a temporary name and renamed (:func:`regionmed.io.write_bytes_atomic`): a build that is
killed leaves whole chunks only, and the next build makes just the missing ones
(resumable). ``complete.json`` is written last. Builders of one key serialise on a lock
file; data-parallel ranks build disjoint chunks. The size is bounded: the estimate for a
new cache must fit ``max_bytes``, and other caches in the same folder are removed, least
recently used first, until everything fits (:func:`prune`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from regionmed.data.shards import SampleError
from regionmed.errors import RegionmedError
from regionmed.io import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "FeatureCacheError", "ImageFeatureCache", "TextFeatureCache", "module_digest", "prune",
           "split_identity"]

CACHE_FORMAT = 1
COMPLETE = "complete.json"
LOCK = ".lock"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class FeatureCacheError(RegionmedError, RuntimeError):
    """A feature cache that cannot be built or read (no room within its size bound, a damaged chunk)."""


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's parameters and buffers: names, dtypes, shapes and bytes, in
    name order. Two modules with the same digest compute the same function (same class)."""
    h = hashlib.sha256()
    for name, t in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim buffers too
    return h.hexdigest()


def split_identity(dataset) -> dict:
    """What identifies the bytes of one split of a :class:`~regionmed.data.shards.MedRegionDataset`:
    its manifest entry (shard names and counts) and each shard file's size and modification
    time (``os.stat``; a rewritten shard changes them)."""
    entry = {k: v for k, v in dataset.info.items() if k != "stats"}
    shards = []
    for path in dataset.shard_paths:
        st = path.stat()
        shards.append([path.name, st.st_size, st.st_mtime_ns])
    return {"root": str(Path(dataset.root).resolve()), "split": dataset.split, "entry": entry, "shards": shards}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:20]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prune(root: Path, keep: Path, need: int, max_bytes: int) -> list[Path]:
    """Remove whole cache folders under ``root`` other than ``keep``, least recently used first
    (the modification time of their ``complete.json``, or of the folder), until the caches
    in ``root`` plus ``need`` more bytes fit ``max_bytes``. Returns the folders removed."""
    removed = []
    others = [p for p in root.iterdir() if p.is_dir() and p != keep and not p.name.startswith(".")] if root.is_dir() else []
    sizes = {p: folder_bytes(p) for p in others}
    total = sum(sizes.values()) + (folder_bytes(keep) if keep.is_dir() else 0)

    def last_used(p: Path) -> float:
        done = p / COMPLETE
        return (done if done.is_file() else p).stat().st_mtime

    for p in sorted(others, key=last_used):
        if total + need <= max_bytes:
            break
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(p)
            removed.append(p)
            total -= sizes[p]
    return removed


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder/.lock`` (released when the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ImageFeatureCache:
    """The locked image tower's outputs for every sample of one split (see the module text).

    ``root``: the cache folder (caches of several keys live side by side); ``key_parts``:
    what the features depend on (:func:`cache_key`); ``n``: the split's sample count.
    :meth:`build` fills it, :meth:`row` reads one sample back."""

    kind = "image"

    def __init__(self, root: str | Path, key_parts: dict, n: int, chunk_rows: int = 256, dtype: str = "float16",
                 max_bytes: int | None = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.root = Path(root)
        self.key = cache_key({"kind": self.kind, "dtype": dtype, "chunk_rows": chunk_rows, **key_parts})
        self.folder = self.root / f"{self.kind}-{self.key}"
        self.n, self.chunk_rows, self.dtype, self.max_bytes = n, chunk_rows, DTYPES[dtype], max_bytes
        self._chunks: dict[int, dict[str, torch.Tensor]] = {}
        self._bad: dict[int, list[str]] | None = None

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_rows - 1) // self.chunk_rows

    def chunk_path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:05d}.safetensors"

    def is_complete(self) -> bool:
        return (self.folder / COMPLETE).is_file()

    def build(self, encode: Callable[[Sequence[int]], tuple[list[dict | None], list[tuple[int, str, str]]]],
              rank: int = 0, world: int = 1, progress: Callable[[int], None] | None = None) -> None:
        """Compute the chunks this rank owns (``c % world == rank``) that are not on disk yet.

        ``encode(rows)`` returns, per row, ``{"pooled": (C,), "grid": (C, h, w), "crops":
        (n, C) or None}`` or None for a sample that cannot be read, plus the list of those
        as ``(row, where, reason)``. ``progress(k)`` is called with the rows done. Rank 0
        writes ``complete.json`` once every chunk exists (call :meth:`finish` after a barrier
        under data parallelism). Raises :class:`FeatureCacheError` when the cache cannot fit
        ``max_bytes``."""
        mine = [c for c in range(self.n_chunks) if c % world == rank and not self.chunk_path(c).is_file()]
        if not mine:
            return
        with _locked(self.folder):
            for c in mine:
                if self.chunk_path(c).is_file():  # another builder made it while we waited
                    continue
                rows = list(range(c * self.chunk_rows, min(self.n, (c + 1) * self.chunk_rows)))
                feats, bad = encode(rows)
                if c == mine[0]:
                    self._check_room(feats, rank)
                write_bytes_atomic(self.chunk_path(c), save(self._pack(feats), metadata=self._meta(rows, bad)))
                if progress:
                    progress(len(rows))

    def _check_room(self, feats: list[dict | None], rank: int) -> None:
        if self.max_bytes is None:
            return
        one = next((f for f in feats if f is not None), None)
        if one is None:
            return
        per_row = sum(t.numel() for t in (one["pooled"], one["grid"], *([one["crops"]] if one["crops"] is not None else [])))
        need = int(per_row * self.n * torch.finfo(self.dtype).bits // 8 * 1.05)
        if need > self.max_bytes:
            raise FeatureCacheError(
                f"the image feature cache of this split needs about {need / 2**30:.2f} GiB (≈{per_row} values x {self.n} samples), "
                f"more than its bound of {self.max_bytes / 2**30:.2f} GiB: raise train.lock.cache_max_gb, lower "
                "model.image.image_size, or set train.lock.cache false")
        if rank == 0:
            for p in prune(self.root, self.folder, need, self.max_bytes):
                log.info("feature cache: removed %s (least recently used) to stay within %.2f GiB", p, self.max_bytes / 2**30)

    def _pack(self, feats: list[dict | None]) -> dict[str, torch.Tensor]:
        ok = [f for f in feats if f is not None]
        if not ok:
            return {"present": torch.zeros(len(feats), dtype=torch.bool)}
        c, grid_shape = ok[0]["pooled"].shape[0], tuple(ok[0]["grid"].shape)
        pooled = torch.zeros(len(feats), c, dtype=self.dtype)
        grid = torch.zeros(len(feats), *grid_shape, dtype=self.dtype)
        counts = torch.zeros(len(feats), dtype=torch.long)
        crops = []
        for i, f in enumerate(feats):
            if f is None:
                continue
            pooled[i], grid[i] = f["pooled"].to(self.dtype), f["grid"].to(self.dtype)
            if f["crops"] is not None:
                counts[i] = f["crops"].shape[0]
                crops.append(f["crops"].to(self.dtype))
        out = {"present": torch.tensor([f is not None for f in feats]), "pooled": pooled, "grid": grid, "crop_counts": counts}
        if crops:
            out["crops"] = torch.cat(crops)
        return out

    @staticmethod
    def _meta(rows: list[int], bad: list[tuple[int, str, str]]) -> dict[str, str]:
        return {"first_row": str(rows[0]), "rows": str(len(rows)),
                "bad": json.dumps([[r, w, why] for r, w, why in bad])}

    def finish(self) -> None:
        """Write ``complete.json`` (after every rank built its chunks); raises
        :class:`FeatureCacheError` naming the missing chunks."""
        missing = [c for c in range(self.n_chunks) if not self.chunk_path(c).is_file()]
        if missing:
            raise FeatureCacheError(f"{self.folder}: chunk(s) {missing[:5]} are missing after the build")
        write_json_atomic(self.folder / COMPLETE, {"format": CACHE_FORMAT, "key": self.key, "rows": self.n,
                                                   "chunks": self.n_chunks, "bytes": folder_bytes(self.folder),
                                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def touch(self) -> None:
        """Mark the cache as used now (its ``complete.json``'s time orders :func:`prune`)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.folder / COMPLETE)

    def _chunk(self, c: int) -> dict[str, torch.Tensor]:
        if c not in self._chunks:
            path = self.chunk_path(c)
            try:
                tensors = load_file(str(path))
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise FeatureCacheError(f"{path}: cannot be read ({err}); remove the folder {self.folder} to rebuild it") from err
            if "crop_counts" in tensors:
                tensors["crop_starts"] = torch.cumsum(tensors["crop_counts"], 0) - tensors["crop_counts"]
            self._chunks[c] = tensors
        return self._chunks[c]

    def bad_rows(self) -> dict[int, list[str]]:
        """``{row: [where, reason]}`` of the samples that could not be read when the cache was built."""
        if self._bad is None:
            from safetensors import safe_open

            self._bad = {}
            for c in range(self.n_chunks):
                with safe_open(str(self.chunk_path(c)), framework="pt") as fh:
                    for r, w, why in json.loads((fh.metadata() or {}).get("bad", "[]")):
                        self._bad[int(r)] = [w, why]
        return self._bad

    def row(self, i: int) -> dict[str, torch.Tensor | None]:
        """Sample ``i``'s features (float32): ``{"pooled", "grid", "crops"}``. Raises the
        :class:`SampleError` the sample raised when the cache was built, if it could not be read."""
        c, j = divmod(i, self.chunk_rows)
        t = self._chunk(c)
        if not bool(t["present"][j]):
            where, why = self.bad_rows().get(i, [f"row {i}", "unreadable when the feature cache was built"])
            raise SampleError(where, why)
        crops = None
        if "crops" in t:
            s, k = int(t["crop_starts"][j]), int(t["crop_counts"][j])
            crops = t["crops"][s : s + k].float()
        return {"pooled": t["pooled"][j].float(), "grid": t["grid"][j].float(), "crops": crops}


class TextFeatureCache:
    """The locked text tower's pooled feature of every distinct text (see the module text):
    built for a list of texts at once, read by :meth:`lookup`. Texts outside the list are
    encoded by the tower when met (``encode``) and kept in memory."""

    kind = "text"

    def __init__(self, root: str | Path, key_parts: dict, texts: Sequence[str], dtype: str = "float16"):
        self.root = Path(root)
        unique = sorted(set(texts))
        digest = hashlib.sha256("\x00".join(unique).encode("utf-8", "surrogatepass")).hexdigest()
        self.key = cache_key({"kind": self.kind, "dtype": dtype, "texts": digest, **key_parts})
        self.folder = self.root / f"{self.kind}-{self.key}"
        self.texts, self.dtype = unique, DTYPES[dtype]
        self.row_of = {t: i for i, t in enumerate(unique)}
        self.features: torch.Tensor | None = None
        self.extra: dict[str, torch.Tensor] = {}

    def build(self, encode: Callable[[list[str]], torch.Tensor], batch: int = 256,
              progress: Callable[[int], None] | None = None) -> None:
        """Encode every text (``encode(texts) -> (n, W)``) unless the cache is on disk; then load it."""
        path = self.folder / "texts.safetensors"
        with _locked(self.folder):
            if not path.is_file():
                parts = []
                for s in range(0, len(self.texts), batch):
                    parts.append(encode(self.texts[s : s + batch]).detach().to("cpu", self.dtype))
                    if progress:
                        progress(len(parts[-1]))
                feats = torch.cat(parts) if parts else torch.zeros(0, 0, dtype=self.dtype)
                write_bytes_atomic(path, save({"features": feats}))
                write_json_atomic(self.folder / COMPLETE, {"format": CACHE_FORMAT, "key": self.key, "texts": len(self.texts)})
        self.features = load_file(str(path))["features"]

    def lookup(self, texts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """(N, W) float32 features of ``texts``; a text the cache does not hold is encoded once with ``encode``."""
        if self.features is None:
            raise FeatureCacheError(f"{self.folder}: the text feature cache was not built")
        new = [t for t in dict.fromkeys(texts) if t not in self.row_of and t not in self.extra]
        if new:
            for t, f in zip(new, encode(new).detach().to("cpu", torch.float32)):
                self.extra[t] = f
        rows = [self.features[self.row_of[t]].float() if t in self.row_of else self.extra[t] for t in texts]
        return torch.stack(rows) if rows else torch.zeros(0, self.features.shape[1])
