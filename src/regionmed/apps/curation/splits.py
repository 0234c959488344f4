"""Split assignment: by group (patient), with near-duplicate images kept together.

Items that share a group key, or whose perceptual hashes are within
``threshold`` bits, form one component (union–find). A component takes the most
held-out official split among its members (test > val > train), so a test image
never has a near-duplicate in train; components without an official split are
placed by a salted hash of their smallest group key (deterministic, independent
of input order and worker count).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from regionmed.apps.curation.images import NEAR_DUP_THRESHOLD, PHASH_BITS

RANK = {"train": 0, "val": 1, "test": 2}


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        return True


def near_duplicate_pairs(hashes: list[int], threshold: int, bits: int = PHASH_BITS) -> list[tuple[int, int]]:
    """All pairs ``(i, j)``, ``i < j``, whose ``bits``-bit hashes differ in at most ``threshold``
    bits, sorted. Exact, by multi-index hashing: the bits are dealt round-robin into
    ``threshold + 1`` chunks, two hashes within ``threshold`` bits agree on at least one chunk
    (pigeonhole), so only items sharing a chunk value are compared (vectorised, numpy).
    ``threshold < 0`` gives no pairs; a hash wider than ``bits`` raises ``OverflowError``."""
    n = len(hashes)
    if n < 2 or threshold < 0:
        return []
    nbytes = (bits + 7) // 8
    packed = np.frombuffer(b"".join(int(h).to_bytes(nbytes, "big") for h in hashes), dtype=np.uint8).reshape(n, nbytes)
    if threshold >= bits:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    unpacked = np.unpackbits(packed, axis=1)[:, nbytes * 8 - bits:]
    words = np.zeros((n, -(-nbytes // 8) * 8), dtype=np.uint8)  # popcounts on 64-bit words
    words[:, : nbytes] = packed
    words = words.view(np.uint64)
    found: list[np.ndarray] = []
    n_chunks = threshold + 1
    for c in range(n_chunks):
        keys = np.packbits(unpacked[:, c::n_chunks], axis=1)
        _, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        order = np.argsort(inverse, kind="stable")
        for members in np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1):
            if len(members) > 1:
                found.append(_close_pairs(np.sort(members), words, threshold))
        if len(found) > 1:
            found = [np.unique(np.concatenate(found))]  # a pair found in several chunks is kept once
    if not found:
        return []
    codes = np.unique(np.concatenate(found))
    return [(int(c // n), int(c % n)) for c in codes]


def _close_pairs(members: np.ndarray, words: np.ndarray, threshold: int) -> np.ndarray:
    """Codes ``i * n + j`` of the pairs of ``members`` (sorted indices) within ``threshold`` bits
    (``words``: (n, k) uint64, the hashes)."""
    n = words.shape[0]
    sub = words[members]
    m = len(members)
    block = max(1, (1 << 24) // max(1, m * sub.shape[1]))
    out = []
    for r0 in range(0, m, block):
        rows = sub[r0 : r0 + block]
        dist = np.bitwise_count(rows[:, None, :] ^ sub[None, :, :]).sum(-1, dtype=np.int64)
        ri, cj = np.nonzero(dist <= threshold)
        ri = ri + r0
        keep = cj > ri
        out.append(members[ri[keep]].astype(np.int64) * n + members[cj[keep]])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class SplitResult:
    splits: list[str]
    components: int
    near_dup_links: int  # unions made by near-duplicate hashes (not already grouped)
    moved: int  # items whose official split was made stricter by their component


def _bucket(key: str, salt: str, ratios: tuple[float, float, float]) -> str:
    u = int(hashlib.sha256(f"{salt}\x00{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if u < ratios[0]:
        return "train"
    if u < ratios[0] + ratios[1]:
        return "val"
    return "test"


def assign_splits(
    groups: list[str],
    hashes: list[int],
    official: list[str | None],
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    threshold: int = NEAR_DUP_THRESHOLD,
    salt: str = "regionmed-split-v1",
) -> SplitResult:
    """The split of every item: ``groups[i]`` (hashed patient key, or the item's own id),
    ``hashes[i]`` (:func:`~regionmed.apps.curation.images.phash`), ``official[i]`` (the
    source's split or None). Items sharing a group, or with hashes within ``threshold``
    bits (-1: no near-duplicate linking), form one component; see the module docstring."""
    n = len(groups)
    uf = UnionFind(n)
    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        if g in first:
            uf.union(first[g], i)
        else:
            first[g] = i
    links = 0
    if threshold >= 0:
        first_of_hash: dict[int, int] = {}
        for i, h in enumerate(hashes):  # identical hashes: linked without comparing every pair
            if h in first_of_hash:
                links += uf.union(first_of_hash[h], i)
            else:
                first_of_hash[h] = i
        reps = list(first_of_hash.values())
        for a, b in near_duplicate_pairs([hashes[i] for i in reps], threshold):
            links += uf.union(reps[a], reps[b])
    comp_split: dict[int, str | None] = {}
    comp_key: dict[int, str] = {}
    for i in range(n):
        r = uf.find(i)
        if official[i] is not None:
            cur = comp_split.get(r)
            comp_split[r] = official[i] if cur is None or RANK[official[i]] > RANK[cur] else cur
        else:
            comp_split.setdefault(r, None)
        comp_key[r] = min(comp_key.get(r, groups[i]), groups[i])
    out = []
    moved = 0
    for i in range(n):
        r = uf.find(i)
        s = comp_split[r] or _bucket(comp_key[r], salt, ratios)
        if official[i] is not None and s != official[i]:
            moved += 1
        out.append(s)
    return SplitResult(out, len(comp_key), links, moved)
