"""Figures the benchmarks share: percentiles as numpy computes them, without numpy."""

from __future__ import annotations

from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(xs: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no samples."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def percentiles(xs: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """{"p50": ..., "p90": ..., "p99": ...}, each times `scale` (e.g. 1e3 for seconds to ms)."""
    return {f"p{p}": (None if (v := percentile(xs, p)) is None else v * scale) for p in PERCENTILES}
