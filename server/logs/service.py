"""Task log lines in the database: a batch stored by seq (idempotent, bounded: server.logs.lines
makes the rows, server.logs.quota says which may be stored), the contiguous `acked` frontier,
pages of lines, metrics events."""

from __future__ import annotations

import json
import math
import time
from typing import NamedTuple

from sqlalchemy import LargeBinary, bindparam, case, cast, func, select, update

from server import db
from server.http import strict
from server.logs.lines import batch_rows
from server.logs.quota import LogQuota
from server.tasks.service import own_task

ACK_WINDOW = 10000
_COLUMNS = ("task_id", "seq", "ts", "level", "stream", "message", "extra")


class Ingested(NamedTuple):
    """What a batch did: the task's acked frontier after it and the lines newly stored; for the
    server's counters, the bytes charged to the quota, the lines dropped over it, the cuts."""

    acked: int
    stored: int
    added: int
    dropped: int
    cut: int


def ingest(conn, task: dict, first_seq: int, lines: list, quota_bytes: int, now: float | None = None) -> Ingested:
    """Store lines first_seq.. of `task` (re-sent seqs ignored) and move its frontier.

    `task`: its id, log_acked and log_bytes (`batch_task`). Every line is bounded and charged to
    the task's log quota of `quota_bytes` (0: none); the line that would pass it is stored as
    QUOTA_MARKER instead, and later lines are acked but not stored.
    """
    now = time.time() if now is None else now
    task_id = task["id"]
    quota = LogQuota(quota_bytes, task.get("log_bytes") or 0)
    last_seq = first_seq + len(lines) - 1
    existing: set[int] = set()
    if lines and not quota.full:
        # Re-sent lines (an agent restarted, an answer lost) are neither stored nor charged again;
        # one range read on the primary key, which finds nothing in the usual case.
        existing = set(conn.execute(_SEQS_IN, {"tid": task_id, "lo": first_seq, "hi": last_seq}).scalars())
    rows, metric_rows, cut = batch_rows(task_id, first_seq, lines, quota, existing, now)
    stored = store_lines(conn, rows, metric_rows) if rows else 0
    acked = settle(conn, task, first_seq, last_seq, quota.used if quota.added else None)
    return Ingested(acked, max(stored, 0), quota.added, quota.dropped, cut)


def store_lines(conn, rows: list[tuple], metric_rows: list[dict]) -> int:
    """Insert log_lines rows (task_id, seq, ts, level, stream, message, extra) and task_metrics
    rows, skipping keys stored already; returns the lines newly stored."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        # The hot path: straight to the driver's executemany (SQLAlchemy's per-row processing costs ~2x).
        cur = conn.connection.driver_connection.executemany(
            "INSERT OR IGNORE INTO log_lines (task_id, seq, ts, level, stream, message, extra) VALUES (?,?,?,?,?,?,?)",
            rows,
        )
        stored = cur.rowcount or 0
    elif dialect == "postgresql":
        stored = _pg_insert_lines(conn, rows)
    else:
        stored = (
            conn.execute(
                db.insert_ignore(conn.engine, db.log_lines), [dict(zip(_COLUMNS, r, strict=True)) for r in rows]
            ).rowcount
            or 0
        )
    if metric_rows:
        conn.execute(db.insert_ignore(conn.engine, db.task_metrics), metric_rows)
    return stored


def settle(conn, task: dict, first_seq: int, last_seq: int, log_bytes: int | None) -> int:
    """After seqs first_seq..last_seq are stored: the task's frontier moved if they touch it, and
    its log_bytes set when not None, in one statement; returns the frontier."""
    task_id, acked = task["id"], task["log_acked"]
    moved = False
    if first_seq <= last_seq and first_seq <= acked + 1 <= last_seq + 1:
        # Every seq of this batch is stored now (inserted, there already, or dropped over the quota)
        # and it touches the frontier: the frontier is at least its last seq; look for more beyond it.
        acked = advance_acked(conn, task_id, last_seq)
        moved = True
    if log_bytes is not None and moved:
        conn.execute(_SET_BYTES_ACKED, {"tid": task_id, "bytes": log_bytes, "acked": acked})
    elif log_bytes is not None:
        conn.execute(_SET_BYTES, {"tid": task_id, "bytes": log_bytes})
    elif moved:
        conn.execute(_SET_ACKED, {"tid": task_id, "acked": acked})
    return acked


_PG_INSERT_LINES = (
    "INSERT INTO log_lines (task_id, seq, ts, level, stream, message, extra) "
    "SELECT * FROM json_to_recordset(%s::json) AS r(task_id integer, seq integer, ts float8, "
    "level text, stream text, message text, extra text) ON CONFLICT DO NOTHING"
)


def _pg_insert_lines(conn, rows: list[tuple]) -> int:
    """PostgreSQL: the whole batch in one statement whose one parameter is the rows as JSON text.
    As seven arrays, psycopg's Python array dumper took a quarter of a log POST's CPU."""
    payload = strict.dumps([dict(zip(_COLUMNS, r, strict=True)) for r in rows])
    return conn.exec_driver_sql(_PG_INSERT_LINES, (payload,)).rowcount or 0


# The ingest's statements, built once (a statement built per call costs its construction and
# cache key every time). Seqs in [lo, hi] of a task; the task's log counters.
_ll = db.log_lines.c
_t = db.tasks.c
_IN_RANGE = (_ll.task_id == bindparam("tid"), _ll.seq >= bindparam("lo"), _ll.seq <= bindparam("hi"))
_SEQS_IN = select(_ll.seq).where(*_IN_RANGE).order_by(_ll.seq)
_COUNT_IN = select(func.count()).where(*_IN_RANGE)
# Never backwards: a retried batch of the same task may commit after this one.
_ACKED = case((_t.log_acked < bindparam("acked"), bindparam("acked")), else_=_t.log_acked)
_SET_BYTES_ACKED = (
    update(db.tasks).where(_t.id == bindparam("tid")).values(log_bytes=bindparam("bytes"), log_acked=_ACKED)
)
_SET_BYTES = update(db.tasks).where(_t.id == bindparam("tid")).values(log_bytes=bindparam("bytes"))
_SET_ACKED = update(db.tasks).where(_t.id == bindparam("tid")).values(log_acked=_ACKED)
# What a log batch needs of its task: not the config, project or timeline JSON a full row decodes.
_LOG_TASK = select(_t.id, _t.agent_id, _t.log_acked, _t.log_bytes).where(_t.id == bindparam("tid"))


def batch_task(conn, agent_id: int, task_id: int) -> dict:
    """The task a log batch is for (id, agent_id, log_acked, log_bytes); 404 unless it is agent `agent_id`'s."""
    return own_task(conn, agent_id, task_id, _LOG_TASK)


def advance_acked(conn, task_id: int, acked: int) -> int:
    """The highest seq s such that every seq 0..s is stored, starting from a known frontier."""
    while True:
        window = {"tid": task_id, "lo": acked + 1, "hi": acked + ACK_WINDOW}
        n = conn.execute(_COUNT_IN, window).scalar_one()
        if n == ACK_WINDOW:
            acked += ACK_WINDOW
            continue
        if n == 0:
            return acked
        for seq in conn.execute(_SEQS_IN, window).scalars():
            if seq != acked + 1:
                return acked
            acked = seq
        return acked


def _size(conn, col):
    """The stored size of a text column in bytes, computed by the database."""
    if conn.dialect.name == "postgresql":
        return func.octet_length(col)
    if conn.dialect.name == "sqlite":
        return func.length(cast(col, LargeBinary))
    return func.length(col)


def read_lines(conn, task: dict, after: int, limit: int, max_bytes: int) -> tuple[list[dict], bool]:
    """Stored lines with seq > after, in order, never past the first gap (seq <= acked).

    Returns (lines, more). A page stops at `limit` lines or once it holds `max_bytes` of message
    and extra fields, whichever comes first, but always holds at least one line; `more` says
    lines beyond the page exist. The sizes are read first, without the text, so a page of huge
    lines never reaches memory whole.
    """
    ll = db.log_lines.c
    # Seqs up to `log_acked` have no gaps: the range (after, after + limit] holds exactly the page.
    top = min(task["log_acked"], after + limit)
    if top <= after:
        return [], False
    in_range = (ll.task_id == task["id"], ll.seq > after, ll.seq <= top)
    sizes = conn.execute(
        select(ll.seq, _size(conn, ll.message) + func.coalesce(_size(conn, ll.extra), 0))
        .where(*in_range)
        .order_by(ll.seq)
    ).all()
    last, total = after, 0
    for seq, size in sizes:
        if last > after and total + (size or 0) > max_bytes:
            break
        last, total = seq, total + (size or 0)
    rows = conn.execute(
        select(ll.seq, ll.ts, ll.level, ll.stream, ll.message, ll.extra)
        .where(ll.task_id == task["id"], ll.seq > after, ll.seq <= last)
        .order_by(ll.seq)
    ).all()
    out = []
    for seq, ts, level, stream, message, extra in rows:
        line = {"seq": seq, "ts": ts, "level": level, "stream": stream, "message": message}
        if ts is not None and not math.isfinite(ts):
            line["ts"] = None  # a row stored before the strict checks
        if extra:
            try:
                line.update(json.loads(extra, parse_constant=lambda _c: None))
            except ValueError:
                line["extra_unreadable"] = True
        out.append(line)
    return out, last < task["log_acked"]


def read_metrics(conn, task_id: int) -> list[dict]:
    m = db.task_metrics.c
    rows = conn.execute(select(m.seq, m.type, m.epoch, m.metrics).where(m.task_id == task_id).order_by(m.seq)).all()
    out = []
    for seq, typ, epoch, metrics in rows:
        if epoch is not None and not math.isfinite(epoch):
            epoch = None  # rows stored before the strict checks: never a 500
        elif epoch is not None and epoch == int(epoch):
            epoch = int(epoch)
        out.append(
            {
                "seq": seq,
                "type": typ,
                "epoch": epoch,
                "metrics": strict.finite(metrics) if isinstance(metrics, dict) else {},
            }
        )
    return out
