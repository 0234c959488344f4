"""Overlaps between built datasets (or between the splits of one): exact and perceptual-hash matches."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from regionmed.apps.curation.images import phash, sha256
from regionmed.apps.curation.splits import near_duplicate_pairs
from regionmed.data.shards import MedRegionDataset, read_manifest


@dataclass
class ImageKey:
    dataset: str
    id: str
    split: str
    sha256: str
    phash: int


def image_keys(root: str | Path, label: str | None = None, progress: bool = True) -> Iterator[ImageKey]:
    """One key per sample of every split; hashes from the record, or computed when absent."""
    root = Path(root)
    manifest = read_manifest(root)
    for split in manifest["splits"]:
        ds = MedRegionDataset(root, split)
        try:
            for i in tqdm(range(len(ds)), desc=f"read {root.name}/{split}", unit="rec", disable=not progress, leave=False):
                rec = ds.record(i)
                sha, ph = rec.get("sha256"), rec.get("phash")
                if not sha or not ph:
                    entry = ds._entries[i]
                    raw = ds._read(entry.shard, entry.image_offset, entry.image_size)
                    sha = sha or sha256(raw)
                    ph = ph or f"{phash(Image.open(io.BytesIO(raw))):016x}"
                yield ImageKey(label or str(root), rec["id"], split, sha, int(ph, 16))
        finally:
            ds.close()


def find_overlaps(a: str | Path, b: str | Path | None = None, threshold: int = 4) -> list[dict]:
    """Overlaps between datasets ``a`` and ``b`` (any splits), or, with ``b`` None,
    between different splits of ``a``. Each: ``{"kind": "exact"|"near", "distance",
    "a_id", "a_split", "b_id", "b_split"}``."""
    keys_a = list(image_keys(a, "A"))
    keys_b = list(image_keys(b, "B")) if b is not None else []
    keys = keys_a + keys_b
    n_a = len(keys_a)

    def crosses(i: int, j: int) -> bool:
        if b is not None:
            return (i < n_a) != (j < n_a)
        return keys[i].split != keys[j].split

    out: list[dict] = []
    seen: set[tuple[int, int]] = set()
    by_sha: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_sha.setdefault(k.sha256, []).append(i)
    for members in by_sha.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                if crosses(i, j):
                    seen.add((i, j))
                    out.append(_row("exact", 0, keys[i], keys[j]))
    for i, j in near_duplicate_pairs([k.phash for k in keys], threshold):
        if (i, j) in seen or not crosses(i, j):
            continue
        out.append(_row("near", (keys[i].phash ^ keys[j].phash).bit_count(), keys[i], keys[j]))
    out.sort(key=lambda r: (r["kind"] != "exact", r["distance"], r["a_id"], r["b_id"]))
    return out


def _row(kind: str, dist: int, x: ImageKey, y: ImageKey) -> dict:
    if x.dataset == "B" and y.dataset == "A":
        x, y = y, x
    return {"kind": kind, "distance": dist, "a_id": x.id, "a_split": x.split, "b_id": y.id, "b_split": y.split}
