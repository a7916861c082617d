"""The soak's arithmetic (tests/reliability/support_soak.py): windows and the 30-day line."""

from __future__ import annotations

import pytest

from .support_soak import MONTH_SECONDS, Sample, rss_in_30_days_kib, windows


def test_windows_take_median_min_and_max_of_their_own_samples():
    samples = [Sample(t, 1000 + (50_000 if t == 3 else 0), 10 + t % 2) for t in range(10)]
    ws = windows(samples, 5, 10)
    assert [(w.start, w.end) for w in ws] == [(0, 5), (5, 10)]
    assert (ws[0].rss_min_kib, ws[0].rss_median_kib, ws[0].rss_max_kib) == (1000, 1000, 51_000)  # one peak
    assert ws[1].fds_max == 11


def test_a_flat_footprint_extrapolates_to_itself_and_a_leak_to_its_line():
    flat = windows([Sample(t, 80 * 1024, 10) for t in range(0, 1800, 1)], 300, 1800)
    assert rss_in_30_days_kib(flat) == (0.0, 80 * 1024)
    # Warm-up in the first window only: not a trend.
    warm = windows([Sample(t, (60 if t < 300 else 80) * 1024, 10) for t in range(1800)], 300, 1800)
    assert rss_in_30_days_kib(warm) == (0.0, 80 * 1024)
    # 1 MiB a minute: 60 MiB an hour, carried on from the last window's middle.
    leak = windows([Sample(t, 80 * 1024 + t * 1024 // 60, 10) for t in range(1800)], 300, 1800)
    per_hour, month = rss_in_30_days_kib(leak)
    assert per_hour == pytest.approx(60 * 1024, rel=1e-3)
    assert month == pytest.approx(leak[-1].rss_median_kib + 1024 / 60 * (MONTH_SECONDS - 1650), rel=1e-3)
