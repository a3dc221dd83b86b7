"""What the client's uploads and downloads share: the progress they report, in files and in bytes,
and running their batches a few at a time on threads (client/upload.py, client/download.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import NamedTuple

PARALLEL = 4  # bulk requests in flight at once (the CLI's --parallel)
MAX_PARALLEL = 32  # the client's connection pool holds this many


class Counts(NamedTuple):
    """Where a transfer stands: its stage ("hashing", "sending", "items", "receiving"), files and
    bytes done out of their totals, and what it is doing now. `bytes_total` is None while it is
    not known yet (a project's download learns its items' sizes a page at a time)."""

    stage: str
    files: int
    files_total: int
    nbytes: int
    bytes_total: int | None
    note: str = ""

    def fraction(self) -> float:
        """How much of the stage is done, 0..1: by bytes where their total is known, else by files."""
        if self.bytes_total:
            return min(1.0, self.nbytes / self.bytes_total)
        if self.files_total:
            return min(1.0, self.files / self.files_total)
        return 1.0


# progress(counts): called on every change (from the transfer's threads, one call at a time).
Progress = Callable[[Counts], None]


class Tally:
    """Counts of one transfer, added to from several threads, each change reported to a Progress."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.lock = threading.Lock()
        self.counts = Counts("", 0, 0, 0, 0)

    def stage(self, stage: str, files_total: int, bytes_total: int | None, note: str = "") -> None:
        """Start a stage: its counts go back to zero."""
        self._set(Counts(stage, 0, files_total, 0, bytes_total, note))

    def add(self, files: int = 0, nbytes: int = 0, note: str | None = None) -> None:
        with self.lock:
            c = self.counts
            self._report(
                c._replace(files=c.files + files, nbytes=c.nbytes + nbytes, note=c.note if note is None else note)
            )

    def totals(self, files_total: int | None = None, bytes_total: int | None = None) -> None:
        """Set the stage's totals (what a download learns as it goes)."""
        with self.lock:
            c = self.counts
            self._report(
                c._replace(
                    files_total=c.files_total if files_total is None else files_total,
                    bytes_total=c.bytes_total if bytes_total is None else bytes_total,
                )
            )

    def _set(self, counts: Counts) -> None:
        with self.lock:
            self._report(counts)

    def _report(self, counts: Counts) -> None:
        self.counts = counts
        if self.progress:
            self.progress(counts)


def run_all(jobs: Iterable[Callable[[], object]], parallel: int = PARALLEL) -> None:
    """Run jobs at most `parallel` at a time (and no more than 2 x parallel taken from `jobs` ahead);
    the first one that raises stops the others from starting, and its exception is raised."""
    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="sly-transfer") as pool:
        pending: set[Future] = set()
        try:
            for job in jobs:
                if len(pending) >= 2 * parallel:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(job))
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
