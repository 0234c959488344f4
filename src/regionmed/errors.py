"""The one base exception of regionmed.

Every error that regionmed raises on purpose (bad configuration, a dataset or
record that cannot be read, weights that do not fit, a training run that cannot
go on, ...) derives from :class:`RegionmedError`, so an application can report
all of them the same way (``regionmed COMMAND: error: ...``, exit status 2) and
let anything else surface as the bug it is. Each subclass also derives from the
built-in exception that fits it (``ValueError`` for bad input, ``RuntimeError``
for a state that cannot go on), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["RegionmedError"]


class RegionmedError(Exception):
    """Base class of every error regionmed raises deliberately."""
