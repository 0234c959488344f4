"""Overlaps between built datasets (or between the splits of one): exact and perceptual-hash
matches, and (within one dataset) patient groups found in more than one split."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD, PHASH_BITS, PHASH_HEX, phash_hex, sha256
from regionmed.apps.curation.splits import near_duplicate_pairs
from regionmed.data.decode import decode_image
from regionmed.data.shards import MedRegionDataset, read_manifest


@dataclass
class ImageKey:
    dataset: str
    id: str
    split: str
    sha256: str
    phash: int
    group: str = ""


def image_keys(root: str | Path, label: str | None = None, progress: bool = True) -> Iterator[ImageKey]:
    """One key per sample of every split; hashes from the record, or computed from the stored
    image when absent or of another width than :data:`~regionmed.apps.curation.images.PHASH_HEX`
    (a dataset built before the hash became 256-bit)."""
    root = Path(root)
    manifest = read_manifest(root)
    for split in manifest["splits"]:
        ds = MedRegionDataset(root, split)
        try:
            for i in tqdm(range(len(ds)), desc=f"read {root.name}/{split}", unit="rec", disable=not progress, leave=False):
                rec = ds.record(i)
                sha, ph = rec.get("sha256"), rec.get("phash")
                if not sha or not ph or len(ph) != PHASH_HEX:
                    raw = ds.image_bytes(i)
                    sha = sha or sha256(raw)
                    ph = phash_hex(decode_image(raw, exif_orientation=False, where=ds.where(i))[0])
                yield ImageKey(label or str(root), rec["id"], split, sha, int(ph, 16), str(rec.get("group") or ""))
        finally:
            ds.close()


def find_overlaps(a: str | Path, b: str | Path | None = None, threshold: int = NEAR_DUP_THRESHOLD) -> list[dict]:
    """Overlaps between datasets ``a`` and ``b`` (any splits), or, with ``b`` None,
    between different splits of ``a``. Each: ``{"kind": "exact"|"near"|"group", "distance",
    "a_id", "a_split", "b_id", "b_split"}``: ``exact`` same stored bytes, ``near`` perceptual
    hashes within ``threshold`` bits, ``group`` (one dataset only) two images of one patient
    group (the record's hashed ``group``) in different splits, one row per split pair of a
    group, naming its first image in each."""
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
    for i, j in near_duplicate_pairs([k.phash for k in keys], threshold, PHASH_BITS):
        if (i, j) in seen or not crosses(i, j):
            continue
        out.append(_row("near", (keys[i].phash ^ keys[j].phash).bit_count(), keys[i], keys[j]))
    if b is None:
        first_of: dict[str, dict[str, ImageKey]] = defaultdict(dict)
        for k in keys:
            if k.group:
                first_of[k.group].setdefault(k.split, k)
        for per_split in first_of.values():
            names = sorted(per_split)
            for x in range(len(names)):
                for y in range(x + 1, len(names)):
                    out.append(_row("group", 0, per_split[names[x]], per_split[names[y]]))
    out.sort(key=lambda r: (("exact", "near", "group").index(r["kind"]), r["distance"], r["a_id"], r["b_id"]))
    return out


def _row(kind: str, dist: int, x: ImageKey, y: ImageKey) -> dict:
    if x.dataset == "B" and y.dataset == "A":
        x, y = y, x
    return {"kind": kind, "distance": dist, "a_id": x.id, "a_split": x.split, "b_id": y.id, "b_split": y.split}
