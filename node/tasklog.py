"""The durable per-task log: its file format, its writer (task process) and its cursors (log-shipper).

`tasks/<id>/logs/log_<ts>.txt` holds one JSON object per line, `{"seq": n, "ts", "level", "stream",
"message", ...}` (encoded and read as `protocol.logline` says), seqs 0, 1, 2... with no gap (as the server counts). Exactly one task process writes a task's file at a
time; a re-spawned one appends to the same file and continues the seqs. A line is complete only
with its newline: a writer killed mid-line leaves a partial tail, which the next writer cuts off
(the shipper never reads past the last newline, so that line was never sent).

The shipper's acked cursor `state/logs/<id>.cursor` ({"file", "offset", "seq"}) is replaced
atomically after each ack. `state/logs/active/<id>` registers a task with the shipper until its
final state is reported; `state/logs/<id>.closed` marks that report done.
"""
from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from pathlib import Path

from node.config import Config
from node.masking import Masker
from node.storage import log_state_dir, task_logs_dir
from protocol import logline

FSYNC_EVERY_S = 1.0


def find_log_file(config: Config, task_id: int) -> Path | None:
    """The task's existing durable log file, if any."""
    d = task_logs_dir(config, task_id)
    try:
        files = sorted(p for p in d.iterdir() if p.name.startswith("log_") and p.name.endswith(".txt"))
    except FileNotFoundError:
        return None
    return files[0] if files else None


def new_log_path(config: Config, task_id: int) -> Path:
    return task_logs_dir(config, task_id) / time.strftime("log_%Y-%m-%d_%H:%M:%S.txt", time.localtime())


def iter_lines_backwards(path: Path, chunk: int = 1 << 16):
    """Yield the file's complete lines (bytes, no newline) from the last to the first."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        tail = b""
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + tail
            parts = data.split(b"\n")
            tail = parts[0]
            for line in reversed(parts[1:]):
                if line:
                    yield line
        if tail:
            yield tail


def repair_tail(path: Path) -> None:
    """Cut a partial last line (a writer killed mid-write)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step)
            i = data.rfind(b"\n")
            if i >= 0:
                f.truncate(pos + i + 1)
                return
        f.truncate(0)


def last_seq(path: Path) -> int:
    """The seq of the file's last line that has one (a line that is not ours is passed over)."""
    for raw in iter_lines_backwards(path):
        try:
            return logline.seq_of(raw)
        except logline.BadLine:
            continue
    return -1


def last_cts(path: Path) -> int | None:
    """The last container timestamp (`cts`, ns) in the file, or None."""
    for raw in iter_lines_backwards(path):
        if b'"cts"' not in raw:
            continue
        try:
            return int(json.loads(raw)["cts"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


class TaskLogWriter:
    """Appends masked lines with seqs to the task's durable log. Thread-safe; one per task process."""

    def __init__(self, config: Config, task_id: int, masker: Masker):
        task_logs_dir(config, task_id).mkdir(parents=True, exist_ok=True)
        path = find_log_file(config, task_id)
        if path is None:
            path = new_log_path(config, task_id)
            path.touch()
        self.path = path
        # One writer per task file: a replaced task process waits here until its predecessor is gone.
        self._lockf = open(path.with_name(".writer.lock"), "w")
        fcntl.flock(self._lockf, fcntl.LOCK_EX)
        repair_tail(path)
        self.masker = masker
        self.seq = last_seq(path)
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")
        self._synced = 0.0     # monotonic time of the last fsync

    def _sync(self, force: bool = False) -> None:
        # flush() survives a crash of any process; fsync at most every FSYNC_EVERY_S bounds what a
        # power loss can take to about that much of the log, at the cost of one fsync a second.
        now = time.monotonic()
        if force or now - self._synced >= FSYNC_EVERY_S:
            os.fsync(self._f.fileno())
            self._synced = now

    def write(self, lines: list[dict]) -> int:
        """Append lines (each gets the next seq); flushed to the OS before returning the last seq."""
        if not lines:
            return self.seq
        dumps = logline.dumps
        out = [dumps(line) for line in lines]
        text = "\n".join(out)
        # One scan of the whole batch decides whether any line needs masking (most never do); a
        # line's own "seq" is dropped, the writer's goes first.
        if self.masker.needed(text) or '"seq":' in text:
            lines = self.masker.lines([{k: v for k, v in line.items() if k != "seq"} for line in lines])
            out = [dumps(line) for line in lines]
        with_seq = logline.with_seq
        with self._lock:
            seq = self.seq
            parts = []
            for o in out:
                seq += 1
                parts.append(with_seq(seq, o))
            self._f.write("".join(parts))
            self._f.flush()
            self._sync()
            self.seq = seq
            return seq

    def close(self) -> None:
        with self._lock:
            self._f.flush()
            self._sync(force=True)
            self._f.close()
            self._lockf.close()


# --- cursors and markers (shared by the shipper, the task process and the supervisor) ---

def cursor_path(config: Config, task_id: int) -> Path:
    return log_state_dir(config) / f"{task_id}.cursor"


def read_cursor(config: Config, task_id: int) -> dict:
    try:
        return json.loads(cursor_path(config, task_id).read_text())
    except (OSError, ValueError):
        return {"file": None, "offset": 0, "seq": -1}


def write_cursor(config: Config, task_id: int, cursor: dict) -> None:
    path = cursor_path(config, task_id)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cursor))
    os.replace(tmp, path)


def acked_seq(config: Config, task_id: int) -> int:
    return int(read_cursor(config, task_id).get("seq", -1))


def active_dir(config: Config) -> Path:
    return log_state_dir(config) / "active"


def register_active(config: Config, task_id: int) -> None:
    """Tell the shipper (durably) that this task's log is to be shipped."""
    d = active_dir(config)
    d.mkdir(parents=True, exist_ok=True)
    (d / str(task_id)).touch()


def active_task_ids(config: Config) -> list[int]:
    try:
        return sorted(int(p.name) for p in active_dir(config).iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return []


def closed_marker(config: Config, task_id: int) -> Path:
    return log_state_dir(config) / f"{task_id}.closed"


def mark_closed(config: Config, task_id: int, state: str) -> None:
    """The final state is reported: the shipper may forget the task."""
    closed_marker(config, task_id).write_text(state)
    try:
        (active_dir(config) / str(task_id)).unlink()
    except FileNotFoundError:
        pass


def is_closed(config: Config, task_id: int) -> bool:
    return closed_marker(config, task_id).exists()


def fully_acked(config: Config, task_id: int) -> bool:
    """Every complete line in the task's durable log is acked by the server."""
    path = find_log_file(config, task_id)
    if path is None:
        return True
    return acked_seq(config, task_id) >= last_seq(path)
