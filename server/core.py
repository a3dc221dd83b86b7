"""The server's shared state: settings, database engine, blob store, sessions, waiters, metrics.

All database work runs in short synchronous calls on the event loop's thread, so the requests
never race each other on the database and a wake-up (`wake_agent`, `wake_task`) is seen at once
by the long-polls and log followers waiting in the same loop. Waiting costs one asyncio.Event.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select, update

from protocol.states import LEASED, TaskState
from server import db, migrate
from server.auth import Sessions, hash_token
from server.blobs import BlobStore
from server.settings import Settings


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

    @staticmethod
    async def wait(ev: asyncio.Event, timeout: float) -> bool:
        try:
            await asyncio.wait_for(ev.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = db.make_engine(settings.database_url)
        migrate.upgrade(self.engine)
        self.blobs = BlobStore(settings.data_dir / "blobs")
        self.sessions = Sessions(self.engine)
        self.admin_token: str = settings.admin_token or ""
        self.agent_waiters = Waiters()
        self.task_waiters = Waiters()
        self.settings_version: dict[int, int] = collections.defaultdict(int)
        self.stops_delivered: set[int] = set()   # stop requests an agent has seen in a poll answer
        self._touched: dict[int, float] = {}
        self.polling: collections.Counter = collections.Counter()   # agent id -> long-polls open now
        self.refusing: dict[int, str] = {}   # agent id -> why it takes no task now (its last poll said)
        self.registry = CollectorRegistry()
        self.m_agents_online = Gauge("sly_agents_online", "Agents seen within the offline window", registry=self.registry)
        self.m_agents = Gauge("sly_agents", "Agents registered", registry=self.registry)
        self.m_tasks = Gauge("sly_tasks", "Tasks by state", ["state"], registry=self.registry)
        self.m_polls = Gauge("sly_longpolls_open", "Agent long-polls waiting now", registry=self.registry)
        self.m_lines = Counter("sly_log_lines_ingested", "Log lines stored (re-sent ones not counted)", registry=self.registry)

    # --- agents ---
    def agent_by_token(self, token: str) -> dict | None:
        h = hash_token(token)
        with self.engine.connect() as conn:
            row = conn.execute(select(db.agents).where(db.agents.c.token_hash == h)).mappings().first()
        if row is None or not hmac.compare_digest(row["token_hash"], h):
            return None
        return dict(row)

    def touch_agent(self, agent_id: int, now: float | None = None) -> None:
        """Record contact: last_seen and the leases of the agent's tasks (written at most every ~second)."""
        now = time.time() if now is None else now
        every = min(1.0, self.settings.lease_s / 4)
        if now - self._touched.get(agent_id, 0.0) < every:
            return
        self._touched[agent_id] = now
        with self.engine.begin() as conn:
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(last_seen=now))
            conn.execute(update(db.tasks).where(db.tasks.c.agent_id == agent_id,
                                                db.tasks.c.state.in_([s.value for s in LEASED]))
                         .values(lease_until=now + self.settings.lease_s))

    def renew_all_leases(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(update(db.tasks).where(db.tasks.c.state.in_([s.value for s in LEASED]))
                         .values(lease_until=now + self.settings.lease_s))

    def agent_status(self, agent_id: int, last_seen: float | None, now: float | None = None) -> str:
        """online: a long-poll of it is open, or its last contact is within the offline window."""
        now = time.time() if now is None else now
        if self.polling.get(agent_id):
            return "online"
        return "online" if last_seen is not None and now - last_seen <= self.settings.offline_after else "offline"

    def wake_agent(self, agent_id: int, settings_changed: bool = False) -> None:
        if settings_changed:
            self.settings_version[agent_id] += 1
        self.agent_waiters.wake(agent_id)

    def wake_task(self, task_id: int) -> None:
        self.task_waiters.wake(task_id)

    # --- metrics ---
    def refresh_metrics(self) -> None:
        now = time.time()
        with self.engine.connect() as conn:
            seen = conn.execute(select(db.agents.c.id, db.agents.c.last_seen)).all()
            by_state = dict(conn.execute(select(db.tasks.c.state, func.count()).group_by(db.tasks.c.state)).all())
        self.m_agents.set(len(seen))
        self.m_agents_online.set(sum(1 for aid, s in seen if self.agent_status(aid, s, now) == "online"))
        for st in TaskState:
            self.m_tasks.labels(state=st.value).set(by_state.get(st.value, 0))
