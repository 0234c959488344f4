"""The source interface."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from regionmed.apps.curation.items import RawItem
from regionmed.errors import RegionmedError


class SourceError(RegionmedError, ValueError):
    """A source that cannot be read (missing folder or table, bad option)."""


class Source(ABC):
    """Iterates raw items of one dataset, in a deterministic order.

    ``limit`` keeps the first N items; ``repeat`` yields the whole list N times
    with ids suffixed ``~rK`` (for benchmarks).
    """

    name = "source"
    options: tuple[str, ...] = ()

    def __init__(self, root: str | Path, limit: int | None = None, repeat: int = 1, **options):
        self.root = Path(root)
        if not self.root.exists():
            raise SourceError(f"{self.name}: input folder {self.root} does not exist")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise SourceError(f"{self.name}: unknown option(s) {unknown}; known: {sorted(self.options)}")
        self.limit = limit
        self.repeat = max(1, int(repeat))
        self.opts = options

    @abstractmethod
    def _items(self) -> Iterator[RawItem]:
        """All items, in order."""

    def _count(self) -> int | None:
        return None

    def __iter__(self) -> Iterator[RawItem]:
        for k in range(self.repeat):
            items = self._items() if self.limit is None else itertools.islice(self._items(), self.limit)
            for item in items:
                if k:
                    item.id = f"{item.id}~r{k}"
                yield item

    def count(self) -> int | None:
        n = self._count()
        if n is None:
            return None
        if self.limit is not None:
            n = min(n, self.limit)
        return n * self.repeat
