"""The server's shared state: settings, database engine, blob store, sessions, wake-ups, metrics.

Database work runs in a bounded pool of threads (`await core.run(fn, ...)`), never on the
event loop, so a big read does not stall other requests (`/healthz` included). The pool has
as many threads as the engine has connections (`--db-pool-size`). What several replicas must
agree on lives in the database: stops delivered (`tasks.stop_delivered`), open polls (`polls`),
refusals (`agents.refusing`) and settings versions (`agents.settings_version`). Wake-ups of
long-polls and log followers go through `server.wakeups` (in process, and across replicas on
PostgreSQL with LISTEN/NOTIFY). Contact, lease renewals, telemetry and open-poll rows are
recorded in memory and written in batches (`server.agents.contact`).

A node's token is looked up once, then its agent row is kept in memory (`agent_of`): every
change of an agent row (rename, allowed types, token rotation, removal) sends the agent's ROW
key once it commits, here and through NOTIFY on every replica, and that drops the row from
every replica's cache. A new task or a stop wakes the agent without dropping its row.
`AGENT_CACHE_S` bounds how long a row may be kept if a notification were lost (a replica's
listener reconnecting also drops them all); it is long, since reloading every node's row that
often would be a steady read load of its own (2,000 nodes: 7 reads a second).
"""
from __future__ import annotations

import hmac
import threading
import time

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import bindparam, func, select, update

from protocol.states import LEASED, TaskState
from server import db
from server.blobs import refs as blob_refs
from server.db import migrate
from server.auth.service import Sessions, SignInThrottle
from server.blobs.store import BlobStore
from server.agents.contact import Contacts
from server.logs.feed import LogHub
from server.settings import Settings
from server.wakeups import AGENT, ROW, TASK, Wakeups


AGENT_CACHE_S = 300.0
_AGENT_BY_HASH = select(db.agents).where(db.agents.c.token_hash == bindparam("h"))


class Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        sqlite = settings.database_url.startswith("sqlite")
        # On SQLite one more connection and thread, for the console's big reads only (`run_read`):
        # in WAL mode a read never waits for the writer, and the writer's queue never waits for it.
        self.engine = db.make_engine(settings.database_url, pool_size=settings.pool_size + (1 if sqlite else 0))
        if settings.migrate:
            migrate.upgrade(self.engine)
        # The same pool, each checkout in autocommit: a lone read then costs one round trip, not three
        # (BEGIN, the statement, ROLLBACK on PostgreSQL).
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.limiter = anyio.CapacityLimiter(settings.pool_size)
        self.read_limiter = anyio.CapacityLimiter(1) if sqlite else self.limiter
        self.blobs = BlobStore(settings.data_dir / "blobs", quota=settings.blob_quota_bytes)
        with self.engine.begin() as conn:
            blob_refs.fill_if_empty(conn)
        self.admin_token: str = settings.admin_token or ""
        self.sessions = Sessions(self.engine, self.admin_token)
        self.signin_throttle = SignInThrottle()
        self.wakeups = Wakeups(self.engine)
        self.wakeups.agent_changed = self.forget_agent
        self.contacts = Contacts(self.engine, settings)
        self._agents: dict[str, tuple[dict, float]] = {}   # token hash -> (agent row, kept until)
        self._agent_hash: dict[int, str] = {}               # agent id -> its token hash in _agents
        self._agents_lock = threading.Lock()
        self._agents_epoch = 0       # bumped by every forget: a row read before it is not kept
        self.log_hub = LogHub(self)
        self.closing = False       # set at shutdown: long-polls and log followers answer now
        self.registry = CollectorRegistry()
        self.registry.register(self.contacts.m_rows_dropped)
        self.m_agents_online = Gauge("sly_agents_online", "Agents seen within the offline window", registry=self.registry)
        self.m_agents = Gauge("sly_agents", "Agents registered", registry=self.registry)
        self.m_tasks = Gauge("sly_tasks", "Tasks by state", ["state"], registry=self.registry)
        self.m_loop_lag = Histogram("sly_event_loop_lag_seconds", "How late the event loop ran a 250 ms timer",
                                    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self.registry)
        self.m_polls = Gauge("sly_longpolls_open", "Agent long-polls waiting now", registry=self.registry)
        self.m_lines = Counter("sly_log_lines_ingested", "Log lines stored (re-sent ones not counted)", registry=self.registry)
        self.m_log_bytes = Counter("sly_log_bytes_stored", "Bytes of log lines stored (message + fields)",
                                   registry=self.registry)
        self.m_log_dropped = Counter("sly_log_lines_dropped", "Log lines acked but not stored: the task's log quota "
                                     "was reached", registry=self.registry)
        self.m_log_cut = Counter("sly_log_lines_cut", "Log lines cut to the line-size limit by the server",
                                 registry=self.registry)
        self.m_blobs_collected = Counter("sly_blobs_collected", "Unreferenced blobs deleted by the collector",
                                         registry=self.registry)
        self.m_signin_failures = Counter("sly_admin_token_failures", "Wrong admin tokens (sign-in or Bearer)",
                                         registry=self.registry)

    def close_waits(self) -> None:
        """Shutdown: every waiting long-poll answers and every log follower ends now, so the
        server's graceful stop has no request left to cancel (and logs no error)."""
        self.closing = True
        self.wakeups.agents.wake_all()
        self.wakeups.tasks.wake_all()
        self.log_hub.close()

    async def run(self, fn, *args):
        """`fn(*args)` on one of the database threads; the request waits without holding the loop."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run_read(self, fn, *args):
        """`fn(*args)`, which only reads, on the read thread (SQLite) or a database thread (PostgreSQL).
        The nodes list, a node's chart and the task list use it: a console refreshing them does not
        hold up the fleet's writes."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.read_limiter)

    def reader(self):
        """A connection for reads that need no transaction of their own (each statement sees what
        was committed when it ran): no BEGIN and no ROLLBACK around them."""
        return self._autocommit.connect()

    def transaction(self):
        """A write transaction whose `notify()` wake-ups fire after it commits (here and on every replica)."""
        return self.wakeups.transaction()

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

    # --- agents ---
    async def agent_of(self, h: str) -> dict | None:
        """The agent row of token hash `h` (None if no agent has it), from memory when it is there,
        else read on a database thread. The row is shared: callers must not change it."""
        return self.cached_agent(h) or await self.run(self.load_agent, h)

    def cached_agent(self, h: str) -> dict | None:
        hit = self._agents.get(h)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def load_agent(self, h: str) -> dict | None:
        """Read the agent of token hash `h` (a database thread) and keep it, unless it changed meanwhile."""
        epoch = self._agents_epoch
        with self.reader() as conn:
            row = conn.execute(_AGENT_BY_HASH, {"h": h}).mappings().first()
        if row is None or not hmac.compare_digest(row["token_hash"], h):
            return None
        agent = dict(row)
        with self._agents_lock:
            if self._agents_epoch == epoch:   # no change committed since the read began
                self._agents[h] = (agent, time.monotonic() + AGENT_CACHE_S)
                self._agent_hash[agent["id"]] = h
        return agent

    def forget_agent(self, agent_id: int | None) -> None:
        """Agent `agent_id` changed (None: any may have): its row is read afresh next time."""
        with self._agents_lock:
            self._agents_epoch += 1
            if agent_id is None:
                self._agents.clear()
                self._agent_hash.clear()
                return
            h = self._agent_hash.pop(agent_id, None)
            if h is not None:
                self._agents.pop(h, None)

    def renew_all_leases(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(update(db.tasks).where(db.tasks.c.state.in_([s.value for s in LEASED]))
                         .values(lease_until=now + self.settings.lease_s))

    def agent_status(self, polls_open: int, last_seen: float | None, now: float | None = None) -> str:
        """online: a long-poll of it is open (on any replica), or its last contact is within the offline window."""
        now = time.time() if now is None else now
        if polls_open:
            return "online"
        return "online" if last_seen is not None and now - last_seen <= self.settings.offline_after else "offline"

    @staticmethod
    def polls_open(conn, now: float, agent_id: int | None = None, agent_ids=None,
                   elsewhere: str | None = None) -> dict[int, int]:
        """Agent id -> long-polls open now on every replica (rows of polls that died with a replica
        expire); of one agent, of some, or of all. `elsewhere`: on replicas other than this one
        (whose own open polls `Contacts.shown()` knows exactly)."""
        p = db.polls.c
        q = select(p.agent_id, func.count()).where(p.expires_at > now).group_by(p.agent_id)
        if elsewhere is not None:
            q = q.where(p.replica != elsewhere)
        if agent_id is not None:
            q = q.where(p.agent_id == agent_id)
        if agent_ids is not None:
            q = q.where(p.agent_id.in_(agent_ids))
        return dict(conn.execute(q).all())


    # --- metrics ---
    def refresh_metrics(self) -> None:
        self.contacts.flush()
        now = time.time()
        with self.engine.connect() as conn:
            seen = conn.execute(select(db.agents.c.id, db.agents.c.last_seen)).all()
            by_state = dict(conn.execute(select(db.tasks.c.state, func.count()).group_by(db.tasks.c.state)).all())
            polls = self.polls_open(conn, now)
        self.m_agents.set(len(seen))
        self.m_agents_online.set(sum(1 for aid, s in seen if self.agent_status(polls.get(aid, 0), s, now) == "online"))
        for st in TaskState:
            self.m_tasks.labels(state=st.value).set(by_state.get(st.value, 0))
