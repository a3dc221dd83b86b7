"""What nodes say all the time, written in batches: contact (`last_seen`), lease renewals,
telemetry samples and the rows of open long-polls.

Every request of a node is a contact, and a node sends a telemetry sample every few seconds: a
thousand nodes make hundreds of these a second. Written one transaction per request, they were
most of the server's database work (and on SQLite each one waits for the single writer). None
of them needs to be in the database at the instant it happens: the offline window is 15 s, a
lease is minutes, a chart point is seconds apart. So a request only records them here, in
memory, and `flush()` writes everything pending in one transaction, a statement per kind run
with many rows (executemany): every `contact_flush_s` (1 s) from a background task, before
`/metrics` counts the nodes, and at shutdown.

A read that shows them (the nodes list and a node's page and chart) writes nothing: it takes
`shown()`, what this process holds and has not written yet (or is writing now), before it reads
the database, and shows the newer of the two. So a console refreshing every few seconds costs
the fleet a read, not a write, and it still shows every contact this process received before
the read began; another replica's, once that replica wrote them (within a second).

What a crash loses: at most the last flush interval of last_seen, telemetry and open-poll rows,
each of which the nodes renew within seconds. Task states, log lines and results never go
through here: they are written before their request is answered.

A write that fails (the database away) puts the batch back, newer values first, and is retried
at the next flush: nothing is lost while the server runs, except, past `MAX_KEPT`, the oldest
chart points.

A write the database refuses for its data (a value out of its column's range: server/telemetry/service.py
keeps every value within range, so this is the second line) never holds back the other nodes:
the batch is halved by agent until the refused rows stand alone, a node's rows at most, and those
are dropped (a warning names the agent; `sly_contact_rows_dropped_total` counts them) while the
rest is written. A batch with one bad node among n costs about 2 log2(n) transactions, not n.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import Counter as Metric
from sqlalchemy import bindparam, delete, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from protocol.states import LEASED
from server import db
from server.http import strict
from server.telemetry import service as tele

log = logging.getLogger("sly-server")

LEASED_VALUES = [s.value for s in LEASED]
MAX_KEPT = 100_000  # history points (and poll-row deletions) kept while batches fail


class Contacts:
    def __init__(self, engine, settings):
        self.engine = engine
        self.settings = settings
        self._lock = threading.Lock()  # the pending maps: written by the loop, taken by a flush
        self._flushing = threading.Lock()  # one flush at a time, in order
        self._seen: dict[int, float] = {}  # agent id -> newest contact
        self._lease: dict[int, float] = {}  # agent id -> when its leases were renewed (pending)
        self._latest: dict[int, dict] = {}  # agent id -> its telemetry_latest row
        self._points: list[dict] = []  # telemetry_history rows
        self._polls_new: dict[str, dict] = {}  # poll id -> polls row not written yet
        self._polls_gone: list[str] = []  # poll ids written earlier, over now
        self._leased_at: dict[int, float] = {}  # agent id -> when its leases were last renewed
        self._point_at: dict[int, float] = {}  # agent id -> its newest history point (written or pending)
        self._open: dict[str, int] = {}  # poll id -> agent id: the long-polls open on this process
        self._inflight: tuple | None = None  # the batch a flush is writing now
        # Not in any registry here: ServerState registers it with its own (the one /metrics shows).
        self.m_rows_dropped = Metric(
            "sly_contact_rows_dropped",
            "Contact batch rows (contact, lease, telemetry, poll) the database refused for their data, dropped",
            registry=None,
        )

    # --- recording (any thread; cheap) ---
    def seen(self, agent_id: int, now: float | None = None) -> None:
        """A contact: `last_seen`, and the agent's task leases renewed every quarter of the lease."""
        now = time.time() if now is None else now
        with self._lock:
            self._seen_locked(agent_id, now)

    def _seen_locked(self, agent_id: int, now: float) -> None:
        if self._seen.get(agent_id, 0.0) < now:
            self._seen[agent_id] = now
        if now - self._leased_at.get(agent_id, 0.0) >= self.settings.lease_s / 4:
            self._leased_at[agent_id] = now
            self._lease[agent_id] = now

    def telemetry(self, agent: dict, now: float, sample: dict) -> bool:
        """A telemetry sample (and the contact it is). True when it also becomes a history point."""
        latest = tele.latest_values(sample)
        aid = agent["id"]
        with self._lock:
            self._seen_locked(aid, now)
            self._latest[aid] = dict(latest, agent_id=aid, ts=now)
            point = tele.history_point(
                self.settings, aid, self._point_at.get(aid, agent.get("telemetry_ts")), now, latest
            )
            if point is not None:
                self._point_at[aid] = now
                self._points.append(point)
        return point is not None

    def poll_open(self, poll_id: str, agent_id: int, replica: str, expires_at: float) -> None:
        with self._lock:
            self._open[poll_id] = agent_id
            self._polls_new[poll_id] = {
                "id": poll_id,
                "agent_id": agent_id,
                "replica": replica,
                "expires_at": expires_at,
            }

    def poll_closed(self, poll_id: str) -> None:
        """The poll is over: a row not written yet never will be; a written one goes at the next flush."""
        with self._lock:
            self._open.pop(poll_id, None)
            if self._polls_new.pop(poll_id, None) is None:
                self._polls_gone.append(poll_id)

    def forget(self, agent_id: int) -> None:
        """The agent was deleted: nothing of it is written any more."""
        with self._lock:
            for m in (self._seen, self._lease, self._latest, self._leased_at, self._point_at):
                m.pop(agent_id, None)
            self._points = [p for p in self._points if p["agent_id"] != agent_id]

    def shown(self) -> UnwrittenContacts:
        """What a read shows on top of the database: the contact, telemetry and chart points this
        process holds and has not written yet, or is writing now, and its open long-polls. Take
        it before reading the database: a batch written in between is then in both, never in neither."""
        with self._lock:
            batches = [(self._seen, self._latest, self._points)]
            if self._inflight is not None:
                seen, _lease, latest, points = self._inflight[:4]
                batches.append((seen, latest, points))
            out = UnwrittenContacts(polls=Counter(self._open.values()))
            for seen, latest, points in batches:  # the pending batch first: it is the newer
                for aid, ts in seen.items():
                    if out.seen.get(aid, 0.0) < ts:
                        out.seen[aid] = ts
                for aid, row in latest.items():
                    out.latest.setdefault(aid, row)
                out.points.extend(points)
        return out

    @property
    def pending(self) -> bool:
        return bool(self._seen or self._latest or self._points or self._polls_new or self._polls_gone)

    # --- writing (a database thread) ---
    def flush(self) -> int:
        """Write what is pending in one transaction; the number of rows written."""
        with self._flushing:
            with self._lock:
                if not self.pending:
                    return 0
                batch = (self._seen, self._lease, self._latest, self._points, self._polls_new, self._polls_gone)
                self._seen, self._lease, self._latest, self._points = {}, {}, {}, []
                self._polls_new, self._polls_gone = {}, []
                self._inflight = batch
            try:
                n = self._write_isolating(batch)
            finally:
                with self._lock:
                    self._inflight = None
            return n

    def _write_isolating(self, batch: tuple) -> int:
        """Write `batch`; rows the database refuses for their data are dropped, an agent's at a
        time, and the rest written (halving the batch by agent). Any other failure (the database
        away, locked, a conflict) puts back what is not written yet and raises."""
        parts, n = [batch], 0
        while parts:
            part = parts.pop()
            try:
                n += self._write(*part)
            except Exception as e:
                if not _refused_data(e):
                    for p in (part, *parts):
                        self._put_back(*p)
                    raise
                keys = _keys(part)
                if len(keys) > 1:
                    parts.extend(_split(part, keys))
                else:
                    self._drop(part, keys[0], e)
        return n

    def _drop(self, part: tuple, key: int | None, e: Exception) -> None:
        rows = sum(len(x) for x in part)
        self.m_rows_dropped.inc(rows)
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[:1]
        # The rows' values are the node's; the message is the database's first line (no token is in either).
        log.warning(
            "contact batch: the database refused the rows of %s (%s: %s); %d row(s) dropped, the rest written",
            f"agent {key}" if key is not None else "closed polls",
            type(e).__name__,
            (why[0] if why else "")[:200],
            rows,
        )

    def _put_back(self, seen, lease, latest, points, polls_new, polls_gone) -> None:
        with self._lock:
            for aid, ts in seen.items():
                if self._seen.get(aid, 0.0) < ts:
                    self._seen[aid] = ts
            for aid, ts in lease.items():
                self._lease.setdefault(aid, ts)
            for aid, row in latest.items():
                self._latest.setdefault(aid, row)  # a newer sample taken meanwhile wins
            # While the database is away the kept batch is bounded: the oldest chart points go
            # first, and so do deletions of poll rows, which expire on their own anyway.
            self._points[:0] = points
            del self._points[: max(0, len(self._points) - MAX_KEPT)]
            for pid, row in polls_new.items():
                self._polls_new.setdefault(pid, row)
            self._polls_gone[:0] = polls_gone  # deleted after the inserts: a closed poll stays closed
            del self._polls_gone[: max(0, len(self._polls_gone) - MAX_KEPT)]

    def _write(self, seen, lease, latest, points, polls_new, polls_gone) -> int:
        if self.engine.dialect.name == "postgresql":
            return self._write_pg(seen, lease, latest, points, polls_new, polls_gone)
        # SQLite: sqlite3's executemany is C all the way, one statement per kind.
        a, t, lt = db.agents.c, db.tasks.c, db.telemetry_latest
        n = 0
        with self.engine.begin() as conn:
            ids = set(seen) | set(latest) | {r["agent_id"] for r in polls_new.values()}
            # Rows of an agent deleted meanwhile are dropped, not written back as orphans.
            alive = set(conn.execute(select(a.id).where(a.id.in_(ids))).scalars()) if ids else set()
            rows = [{"b_id": aid, "b_ts": ts} for aid, ts in seen.items() if aid in alive]
            if rows:
                # Never backwards: another replica may have written a newer contact.
                conn.execute(
                    update(db.agents)
                    .where(a.id == bindparam("b_id"), or_(a.last_seen.is_(None), a.last_seen < bindparam("b_ts")))
                    .values(last_seen=bindparam("b_ts")),
                    rows,
                )
                n += len(rows)
            rows = [{"b_id": aid, "b_until": ts + self.settings.lease_s} for aid, ts in lease.items() if aid in alive]
            if rows:
                # IN (...) expands per execution, which executemany cannot take: the states as plain binds.
                conn.execute(
                    update(db.tasks)
                    .where(t.agent_id == bindparam("b_id"), or_(*(t.state == v for v in LEASED_VALUES)))
                    .values(lease_until=bindparam("b_until")),
                    rows,
                )
                n += len(rows)
            rows = [r for aid, r in latest.items() if aid in alive]
            if rows:
                conn.execute(_upsert_latest(lt), rows)
                n += len(rows)
            points = [p for p in points if p["agent_id"] in alive]
            if points:
                conn.execute(db.insert_ignore(self.engine, db.telemetry_history), points)
                conn.execute(
                    update(db.agents)
                    .where(a.id == bindparam("b_id"), or_(a.telemetry_ts.is_(None), a.telemetry_ts < bindparam("b_ts")))
                    .values(telemetry_ts=bindparam("b_ts")),
                    [{"b_id": aid, "b_ts": ts} for aid, ts in _newest(points).items()],
                )
                n += len(points)
            rows = [r for r in polls_new.values() if r["agent_id"] in alive]
            if rows:
                conn.execute(db.insert_ignore(self.engine, db.polls), rows)
                n += len(rows)
            if polls_gone:
                conn.execute(
                    delete(db.polls).where(db.polls.c.id == bindparam("b_id")), [{"b_id": pid} for pid in polls_gone]
                )
                n += len(polls_gone)
        return n

    def _write_pg(self, seen, lease, latest, points, polls_new, polls_gone) -> int:
        """PostgreSQL: one statement per kind whose one parameter is its rows as JSON text.
        As an executemany, psycopg's pipeline spent Python work on every row: the batch was a
        seventh of a busy replica's CPU. Rows of agents deleted meanwhile are dropped by the
        statements themselves (the join with `agents`).

        The rows that requests also lock go last, so the batch holds their locks only for its
        last statements: `agents` (a node's connect writes its system_info) and the leased
        tasks (every state report and log batch updates its task's row)."""
        work = [
            (_PG_LATEST, list(latest.values())),
            (_PG_HISTORY, points),
            (_PG_POLLS_NEW, list(polls_new.values())),
            (_PG_POLLS_GONE, polls_gone),
            (_PG_SEEN, [{"id": aid, "ts": ts} for aid, ts in seen.items()]),
            (_PG_TELEMETRY_TS, [{"id": aid, "ts": ts} for aid, ts in _newest(points).items()]),
            (_PG_LEASE, [{"id": aid, "until": ts + self.settings.lease_s} for aid, ts in lease.items()]),
        ]
        n = 0
        with self.engine.begin() as conn:
            # What a batch holds may be lost in a crash anyway (the module's docstring), so its
            # commit need not wait for the WAL to reach the disk: the other commits still do.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            for sql, rows in work:
                if rows:
                    n += max(0, conn.exec_driver_sql(sql, (strict.dumps(rows),)).rowcount or 0)
        return n


@dataclass
class UnwrittenContacts:
    """What this process holds of its nodes and has not written yet (`Contacts.shown()`), for reads to show."""

    seen: dict[int, float] = field(default_factory=dict)  # agent id -> newest contact
    latest: dict[int, dict] = field(default_factory=dict)  # agent id -> its newest telemetry_latest row
    points: list[dict] = field(default_factory=list)  # telemetry_history rows
    polls: Counter = field(default_factory=Counter)  # agent id -> long-polls open on this process

    def last_seen(self, agent_id: int, stored: float | None) -> float | None:
        """The newer of the stored contact and this process's unwritten one."""
        here = self.seen.get(agent_id)
        return stored if here is None else here if stored is None else max(stored, here)

    def latest_of(self, agent_id: int, stored):
        """The node's telemetry_latest row: this process's unwritten one, else the stored one."""
        return self.latest.get(agent_id, stored)

    def online_here(self, since: float) -> list[int]:
        """Nodes this process heard from at or after `since`, or holds a long-poll of."""
        return sorted({aid for aid, ts in self.seen.items() if ts >= since} | set(self.polls))

    def points_of(self, agent_id: int, since: float | None) -> list[dict]:
        return [p for p in self.points if p["agent_id"] == agent_id and (since is None or p["ts"] > since)]


def _pg_recordset(table) -> tuple[str, str]:
    """(the column list, `json_to_recordset(%s::json) AS r(<column> <type>, ...)`) for `table`."""
    dialect = postgresql.dialect()
    cols = [c.name for c in table.c]
    defs = ", ".join(f"{c.name} {c.type.compile(dialect=dialect)}" for c in table.c)
    return ", ".join(cols), f"json_to_recordset(%s::json) AS r({defs})"


def _pg_insert(table, conflict: str) -> str:
    cols, source = _pg_recordset(table)
    picked = ", ".join(f"r.{c.name}" for c in table.c)
    return (
        f"INSERT INTO {table.name} ({cols}) SELECT {picked} FROM {source} "
        f"WHERE EXISTS (SELECT 1 FROM agents WHERE agents.id = r.agent_id) {conflict}"
    )


_LEASED_SQL = ", ".join(f"'{v}'" for v in LEASED_VALUES)


def _pg_newer(column: str) -> str:
    """UPDATE of agents.<column> from {id, ts} rows, never backwards (another replica may have
    written a newer one)."""
    return (
        f"UPDATE agents SET {column} = r.ts FROM json_to_recordset(%s::json) AS r(id integer, ts float8) "
        f"WHERE agents.id = r.id AND (agents.{column} IS NULL OR agents.{column} < r.ts)"
    )


_PG_SEEN = _pg_newer("last_seen")
_PG_TELEMETRY_TS = _pg_newer("telemetry_ts")
_PG_LEASE = (
    "UPDATE tasks SET lease_until = r.until FROM json_to_recordset(%s::json) AS r(id integer, until float8) "
    f"WHERE tasks.agent_id = r.id AND tasks.state IN ({_LEASED_SQL})"
)
_PG_LATEST = _pg_insert(
    db.telemetry_latest,
    "ON CONFLICT (agent_id) DO UPDATE SET "
    + ", ".join(f"{c.name} = EXCLUDED.{c.name}" for c in db.telemetry_latest.c if c.name != "agent_id"),
)
_PG_HISTORY = _pg_insert(db.telemetry_history, "ON CONFLICT DO NOTHING")
_PG_POLLS_NEW = _pg_insert(db.polls, "ON CONFLICT DO NOTHING")
_PG_POLLS_GONE = "DELETE FROM polls WHERE id IN (SELECT json_array_elements_text(%s::json))"


def _refused_data(e: Exception) -> bool:
    """The database (or its driver, binding a value) refused a row's data; not an outage, a lock
    or a conflict, which keep the batch for the next flush."""
    err: BaseException | None = e
    if isinstance(e, sa_exc.StatementError) and not isinstance(e, sa_exc.DBAPIError):
        err = e.orig  # a driver's bind error (sqlite3: "Python int too large to convert")
    return isinstance(err, (sa_exc.DataError, sa_exc.IntegrityError, OverflowError, ValueError, TypeError))


def _keys(batch: tuple) -> list:
    """The agents with rows in `batch`, and None for its closed polls (which name no agent)."""
    seen, lease, latest, points, polls_new, polls_gone = batch
    ids = (
        set(seen)
        | set(lease)
        | set(latest)
        | {p["agent_id"] for p in points}
        | {r["agent_id"] for r in polls_new.values()}
    )
    return sorted(ids) + ([None] if polls_gone else [])


def _split(batch: tuple, keys: list) -> list[tuple]:
    """`batch` in two, by the first and second half of its `keys`."""
    first = set(keys[: len(keys) // 2])
    seen, lease, latest, points, polls_new, polls_gone = batch

    def half(inside: bool) -> tuple:
        return (
            {a: v for a, v in seen.items() if (a in first) == inside},
            {a: v for a, v in lease.items() if (a in first) == inside},
            {a: v for a, v in latest.items() if (a in first) == inside},
            [p for p in points if (p["agent_id"] in first) == inside],
            {i: r for i, r in polls_new.items() if (r["agent_id"] in first) == inside},
            polls_gone if (None in first) == inside else [],
        )

    return [half(True), half(False)]


def _newest(points: list[dict]) -> dict[int, float]:
    """Agent id -> the time of its newest point among `points`."""
    newest: dict[int, float] = {}
    for p in points:
        newest[p["agent_id"]] = max(newest.get(p["agent_id"], 0.0), p["ts"])
    return newest


def _upsert_latest(table):
    """INSERT of telemetry_latest rows that replaces a node's existing row (SQLite; PostgreSQL
    writes them with `_PG_LATEST`)."""
    stmt = sqlite.insert(table)
    return stmt.on_conflict_do_update(
        index_elements=["agent_id"], set_={c.name: stmt.excluded[c.name] for c in table.c if c.name != "agent_id"}
    )
