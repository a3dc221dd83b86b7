"""The one retry delay: exponential with a cap and +-50 % jitter, so many nodes never retry in step."""

from __future__ import annotations

import random


def backoff_delay(failures: int, base: float = 0.2, cap: float = 5.0, rng=random.uniform) -> float:
    """Seconds to wait after `failures` consecutive failures (1 -> about `base`, doubling to about `cap`)."""
    n = max(1, int(failures))
    return min(cap, base * 2 ** min(n - 1, 62)) * rng(0.5, 1.5)
