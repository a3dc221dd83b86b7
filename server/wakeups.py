"""Wake-ups of long-polls and log followers, in this process and across replicas.

Whoever waits (a long-poll on an agent, a log follower on a task) takes an asyncio.Event for
its key, reads the database, and waits on the event; a change wakes the key after it commits,
and the waiter reads again. Within one process that is all (SQLite, or any single replica).

On PostgreSQL the transaction that makes a change also calls `pg_notify('sly_wake', ...)`.
PostgreSQL delivers the notification at commit, and never for a rolled-back transaction, to
every replica's listener connection (`listen()`), which wakes the same keys there. A listener
that lost its connection wakes every waiter after reconnecting, since notifications sent while
it was away are gone; each waiter then re-reads the database and finds what it missed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

from protocol.backoff import backoff_delay

log = logging.getLogger("sly-server")

CHANNEL = "sly_wake"
AGENT, TASK = "a", "t"
# An agent's row changed (rename, allowed types, token, removal): every replica drops its kept
# copy. Sent with the agent's own key; a new task or a stop wakes the agent but keeps its row.
ROW = "r"
_PAYLOAD_MAX = 7000   # PostgreSQL refuses a payload of 8000 bytes or more


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
        except asyncio.TimeoutError:
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
        self.listening = asyncio.Event()   # set while the listener connection is up (tests wait on it)
        # Told of every agent key woken (None: any agent may have changed), here at commit and from
        # other replicas' notifications: the Core drops its kept copy of that agent's row.
        self.agent_changed = None

    @contextlib.contextmanager
    def transaction(self):
        """`engine.begin()` that wakes the keys given to `notify()` once it has committed."""
        keys: set[tuple[str, int]] = set()
        with self.engine.begin() as conn:
            conn.info["sly_wake"] = keys
            try:
                yield conn
                if keys and self.shared:
                    self._pg_notify(conn, keys)
            finally:
                conn.info.pop("sly_wake", None)
        self._changed(keys)
        if keys and self.loop is not None:
            self.loop.call_soon_threadsafe(self.wake_local, keys)

    @staticmethod
    def notify(conn, kind: str, key: int) -> None:
        """Wake `key` (AGENT or TASK; ROW: the agent's row changed) when `conn`'s transaction (one
        from `transaction()`) commits."""
        conn.info["sly_wake"].add((kind, int(key)))

    def _changed(self, keys) -> None:
        if self.agent_changed is not None:
            for kind, key in keys:
                if kind == ROW:
                    self.agent_changed(key)

    def wake_local(self, keys) -> None:
        for kind, key in keys:
            if kind != ROW:
                (self.agents if kind == AGENT else self.tasks).wake(key)

    def _pg_notify(self, conn, keys) -> None:
        # One notification per transaction (split only past the payload limit): "<replica> a:1 t:5 ..."
        parts, size = [], 0
        for kind, key in sorted(keys):
            item = f"{kind}:{key}"
            if size + len(item) > _PAYLOAD_MAX:
                conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": " ".join([self.replica] + parts)})
                parts, size = [], 0
            parts.append(item)
            size += len(item) + 1
        conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": " ".join([self.replica] + parts)})

    def dispatch(self, payload: str) -> None:
        """A notification from the listener: wake its keys here, unless this replica sent it."""
        replica, _, rest = payload.partition(" ")
        if replica == self.replica:
            return   # woken locally at its commit already
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
        conninfo = make_url(self.engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
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
                        self.agent_changed(None)   # changes made while away were not heard
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
