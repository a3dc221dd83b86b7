"""Log-shipper process (`sly-agent: log-shipper`): durable task logs -> server, exactly once.

It tails `tasks/<id>/logs/log_<ts>.txt` of every task registered in `state/logs/active/` from
the persisted acked cursor, sends gzip batches of at most config.log_batch_lines lines every
config.log_batch_interval_s (sooner when nudged), and advances and persists the cursor only from
the server's `acked`. The server ignores re-sent seqs, so a crash anywhere re-sends at worst a
batch and loses nothing. While the server is down each task backs off with jitter.

A bad line harms one task at most: a line that is not `{"seq": n, ...}` (protocol.logline) is
skipped, logged and counted, and the task's other lines ship; a file that cannot be read fails
that task's shipping alone (an error line, retried with backoff), never the process.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import select
import stat
import time
from pathlib import Path

from agent.child import ChildBase
from node import tasklog
from node.api import AgentAPI
from node.config import Config
from protocol import logline
from protocol.backoff import backoff_delay
from protocol.errors import APIError

log = logging.getLogger("agent.log_shipper")

MAX_BATCH_BYTES = 8 << 20
READ_MIN_BYTES = 64 << 10
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 5.0
UNUSABLE_CAP_S = 30.0  # a task whose log file cannot be read is looked at again this often
DRAIN_S = 10.0
BAD_LINES_LOGGED = 10  # per task: the first bad lines are logged one by one, then every 1000th


class UnusableLog(OSError):
    """The task's durable log cannot be read (not a regular file, no permission, ...)."""


def _seq_or_none(raw: bytes) -> int | None:
    try:
        return logline.seq_of(raw)
    except logline.BadLine:
        return None


class _LineEndOffsets:
    """The file offset right after each line's newline, for lines read from offset `base`.

    A list-like (ends[i]) computed from the line lengths in C rather than one by one in Python."""

    def __init__(self, base: int, lines: list[bytes]):
        self.base = base
        self.acc = list(itertools.accumulate(map(len, lines)))

    def __len__(self) -> int:
        return len(self.acc)

    def __getitem__(self, i: int) -> int:
        if i < 0:
            i += len(self.acc)
        return self.base + self.acc[i] + i + 1


class ShipNowPipe:
    """A pipe through which task processes ask the log-shipper to ship now (a hint, "a nudge").

    Many writers (task processes), one reader (the log-shipper).

    Not a multiprocessing.Queue: its cross-process write lock, left taken by a writer killed
    with SIGKILL, would block every other writer's feeder thread and hang them at exit. Writes
    of a few bytes to a non-blocking pipe are atomic and need no lock; a full pipe drops the
    nudge, which is only a hint (state/logs/active/ is the truth).
    """

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def send(self, task_id: int) -> None:
        try:
            os.write(self.w, b"%d\n" % task_id)
        except OSError:  # BlockingIOError: full; the shipper is busy anyway
            pass

    def wait(self, timeout: float) -> None:
        """Block until nudged or `timeout` passes; swallow the pending nudges."""
        try:
            ready, _, _ = select.select([self.r], [], [], max(0.0, timeout))
            if ready:
                while os.read(self.r, 65536):
                    pass
        except (BlockingIOError, InterruptedError):
            pass


class TaskCursor:
    """Shipping state of one task: its file, the acked seq and the byte offset right after it."""

    def __init__(self, config: Config, task_id: int):
        self.task_id = task_id
        saved = tasklog.read_cursor(config, task_id)
        self.path: Path | None = tasklog.find_log_file(config, task_id)
        same_file = self.path is not None and saved.get("file") == self.path.name
        self.offset = int(saved.get("offset", 0)) if same_file else 0
        self.seq = int(saved.get("seq", -1))
        self.failures = 0
        self.retry_at = 0.0
        self.line_bytes = 256  # a guess of a line's length, for the size of the next read
        self.bad_lines = 0  # lines skipped because they are not ours
        self.bad_upto = 0  # byte offset up to which skipped lines are counted already
        self.careful = False  # the server refused a batch: check each line before sending
        self.error = ""  # why the file cannot be shipped, while it cannot

    def as_dict(self) -> dict:
        return {"file": self.path.name if self.path else None, "offset": self.offset, "seq": self.seq}


class LogShipper(ChildBase):
    title = "log-shipper"

    def __init__(self, config: Config, ship_now=None):
        super().__init__()
        self.config = config
        self.ship_now = ship_now  # ShipNowPipe: a hint to ship now
        self.cursors: dict[int, TaskCursor] = {}
        self.api = None
        self.bad_lines = 0  # skipped lines, all tasks, since this process started
        self.unopened: dict[int, str] = {}  # task id -> why its cursor could not be made

    # --- process body ---
    def run(self) -> None:
        self.start_in_child()
        self.api = AgentAPI(self.config.server_address, self.config.access_token, timeout=30, retries=0)
        while self.parent_alive() and not self.stopping.is_set():
            self.beat()
            self.wait_for_work(self.loop_once(time.monotonic()))
        if self.parent_alive():
            self.drain(time.monotonic() + DRAIN_S)

    def wait_for_work(self, timeout: float) -> None:
        if timeout <= 0:
            return
        if self.ship_now is None:
            self.stopping.wait(timeout)
        else:
            self.ship_now.wait(min(timeout, 0.5))

    def drain(self, deadline: float) -> None:
        """On SIGTERM: ship what is left, then exit (the supervisor stops us last)."""
        while time.monotonic() < deadline and self.parent_alive():
            self.loop_once(time.monotonic(), ignore_backoff=True)
            if all(not self.pending(c) for c in self.cursors.values()):
                return
            time.sleep(0.1)

    # --- one iteration ---
    def loop_once(self, now: float, ignore_backoff: bool = False) -> float:
        """Ship every registered task's new lines; return seconds until the next iteration."""
        active = set(tasklog.active_task_ids(self.config))
        for tid in list(self.cursors):
            if tid not in active:
                del self.cursors[tid]
        for tid in list(self.unopened):
            if tid not in active:
                del self.unopened[tid]
        for tid in active:
            if tid not in self.cursors:
                try:
                    self.cursors[tid] = TaskCursor(self.config, tid)
                except Exception as e:  # noqa: BLE001 - e.g. its logs/ is not a folder: that task only
                    reason = f"{type(e).__name__}: {e}"
                    if self.unopened.get(tid) != reason:
                        log.error("task %s: cannot ship its log (%s); its other tasks' logs still ship", tid, reason)
                        self.unopened[tid] = reason
                    continue
                self.unopened.pop(tid, None)
        wait = self.config.log_batch_interval_s
        for cur in self.cursors.values():
            if not ignore_backoff and cur.retry_at > now:
                wait = min(wait, cur.retry_at - now)
                continue
            try:
                self.ship_task(cur, now)
            except Exception as e:  # noqa: BLE001 - one task's file must not stop the others
                self.task_failed(cur, now, e)
            else:
                if cur.error:
                    log.info("task %s: its log ships again", cur.task_id)
                    cur.error, cur.failures = "", 0
        return wait

    def task_failed(self, cur: TaskCursor, now: float, e: Exception) -> None:
        """This task's log cannot be shipped now: say so once, look again later."""
        reason = f"{type(e).__name__}: {e}"
        if reason != cur.error:
            if isinstance(e, OSError):
                log.error("task %s: cannot ship its log (%s); its other tasks' logs still ship", cur.task_id, reason)
            else:
                log.exception("task %s: shipping its log failed (%s)", cur.task_id, reason)
            cur.error = reason
        cur.failures += 1
        cur.retry_at = now + backoff_delay(cur.failures, BACKOFF_BASE_S, UNUSABLE_CAP_S)

    def pending(self, cur: TaskCursor) -> bool:
        if cur.path is None or cur.error:
            return False
        try:
            return cur.path.stat().st_size > cur.offset
        except FileNotFoundError:
            return False

    def read_batch(self, cur: TaskCursor) -> tuple[list[bytes], list[int]]:
        """Complete lines after the cursor (seq > acked), at most a batch; and their end offsets."""
        if cur.path is None:
            cur.path = tasklog.find_log_file(self.config, cur.task_id)
            if cur.path is None:
                return [], []
        limit = self.config.log_batch_lines
        data = self.read_chunk(cur, cur.path, limit)
        end = data.rfind(b"\n")
        if end < 0:
            return [], []
        raws = data[:end].split(b"\n")
        cur.line_bytes = max(16, 2 * (end + 1) // len(raws))  # twice the mean, for the next read
        # The usual case: the file continues right after the acked line, seqs without a gap and
        # no blank or foreign line: take the batch as it is (no per-line Python work).
        if raws[0] and b"" not in raws and not cur.careful and _seq_or_none(raws[0]) == cur.seq + 1:
            lines = raws[:limit]
            if _seq_or_none(lines[-1]) == cur.seq + len(lines):
                return lines, _LineEndOffsets(cur.offset, lines)
        return self.check_lines(cur, raws, limit)

    def read_chunk(self, cur: TaskCursor, path: Path, limit: int) -> bytes:
        """The bytes after the cursor: enough for about `limit` lines, at most MAX_BATCH_BYTES."""
        with self.open_log(path) as f:
            f.seek(cur.offset)
            # Read about a batch, not MAX_BATCH_BYTES every time (a backlog would be read and
            # split many times over): more only while the lines are longer than guessed.
            size = min(MAX_BATCH_BYTES, max(READ_MIN_BYTES, limit * cur.line_bytes))
            data = f.read(size)
            while len(data) == size < MAX_BATCH_BYTES and data.count(b"\n") < limit:
                more = f.read(min(size, MAX_BATCH_BYTES - len(data)))
                if not more:
                    break
                data += more
                size = len(data)
        return data

    def check_lines(self, cur: TaskCursor, raws: list[bytes], limit: int) -> tuple[list[bytes], list[int]]:
        """The slow path of read_batch: look at each line, skip (and count) what is not the writer's next one."""
        lines: list[bytes] = []
        ends: list[int] = []
        pos = cur.offset
        for raw in raws:
            pos += len(raw) + 1
            if not raw:
                if not lines:
                    cur.offset = pos
                continue
            try:
                seq = logline.seq_of(raw)
                if cur.careful:
                    logline.parse(raw)  # the server refused a batch: send only lines that decode
            except logline.BadLine as e:
                self.skip_line(cur, pos - len(raw) - 1, raw, str(e))
                if not lines:
                    cur.offset = pos
                continue
            expected = cur.seq + 1 + len(lines)
            if seq != expected:
                if seq <= cur.seq and not lines:
                    cur.offset = pos  # already acked (the cursor was behind the server)
                    continue
                # The writer numbers its lines 0, 1, 2... with no gap and no repeat (and the server
                # numbers a batch's lines from first_seq): any other seq is not the writer's line.
                self.skip_line(cur, pos - len(raw) - 1, raw, f"seq {seq} where {expected} is due")
                if not lines:
                    cur.offset = pos
                continue
            lines.append(raw)
            ends.append(pos)
            if len(lines) >= limit:
                break
        return lines, ends

    @staticmethod
    def open_log(path: Path):
        """Open a task's durable log for reading; UnusableLog unless it is a regular file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the shipper
        except OSError as e:
            raise UnusableLog(e.errno, f"cannot open {path}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnusableLog(f"{path} is not a regular file")
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return f

    def skip_line(self, cur: TaskCursor, offset: int, raw: bytes, why: str) -> None:
        """A line that is not ours: never sent; logged (the first few, then every 1000th) and counted."""
        if offset < cur.bad_upto:
            return  # counted when this batch was read before (a retry, a partial ack)
        cur.bad_upto = offset + len(raw) + 1
        cur.bad_lines += 1
        self.bad_lines += 1
        if cur.bad_lines <= BAD_LINES_LOGGED or cur.bad_lines % 1000 == 0:
            log.warning(
                "task %s: skipped a line of its log that is not a log line (%s) at byte %d of %s: %r; "
                "%d skipped for this task",
                cur.task_id,
                why,
                offset,
                cur.path.name if cur.path else "?",
                raw[:80],
                cur.bad_lines,
            )

    def ship_task(self, cur: TaskCursor, now: float) -> None:
        """Send batches until the task's file has no unsent complete line, or a send fails."""
        while True:
            self.beat()
            lines, ends = self.read_batch(cur)
            if not lines:
                return
            first = logline.seq_of(lines[0])
            # Lines go as written, `seq` included (the server numbers them first_seq + i and ignores it).
            body = b'{"first_seq":%d,"lines":[%s]}' % (first, b",".join(lines))
            try:
                acked = self.api.send_logs(cur.task_id, first, [], gzip_body=gzip.compress(body, compresslevel=1))
            except APIError as e:
                if e.status == 400 and not cur.careful:
                    # The server could not take the batch as it stands (a line that only looks like
                    # ours): read it again line by line, skipping what does not decode.
                    log.warning(
                        "task %s: the server refused the log batch from seq %s (%s); checking each line",
                        cur.task_id,
                        first,
                        e,
                    )
                    cur.careful = True
                    continue
                cur.failures += 1
                cur.retry_at = now + backoff_delay(cur.failures, BACKOFF_BASE_S, BACKOFF_CAP_S)
                if cur.failures == 1 or e.status not in (None, 502, 503, 504):
                    log.warning("task %s: log batch from seq %s not delivered (%s); retrying", cur.task_id, first, e)
                return
            if cur.failures:
                log.info("task %s: log shipping resumed after %d failed tries", cur.task_id, cur.failures)
            cur.failures, cur.retry_at, cur.careful = 0, 0.0, False
            self.advance(cur, acked, first, ends)
            if acked < first + len(lines) - 1:
                return  # the server holds a gap; try again next tick from its ack

    def advance(self, cur: TaskCursor, acked: int, first: int, ends: list[int]) -> None:
        """Move the cursor to the server's ack and persist it."""
        if acked < first - 1:
            # The server lacks lines before this batch (its data was reset): rewind and re-send.
            cur.offset, cur.seq = 0, acked  # acked may be -1: nothing stored
        elif acked >= first:
            i = min(acked - first, len(ends) - 1)
            cur.offset = ends[i]
            cur.seq = acked
        else:
            return
        tasklog.write_cursor(self.config, cur.task_id, cur.as_dict())
