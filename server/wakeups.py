"""Wake-ups of long-polls and log followers, in this process and across replicas.

Whoever waits (a long-poll on an agent, a log follower on a task) takes an asyncio.Event for
its key, reads the database, and waits on the event; a change wakes the key after it commits,
and the waiter reads again. Within one process that is all (SQLite, or any single replica).

On PostgreSQL the keys a transaction woke also go to every other replica, as `pg_notify` on
the channel `sly_wake`, which each replica's listener connection (`listen()`) hears. They are
sent after the change has committed, by one sender per process (`send()`) on a connection of
its own, and not by the changing transaction itself: PostgreSQL makes every transaction that
notifies take one cluster-wide lock at commit and hold it until its commit record is on disk,
so notifying commits queue behind each other's WAL flush. With task creations, state reports
and log batches all notifying, that queue was where a busy fleet's requests stalled together
(docs/benchmarks.md, Fleet). The sender's transactions write nothing else and commit without
waiting for the disk (`synchronous_commit = off`), so they hold the lock for microseconds,
and the keys that piled up while one was in flight go together in the next.

A rolled-back transaction sends nothing. A process that dies between a commit and its sending
loses those wake-ups: the other replicas' polls then answer at their timeout and followers
read at their keep-alive, and find the change. A listener that lost its connection wakes every
waiter after reconnecting, since notifications sent while it was away are gone; each waiter
then re-reads the database and finds what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from protocol.backoff import backoff_delay

log = logging.getLogger("sly-server")

CHANNEL = "sly_wake"
AGENT, TASK = "a", "t"
# An agent's row changed (rename, allowed types, token, removal): every replica drops its kept
# copy. Sent with the agent's own key; a new task or a stop wakes the agent but keeps its row.
ROW = "r"
_PAYLOAD_MAX = 7000  # PostgreSQL refuses a payload of 8000 bytes or more


class Waiters:
    """One asyncio.Event per key; `wake(key)` releases everyone waiting on that key right now."""

    def __init__(self):
        self._events: dict[int, asyncio.Event] = {}

    def event(self, key: int) -> asyncio.Event:
        """Take the event BEFORE looking at the database, then wait on it: no wake-up is lost."""
        ev = self._events.get(key)
        if ev is None:
            ev = self._events[key] = asyncio.Event()
        return ev

    def wake(self, key: int) -> None:
        ev = self._events.pop(key, None)
        if ev is not None:
            ev.set()

    def wake_all(self) -> None:
        events, self._events = self._events, {}
        for ev in events.values():
            ev.set()

    @staticmethod
    async def wait(ev: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(ev.wait(), max(0.0, timeout))
            return True
        except TimeoutError:
            return False


class Wakeups:
    """The agent and task waiters of this process, and the way changes reach them."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.replica = uuid.uuid4().hex[:16]
        self.agents = Waiters()
        self.tasks = Waiters()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shared = engine.dialect.name == "postgresql"
        self.listening = asyncio.Event()  # set while the listener connection is up (tests wait on it)
        # Keys committed here and not yet sent to the other replicas (the loop's; `send()` empties it).
        self._outbox: set[tuple[str, int]] = set()
        self._outbox_ready = asyncio.Event()
        self._sending = False
        # Told of every agent key woken (None: any agent may have changed), here at commit and from
        # other replicas' notifications: the ServerState drops its kept copy of that agent's row.
        self.agent_changed: Callable[[int | None], None] | None = None

    @contextlib.contextmanager
    def transaction(self):
        """`engine.begin()` that wakes the keys given to `notify()` once it has committed."""
        keys: set[tuple[str, int]] = set()
        with self.engine.begin() as conn:
            conn.info["sly_wake"] = keys
            try:
                yield conn
                if keys and self.shared and self.loop is None:
                    # No server loop to send them after the commit (a command-line tool): in the transaction.
                    conn.execute(
                        text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p"),
                        {"c": CHANNEL, "ps": self._payloads(keys)},
                    )
            finally:
                conn.info.pop("sly_wake", None)
        self._changed(keys)
        if keys and self.loop is not None:
            self.loop.call_soon_threadsafe(self._committed, keys)

    @staticmethod
    def notify(conn, kind: str, key: int) -> None:
        """Wake `key` (AGENT or TASK; ROW: the agent's row changed) when `conn`'s transaction (one
        from `transaction()`) commits."""
        conn.info["sly_wake"].add((kind, int(key)))

    @staticmethod
    def notify_agent(conn, agent_id: int, row_changed: bool = False) -> None:
        """Wake the agent's open long-polls (new task, stop, settings, token) once `conn` commits.
        `row_changed`: its row changed too (rename, types, token, removal), and every replica
        drops its kept copy."""
        Wakeups.notify(conn, AGENT, agent_id)
        if row_changed:
            Wakeups.notify(conn, ROW, agent_id)

    @staticmethod
    def notify_task(conn, task_id: int) -> None:
        """Wake the task's log followers (new lines, new state) once `conn` commits."""
        Wakeups.notify(conn, TASK, task_id)

    def _changed(self, keys) -> None:
        if self.agent_changed is not None:
            for kind, key in keys:
                if kind == ROW:
                    self.agent_changed(key)

    def wake_local(self, keys) -> None:
        for kind, key in keys:
            if kind != ROW:
                (self.agents if kind == AGENT else self.tasks).wake(key)

    def _committed(self, keys) -> None:
        """On the loop, once a transaction committed: wake its keys here, and queue them for the others."""
        self.wake_local(keys)
        if self.shared:
            self._outbox |= keys
            self._outbox_ready.set()

    def _payloads(self, keys) -> list[str]:
        """The notifications for `keys`: "<replica> a:1 t:5 ...", split only past the payload limit."""
        out: list[str] = []
        parts: list[str] = []
        size = 0
        for kind, key in sorted(keys):
            item = f"{kind}:{key}"
            if parts and size + len(item) > _PAYLOAD_MAX:
                out.append(" ".join([self.replica] + parts))
                parts, size = [], 0
            parts.append(item)
            size += len(item) + 1
        out.append(" ".join([self.replica] + parts))
        return out

    async def send(self) -> None:
        """PostgreSQL only: send the committed keys to the other replicas for as long as the server
        runs, all that piled up in one transaction, on a connection of its own."""
        import psycopg

        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._conninfo(), autocommit=True) as aconn:
                    await aconn.execute("SET synchronous_commit = off")
                    failures = 0
                    while True:
                        await self._outbox_ready.wait()
                        self._outbox_ready.clear()
                        keys, self._outbox = self._outbox, set()
                        if not keys:
                            continue
                        self._sending = True
                        try:
                            await aconn.execute(
                                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, self._payloads(keys))
                            )
                        except BaseException:
                            self._outbox |= keys  # sent with the next ones, once reconnected
                            self._outbox_ready.set()
                            raise
                        finally:
                            self._sending = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the sender must outlive a lost connection
                failures += 1
                delay = backoff_delay(failures, 0.5, 10.0)
                log.warning("wake-up sender lost its connection (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)

    async def drain(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until every committed key was sent; False if some were not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._outbox or self._sending:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def _conninfo(self) -> str:
        return make_url(self.engine.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def dispatch(self, payload: str) -> None:
        """A notification from the listener: wake its keys here, unless this replica sent it."""
        replica, _, rest = payload.partition(" ")
        if replica == self.replica:
            return  # woken locally at its commit already
        keys = []
        for item in rest.split():
            kind, _, key = item.partition(":")
            if kind in (AGENT, TASK, ROW) and key.isdigit():
                keys.append((kind, int(key)))
        self._changed(keys)
        self.wake_local(keys)

    async def listen(self) -> None:
        """PostgreSQL only: LISTEN on one connection of its own for as long as the server runs."""
        import psycopg

        conninfo = self._conninfo()
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as aconn:
                    await aconn.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.warning("wake-up listener reconnected; waking every waiter to re-read")
                    failures = 0
                    self.listening.set()
                    if self.agent_changed is not None:
                        self.agent_changed(None)  # changes made while away were not heard
                    self.agents.wake_all()
                    self.tasks.wake_all()
                    async for n in aconn.notifies():
                        self.dispatch(n.payload)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the listener must outlive a lost connection
                self.listening.clear()
                failures += 1
                delay = backoff_delay(failures, 0.5, 10.0)
                log.warning("wake-up listener lost its connection (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
