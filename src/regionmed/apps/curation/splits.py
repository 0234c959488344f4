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
from collections import defaultdict
from dataclasses import dataclass

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


def near_duplicate_pairs(hashes: list[int], threshold: int, bits: int = 64):
    """Pairs ``(i, j)`` with Hamming distance ``<= threshold`` (multi-index hashing:
    split the hash into ``threshold + 1`` chunks; a near pair shares one chunk exactly)."""
    n_chunks = threshold + 1
    size = -(-bits // n_chunks)
    seen: set[tuple[int, int]] = set()
    for c in range(n_chunks):
        shift = c * size
        mask = (1 << min(size, bits - shift)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            buckets[(h >> shift) & mask].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            for x in range(len(members)):
                hx = hashes[members[x]]
                for y in range(x + 1, len(members)):
                    i, j = members[x], members[y]
                    if (i, j) in seen:
                        continue
                    if (hx ^ hashes[j]).bit_count() <= threshold:
                        seen.add((i, j))
                        yield i, j


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
    threshold: int = 4,
    salt: str = "regionmed-split-v1",
) -> SplitResult:
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
        for i, j in near_duplicate_pairs(hashes, threshold):
            links += uf.union(i, j)
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
