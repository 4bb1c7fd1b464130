"""Shared by the benchmark scripts: the allocator settings of BENCH.md, and median timing."""

from __future__ import annotations

import os
import statistics
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "34359738368", "MALLOC_TRIM_THRESHOLD_": "68719476736",
          "MALLOC_TOP_PAD_": "1073741824"}


def reexec_with_allocator_settings() -> None:
    """glibc reads these at start-up: re-execute the script with them unless they are already set."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def median_time(fn, repeat: int) -> tuple[float, float, float]:
    """(median, min, max) seconds over `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def report(table: str, out: str | None) -> None:
    """Print a results table last and, when asked, append it to a results file (RESULTS.md)."""
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(table)
