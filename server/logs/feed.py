"""Live log fan-out: one database read per new batch of a task's lines, for all its followers.

Each followed task has one `Feed` per replica. The feed waits for the task's wake-up (new lines
or a new state, from this replica or another), reads the new lines once, bounded in lines and
bytes, and hands the same batch to every follower's small queue. A follower that falls behind
(its queue full) loses batches, not memory: it notices the gap and reads what it missed from
the database itself, as it does for the history before it joined. The feed stops when its last
follower leaves, or ends every follower's stream when the task is final and its log complete.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from protocol.states import FINAL, TaskState
from server.http.strict import dumps
from server.logs import service as logs
from server.tasks.service import get_task
from server.wakeups import Waiters

FOLLOW_BATCH = 2000  # lines per read and per SSE write at most (the byte bound usually comes first)
KEEPALIVE_S = 15.0  # a comment this often keeps proxies from closing an idle stream
log = logging.getLogger("sly-server")
QUEUED_BATCHES = 4  # per follower; past it the follower re-reads from the database


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {dumps(data)}\n\n"


class Batch:
    """Lines first..last, read once; their SSE text is made once for every follower."""

    __slots__ = ("first", "last", "lines", "text")

    def __init__(self, lines: list[dict]):
        self.lines = lines
        self.first, self.last = lines[0]["seq"], lines[-1]["seq"]
        # Made on the database thread that read the lines: encoding MiBs of text would hold the loop.
        self.text = encode(lines)


def encode(lines: list[dict]) -> str:
    return "".join(sse("line", ln) for ln in lines)


class Follower:
    def __init__(self, feed: Feed):
        self.feed = feed
        self.queue: collections.deque[Batch] = collections.deque()
        self.event = asyncio.Event()

    def offer(self, batch: Batch) -> None:
        if len(self.queue) < QUEUED_BATCHES:
            self.queue.append(batch)
        self.event.set()


class Feed:
    """The one reader of a task's new lines in this process."""

    def __init__(self, hub: LogHub, task_id: int, cursor: int):
        self.hub, self.task_id = hub, task_id
        self.cursor = cursor  # the last seq read and handed to the followers
        self.end: dict | None = None  # {state, acked} once the log is complete
        self.followers: set[Follower] = set()
        self.runner: asyncio.Task | None = None

    def _read(self):
        state = self.hub.state
        with state.db.engine.connect() as conn:
            task = get_task(conn, self.task_id)
            if task is None:
                return None, [], False
            lines, more = logs.read_lines(conn, task, self.cursor, FOLLOW_BATCH, state.settings.log_page_bytes)
            return task, Batch(lines) if lines else None, more

    async def run(self) -> None:
        state = self.hub.state
        while True:
            ev = state.wakeups.tasks.event(self.task_id)  # before the read: no wake-up is lost
            task, batch, more = await state.db.run(self._read)
            if batch is not None:
                self.cursor = batch.last
                for f in self.followers:
                    f.offer(batch)
            if more:
                continue
            if task is not None:  # none stored up to acked: lines dropped over the task's log quota
                self.cursor = max(self.cursor, task["log_acked"])
            if task is None or (
                TaskState(task["state"]) in FINAL and (self.cursor >= task["log_acked"] or task.get("logs_expired_at"))
            ):
                self.end = {
                    "state": task["state"] if task else None,
                    "acked": task["log_acked"] if task else self.cursor,
                }
                self.hub.feeds.pop(self.task_id, None)  # a follower joining from now on starts a new feed
                for f in self.followers:
                    f.event.set()
                return
            await Waiters.wait(ev, KEEPALIVE_S)


class LogHub:
    """The feeds of this process, by task id."""

    def __init__(self, state):
        self.state = state
        self.feeds: dict[int, Feed] = {}

    def join(self, task_id: int, log_acked: int) -> Follower:
        feed = self.feeds.get(task_id)
        if feed is None:
            feed = self.feeds[task_id] = Feed(self, task_id, log_acked)
            feed.runner = asyncio.get_running_loop().create_task(feed.run())
            feed.runner.add_done_callback(self._reap)
        f = Follower(feed)
        feed.followers.add(f)
        return f

    def _reap(self, runner: asyncio.Task) -> None:
        if not runner.cancelled() and runner.exception() is not None:
            log.error("live log feed failed", exc_info=runner.exception())
            for feed in [f for f in self.feeds.values() if f.runner is runner]:
                del self.feeds[feed.task_id]
                feed.end = {"state": None, "acked": feed.cursor, "error": "the server's log feed failed"}
                for f in feed.followers:
                    f.event.set()

    def close(self) -> None:
        """Shutdown: wake every follower so its stream ends now (a client re-attaches with after=)."""
        for feed in self.feeds.values():
            for f in feed.followers:
                f.event.set()

    def leave(self, f: Follower) -> None:
        feed = f.feed
        feed.followers.discard(f)
        if not feed.followers and feed.end is None:
            if self.feeds.get(feed.task_id) is feed:
                del self.feeds[feed.task_id]
            assert feed.runner is not None  # set by join() before it hands out a follower
            feed.runner.cancel()

    async def follow(self, task: dict, after: int):
        """The SSE text of a task's log from seq `after` on: `line` events, keep-alives, then `end`."""
        state = self.state
        f = self.join(task["id"], task["log_acked"])
        cursor = after
        try:
            while True:
                # Lines the feed will not bring: the history before it started, and batches this
                # follower's full queue dropped. Read them here, up to the next batch held.
                target = f.queue[0].first - 1 if f.queue else f.feed.cursor
                if cursor < target:
                    batch = await state.db.run(self._read_upto, task["id"], cursor, target)
                    if batch is None:
                        cursor = target  # the task is gone: there is nothing to read up to the feed
                        continue
                    cursor = batch.last
                    yield batch.text
                    continue
                if f.queue:
                    batch = f.queue.popleft()
                    if batch.last <= cursor:
                        continue
                    if batch.first == cursor + 1:
                        yield batch.text
                    else:
                        yield encode([ln for ln in batch.lines if ln["seq"] > cursor])
                    cursor = batch.last
                    continue
                if f.feed.end is not None and cursor >= target:
                    yield sse("end", f.feed.end)
                    return
                if state.closing:  # the server stops; a client re-attaches with after=<last seq>
                    return
                f.event.clear()
                if f.queue or f.feed.end is not None or cursor < f.feed.cursor:
                    continue
                try:
                    await asyncio.wait_for(f.event.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self.leave(f)

    def _read_upto(self, task_id: int, after: int, upto: int):
        with self.state.db.engine.connect() as conn:
            task = get_task(conn, task_id)
            if task is None:
                return None
            task = dict(task, log_acked=min(task["log_acked"], upto))
            lines, _ = logs.read_lines(conn, task, after, FOLLOW_BATCH, self.state.settings.log_page_bytes)
            return Batch(lines) if lines else None
