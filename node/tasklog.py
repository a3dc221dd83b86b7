"""The durable per-task log: its file format, its writer (task process) and its cursors (log-shipper).

`tasks/<id>/logs/log_<ts>.txt` holds one JSON object per line, `{"seq": n, "ts", "level", "stream",
"message", ...}` (encoded and read as `protocol.logline` says), seqs 0, 1, 2... with no gap (as the server
counts). Exactly one task process writes a task's file at a time; a re-spawned one appends to the same file
and continues the seqs. A line is complete only with its newline: a writer killed mid-line leaves a partial
tail, which the next writer cuts off (the shipper never reads past the last newline, so that line was never
sent).

The shipper's acked cursor `state/logs/<id>.cursor` ({"file", "offset", "seq"}) is replaced
atomically after each ack. `state/logs/active/<id>` registers a task with the shipper until its
final state is reported; `state/logs/<id>.closed` marks that report done.
"""

from __future__ import annotations

import errno
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


class LogWriteError(OSError):
    """The durable log could not take a batch (disk full, most likely); the file stays whole."""


def write_error_message(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: the task's log cannot be written ({errno.errorcode[e.errno]}); the task was stopped"
    return f"the task's log cannot be written: {e.strerror or e}"


class TaskLogWriter:
    """Appends masked lines with seqs to the task's durable log. Thread-safe; one per task process.

    Writes go straight to the file (no userspace buffer): a buffer that failed to flush would be
    written again with the next batch, so a disk that filled and freed up again would get the
    same seqs twice. A failed write keeps the complete lines that reached the file, cuts the
    partial one, and the next seq follows the last kept line; `error` then says why."""

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
        self.error: str | None = None  # the first write failure, as the task's error
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._synced = 0.0  # monotonic time of the last fsync

    def _sync(self, force: bool = False) -> None:
        # A write reaches the OS at once (any process may crash); fsync at most every
        # FSYNC_EVERY_S bounds what a power loss can take to about that much of the log.
        now = time.monotonic()
        if force or now - self._synced >= FSYNC_EVERY_S:
            try:
                os.fsync(self._fd)
            except OSError:
                pass  # the lines are in the page cache for the shipper; only power-loss safety is lost
            self._synced = now

    def _append(self, data: bytes, lines: int) -> None:
        """Append whole lines; on a failure keep the complete ones that got in and count them."""
        view = memoryview(data)
        start = os.fstat(self._fd).st_size  # O_APPEND and one writer (the flock): our bytes go here
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, view[done:])
        except OSError as e:
            keep = data.rfind(b"\n", 0, done) + 1
            try:
                os.ftruncate(self._fd, start + keep)  # shrinking needs no space
                self.seq += data.count(b"\n", 0, keep)
            except OSError:
                repair_tail(self.path)
                self.seq = last_seq(self.path)
            message = write_error_message(e)
            self.error = self.error or message
            raise LogWriteError(e.errno, message) from None
        self.seq += lines

    def write(self, lines: list[dict]) -> int:
        """Append lines (each gets the next seq); in the OS before returning the last seq.
        LogWriteError: some or none of them got in (self.seq says up to where)."""
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
            self._append("".join(parts).encode("utf-8", "replace"), len(parts))
            self._sync()
            return self.seq

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._sync(force=True)
            os.close(self._fd)
            self._fd = -1
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
    """Replace the cursor atomically; on a full disk, rewrite the existing file in place.

    In place needs no new block (a cursor is far smaller than one), so acks still advance while
    the disk is full; a crash mid-rewrite leaves an unreadable cursor, read as "nothing acked",
    and the lines are sent again (the server ignores seqs it has)."""
    path = cursor_path(config, task_id)
    data = json.dumps(cursor).encode()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


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
    marker = closed_marker(config, task_id)
    try:
        marker.write_text(state)
    except OSError:
        marker.touch()  # a full disk still takes an empty file: its existence is the mark
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
