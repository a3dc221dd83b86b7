"""results/ of one task, read safely.

Everything is read through workers/safefs.py: from a directory fd, without following links, each
file checked with fstat and hashed and uploaded from that same fd. A symlink, fifo, socket or
device anywhere under results/ is skipped with a line in the task log, and so is a sparse file
(its size on the server would be what its holes pretend, not what the node holds).
"""

from __future__ import annotations

import json
import os
import threading

from workers import safefs
from workers.errors import TaskError
from workers.uploads import Budget

MAX_JSON_BYTES = 64 << 20  # a result's meta.json or annotation
CONTAINER_RESULTS = "/sly_task_data/results"
SKIP_LOG_MAX = 100  # skipped paths logged one by one; the rest are counted
SPARSE_MIN = 1 << 20  # a file is sparse when over this and less than half of it is on disk


def stamp(st) -> int:
    """A compact fingerprint of a file's state: what says it is unchanged since it was read."""
    return hash((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))


def is_sparse(st) -> bool:
    return st.st_size > SPARSE_MIN and st.st_blocks * 512 < st.st_size // 2


def container_rel(path: str) -> str:
    """A results path as a task names it (`00000002`, `/sly_task_data/results/x`) -> relative."""
    if path == CONTAINER_RESULTS or path.startswith(CONTAINER_RESULTS + "/"):
        path = path[len(CONTAINER_RESULTS) :]
    return path.strip("/")


class ResultsDir:
    """results/ of one task, opened once without following links; skips are logged once each
    (the first SKIP_LOG_MAX of them: a task making a million links gets no million log lines)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.path = ctx.task_dir / "results"
        self.skipped: set[str] = set()
        self.unnamed_skips = 0
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.walked = self.unchanged = 0

    def open(self) -> ResultsDir:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = safefs.open_dir(self.path)
        except safefs.Skipped as s:
            raise TaskError(f"results/ {s}; refused") from None
        return self

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def skip(self, rel: str, reason: str, rule: str = "only regular files and folders are read") -> None:
        with self.lock:
            if rel in self.skipped:
                return
            if len(self.skipped) >= SKIP_LOG_MAX:
                self.unnamed_skips += 1
                if self.unnamed_skips > 1:
                    return
                message = f"results: more than {SKIP_LOG_MAX} paths skipped; the others are not named"
            else:
                self.skipped.add(rel)
                message = f"results: {rel} {reason}; skipped ({rule})"
        self.ctx.log(message, level="warning")

    def admit(self, files, budget: Budget, seen: dict | None = None, staged: dict | None = None):
        """The files worth reading, each new one counted against `budget`: a sparse file is
        skipped; with `seen` (path -> stamp() of what was posted), so is a file unchanged since.
        `staged` gets the stamp of every file let through (posted, they go into `seen`)."""
        for rel, f in files:
            self.walked += 1
            try:
                st = os.fstat(f.fileno())
                if is_sparse(st):
                    self.skip(
                        rel,
                        f"is sparse ({st.st_size} bytes, {st.st_blocks * 512} on disk)",
                        "its holes would be uploaded as bytes",
                    )
                    f.close()
                    continue
                key = stamp(st)
                old = None if seen is None else seen.get(rel)
                if old == key or (staged is not None and rel in staged):  # or twice in one batch
                    self.unchanged += 1
                    f.close()
                    continue
                if old is None:
                    budget.add_files()
                if staged is not None:
                    staged[rel] = key
            except BaseException:
                f.close()
                raise
            yield rel, f

    def files(self, rel: str = ""):
        """(path relative to `rel`, open file) for every regular file under results/<rel>."""
        if not rel:
            yield from safefs.walk_files(self.fd, self.skip)
            return
        d = safefs.open_rel_dir(self.fd, rel)
        try:
            yield from safefs.walk_files(d, lambda r, why: self.skip(f"{rel}/{r}", why))
        finally:
            os.close(d)

    def read_json(self, dir_fd: int, name: str, label: str):
        """A JSON file inside dir_fd; None when absent or skipped; TaskError when not JSON."""
        try:
            f = safefs.open_file(dir_fd, name)
        except FileNotFoundError:
            return None
        except safefs.Skipped as s:
            self.skip(label, str(s))
            return None
        with f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise TaskError(f"results: {label} is larger than {MAX_JSON_BYTES >> 20} MB")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise TaskError(f"results: {label} is not JSON ({e})") from None
