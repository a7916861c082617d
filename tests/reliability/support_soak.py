"""The soak's footprint: samples of a process grouped into windows, and a straight-line
extrapolation of its memory to 30 days.

The soak samples ``VmRSS`` and open fds once a second.  A window's median is what the
process holds in that window (a sweep's momentary peak does not move it); the first
window is the warm-up (imports settling, caches and pools filling), so the trend is
fitted from the second window on.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

MONTH_SECONDS = 30 * 86400


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the soak started
    rss_kib: int
    fds: int


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    rss_min_kib: int
    rss_median_kib: float
    rss_max_kib: int
    fds_max: int

    def line(self) -> str:
        return (
            f"  {self.start / 60:5.1f}-{self.end / 60:5.1f} min: RSS min {self.rss_min_kib / 1024:6.1f} "
            f"median {self.rss_median_kib / 1024:6.1f} max {self.rss_max_kib / 1024:6.1f} MiB, "
            f"open fds max {self.fds_max}"
        )


def windows(samples: list[Sample], width: float, total: float) -> list[Window]:
    """The samples in consecutive windows of ``width`` seconds up to ``total``; empty ones left out."""
    out = []
    start = 0.0
    while start < total - 1e-9:
        end = min(start + width, total)
        inside = [s for s in samples if start <= s.seconds < end]
        if inside:
            rss = [s.rss_kib for s in inside]
            out.append(Window(start, end, min(rss), statistics.median(rss), max(rss), max(s.fds for s in inside)))
        start = end
    return out


def slope_per_second(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points; 0 for fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def rss_in_30_days_kib(ws: list[Window]) -> tuple[float, float]:
    """(KiB per hour, KiB after 30 days): the windows' medians from the second on, fitted by a
    straight line and carried on to 30 days of the same traffic.  A straight line overstates a
    footprint that levels off, which is the safe side for a bound."""
    trend = ws[1:] if len(ws) > 2 else ws
    points = [((w.start + w.end) / 2, w.rss_median_kib) for w in trend]
    slope = slope_per_second(points)
    last_x, last_y = points[-1]
    return slope * 3600, last_y + max(0.0, slope) * (MONTH_SECONDS - last_x)
