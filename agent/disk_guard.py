"""The free-disk guard: every DISK_CHECK_S, evict the LRU cache when short (only while no task
could be using it) and refuse new tasks, with the reason sent on each poll, while still short.

The check runs in the jobs thread (it walks the cache); its result is applied in the main thread.
"""

from __future__ import annotations

import logging

log = logging.getLogger("agent.supervisor")

DISK_CHECK_S = 5.0


class DiskGuard:
    def __init__(self, engine):
        self.engine = engine
        self.refusal = ""  # why no task is taken now; "" while there is room
        self.next_at = 0.0
        self.pending = False

    def due(self, now: float) -> bool:
        """True (and the next check scheduled) when a check should be started now."""
        if self.pending or now < self.next_at:
            return False
        self.pending = True
        self.next_at = now + DISK_CHECK_S
        return True

    def check(self, config, evict: bool) -> dict:
        """{free_mb, ok, reason}; short and `evict`: evict the cache first. Blocking (jobs thread)."""
        status = self.engine.disk_status(config)
        if not status["ok"] and evict:
            freed = self.engine.free_disk(config)
            if freed.get("evicted"):
                log.warning(
                    "disk short: evicted %s cache entries (%.0f MB)",
                    freed["evicted"],
                    freed.get("freed_bytes", 0) / 2**20,
                )
            status = self.engine.disk_status(config)
        return status

    def apply(self, status: dict) -> bool:
        """Main thread: take a check's result; True if the refusal changed."""
        self.pending = False
        reason = "" if status["ok"] else status["reason"]
        if reason == self.refusal:
            return False
        if reason:
            log.warning("refusing new tasks: %s", reason)
        else:
            log.info("disk space is back (%.0f MB free): taking tasks again", status["free_mb"])
        self.refusal = reason
        return True
