"""What /metrics shows: one Prometheus registry per server process and its metrics."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import func, select

from protocol.states import TaskState
from server import db
from server.agents import service as agents


class Metrics:
    def __init__(self, *extra):
        """`extra`: metrics made elsewhere (outside any registry) that /metrics shows too."""
        r = self.registry = CollectorRegistry()
        for m in extra:
            r.register(m)
        self.agents_online = Gauge("sly_agents_online", "Agents seen within the offline window", registry=r)
        self.agents = Gauge("sly_agents", "Agents registered", registry=r)
        self.tasks = Gauge("sly_tasks", "Tasks by state", ["state"], registry=r)
        self.loop_lag = Histogram(
            "sly_event_loop_lag_seconds",
            "How late the event loop ran a 250 ms timer",
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.polls = Gauge("sly_longpolls_open", "Agent long-polls waiting now", registry=r)
        self.lines = Counter("sly_log_lines_ingested", "Log lines stored (re-sent ones not counted)", registry=r)
        self.log_bytes = Counter("sly_log_bytes_stored", "Bytes of log lines stored (message + fields)", registry=r)
        self.log_dropped = Counter(
            "sly_log_lines_dropped", "Log lines acked but not stored: the task's log quota was reached", registry=r
        )
        self.log_cut = Counter("sly_log_lines_cut", "Log lines cut to the line-size limit by the server", registry=r)
        self.blobs_collected = Counter("sly_blobs_collected", "Unreferenced blobs deleted by the collector", registry=r)
        self.signin_failures = Counter("sly_admin_token_failures", "Wrong admin tokens (sign-in or Bearer)", registry=r)

    def refresh(self, engine, offline_after: float) -> None:
        """The gauges read from the database (a database thread): agents, online agents, tasks by state."""
        now = time.time()
        with engine.connect() as conn:
            seen = conn.execute(select(db.agents.c.id, db.agents.c.last_seen)).all()
            by_state = dict(conn.execute(select(db.tasks.c.state, func.count()).group_by(db.tasks.c.state)).all())
            polls = agents.polls_open(conn, now)
        self.agents.set(len(seen))
        self.agents_online.set(
            sum(1 for aid, s in seen if agents.agent_status(offline_after, polls.get(aid, 0), s, now) == "online")
        )
        for st in TaskState:
            self.tasks.labels(state=st.value).set(by_state.get(st.value, 0))
