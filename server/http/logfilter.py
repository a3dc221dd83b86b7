"""A logging filter that lets through at most N identical messages per minute.

Out of file descriptors, uvicorn's accept loop fails on every connection attempt and asyncio
logs each failure with a traceback ("socket.accept() out of system resource"); a busy fleet
turned that into gigabytes of log in minutes. Records are identical when their logger, level and
message template match (the arguments may differ). The first message let through after a
quiet spell says how many were dropped.
"""

from __future__ import annotations

import logging
import threading
import time

# Where accept errors are logged: asyncio's event loop (uvloop's too) and uvicorn's server.
NOISY_LOGGERS = ("asyncio", "uvicorn.error")


class RateLimitFilter(logging.Filter):
    """At most `burst` records per (logger, level, template) per `period` seconds."""

    def __init__(self, burst: int = 5, period: float = 60.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self._seen: dict[tuple, list] = {}  # key -> [window start, let through, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            w = self._seen.get(key)
            if w is None or now - w[0] >= self.period:
                dropped = w[2] if w is not None else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 1000:  # many distinct messages: forget the old windows
                    self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.period}
                if dropped:  # the suffix has no '%', so the record's own formatting is unchanged
                    record.msg = f"{record.msg} [{dropped} more like this not logged in the last {self.period:g} s]"
                return True
            if w[1] < self.burst:
                w[1] += 1
                return True
            w[2] += 1
            return False


def install(burst: int = 5, period: float = 60.0) -> RateLimitFilter:
    """Put one RateLimitFilter on the loggers that report accept errors (once per process)."""
    for name in NOISY_LOGGERS:
        for f in logging.getLogger(name).filters:
            if isinstance(f, RateLimitFilter):
                return f
    f = RateLimitFilter(burst, period)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).addFilter(f)
    return f
