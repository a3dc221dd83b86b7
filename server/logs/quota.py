"""A task's log quota: which of its lines may be stored, given the bytes it holds and the limit.

No database: the caller asks how many bytes may still be stored, charges what it stores, and
stores the marker in place of the line that would pass the limit.
"""

from __future__ import annotations

QUOTA_MARKER = "log quota of %d bytes reached; later lines are dropped"
_NO_LIMIT = 1 << 62  # `room` without a quota: more than any batch can hold


class LogQuota:
    """The bytes of one task's log as a batch is charged to it.

    `limit` 0 means no quota. A batch stores its lines while their bytes fit in `room`; the line
    that would pass it is stored as `marker` instead (its seq must hold something, or the acked
    frontier could never pass it), and from then on the log is `full`: later lines are acked but
    not stored. `dropped` counts both.
    """

    __slots__ = ("limit", "used", "added", "dropped", "full", "marker")

    def __init__(self, limit: int, used: int):
        self.limit = limit
        self.used = used  # the task's log_bytes so far, then after each charge
        self.added = 0  # bytes charged by this batch
        self.dropped = 0
        self.full = bool(limit) and used >= limit
        self.marker = QUOTA_MARKER % limit

    @property
    def room(self) -> int:
        """The bytes that may still be stored (0 once full)."""
        if not self.limit:
            return _NO_LIMIT
        return 0 if self.full else self.limit - self.used

    def charge(self, size: int) -> None:
        """`size` bytes stored (at most `room`)."""
        self.used += size
        self.added += size

    def overflow(self) -> None:
        """The next line would pass the limit: the marker is stored in its place, the log is full."""
        size = len(self.marker)
        self.used = max(self.used + size, self.limit)
        self.added += size
        self.dropped += 1
        self.full = True

    def drop(self, n: int) -> None:
        """`n` lines that come after the log is full: acked, not stored."""
        self.dropped += n
