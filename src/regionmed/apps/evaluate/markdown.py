"""Number formatting of the Markdown reports (``report.md`` of ``regionmed eval`` and ``regionmed ablate``)."""

from __future__ import annotations

import math


def pct(x) -> str:
    """``x`` (a share in [0, 1]) as a percentage with one decimal; ``–`` for None or NaN."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def with_ci(d: dict | None, key: str = "value") -> str:
    """``d[key]`` as a percentage with its ``ci`` (``[lo–hi]``) when there is one."""
    if not d or d.get(key) is None:
        return "–"
    lo, hi = d.get("ci", [None, None])
    ci = f" [{pct(lo)}–{pct(hi)}]" if lo is not None else ""
    return f"{pct(d[key])}{ci}"


def rate_ci(o: dict, key: str) -> str:
    """``o[key]`` as a percentage with its bootstrap interval from ``o["intervals"]`` when there is one."""
    ci = (o.get("intervals") or {}).get(key)
    if o.get(key) is None:
        return "–"
    return f"{pct(o[key])} [{pct(ci[0])}–{pct(ci[1])}]" if ci and ci[0] is not None else pct(o[key])
