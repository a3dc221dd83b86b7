"""What changed under a task's results/ while its container runs: inotify on a capped number of
folders, else a periodic scan.

Every inotify watch is one of the host's `fs.inotify.max_user_watches`, which all of root's
processes share; a recursive watch holds one per folder the task makes, so a task making 20,000
folders took 20,000 watches. Here one inotify instance watches at most `cap` folders; a task that
makes more switches this watch to scanning: the instance is closed (every watch released at once)
and the uploader walks results/ every few seconds instead, skipping the files it already has.

The watches are inotify_simple's (a literal wrapper of the kernel's calls): watchdog, which the
design card names, watches a tree recursively with no cap, so it cannot give this bound
(tests/security/test_result_attacks.py counts the agent's watches with 2,000 folders). A watch is
added through /proc/self/fd of a folder opened by workers/safefs.py, so no path the task controls
is resolved by name (a folder swapped for a link to a host folder is never watched).
"""

from __future__ import annotations

import os

from inotify_simple import INotify
from inotify_simple import flags as F

from workers import safefs

WATCH_DIRS = 256  # most folders of one task's results/ watched at once
MASK = F.CLOSE_WRITE | F.MOVED_TO | F.CREATE | F.ONLYDIR


class ResultsWatch:
    """Paths under results/ that were closed after writing, created or moved in.

    `changes()` drains what the kernel queued, without blocking: [(rel, is_dir)]. After
    `scanning` turns true it returns nothing more and holds no watch; the caller scans."""

    def __init__(self, root_fd: int, cap: int = WATCH_DIRS):
        self.root_fd = root_fd
        self.cap = cap
        self.dirs: dict[int, str] = {}  # watch descriptor -> folder, relative ("" is results/)
        self.scanning = False
        self.why = ""
        self.overflowed = False  # events were lost: the caller scans once
        self.inotify: INotify | None = None
        try:
            self.inotify = INotify(nonblocking=True)
        except OSError as e:
            self._fall_back(f"no inotify instance ({e.strerror})")
            return
        self.add_tree("")

    @property
    def held(self) -> int:
        return len(self.dirs)

    def _fall_back(self, why: str) -> None:
        self.scanning, self.why = True, why
        self.close()

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()  # releases every watch at once
            self.inotify = None
        self.dirs.clear()

    def add_tree(self, rel: str) -> None:
        """Watch the folder `rel` and every folder below it, while under the cap."""
        todo = [rel]
        while todo and not self.scanning:
            rel = todo.pop()
            try:
                d = safefs.open_rel_dir(self.root_fd, rel) if rel else os.dup(self.root_fd)
            except (OSError, safefs.Skipped):
                continue  # gone or not a real folder: nothing to watch
            try:
                if not self._add(d, rel):
                    return
                with os.scandir(d) as it:
                    todo.extend(f"{rel}/{e.name}" if rel else e.name for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
            finally:
                os.close(d)

    def _add(self, dir_fd: int, rel: str) -> bool:
        if self.held >= self.cap:
            self._fall_back(f"more than {self.cap} folders")
            return False
        try:
            wd = self.inotify.add_watch(f"/proc/self/fd/{dir_fd}", MASK)
        except OSError as e:
            self._fall_back(f"inotify_add_watch failed ({e.strerror})")
            return False
        self.dirs[wd] = rel  # a folder moved and added again keeps its wd: renamed here
        return True

    def changes(self) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        new_dirs: list[str] = []
        while self.inotify is not None:
            events = self.inotify.read(timeout=0)
            if not events:
                break
            for wd, mask, _cookie, name in events:
                if mask & F.Q_OVERFLOW:
                    self.overflowed = True
                    continue
                if mask & F.IGNORED:  # the folder is gone: its watch is released
                    self.dirs.pop(wd, None)
                    continue
                parent = self.dirs.get(wd)
                if parent is None or not name:
                    continue
                rel = f"{parent}/{name}" if parent else name
                if mask & F.ISDIR:
                    if mask & (F.CREATE | F.MOVED_TO):
                        new_dirs.append(rel)
                elif mask & (F.CLOSE_WRITE | F.MOVED_TO):
                    out.append((rel, False))
        for rel in new_dirs:
            # Files may have been written in it before its watch was added: the caller walks it.
            self.add_tree(rel)
            out.append((rel, True))
        return out
