"""Wall-clock timing shared by the benchmarks (no torch, no bitsandbytes import: any side can use it)."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall time in seconds of `fn()` (which must block on its result) after one warm-up call
    (which compiles any jitted function)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
