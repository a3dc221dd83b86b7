"""Task log lines: idempotent, bounded ingest by seq (line size, per-task quota), the contiguous `acked`
frontier, reading, metrics events."""
from __future__ import annotations

import datetime
import json
import math
import time

from sqlalchemy import LargeBinary, bindparam, case, cast, func, select, update

from protocol.errors import APIError
from protocol.logline import MAX_LINE
from protocol.tasks import AGENT
from server import db
from server.http import strict

CORE_FIELDS = ("ts", "level", "stream", "message", "seq")
METRICS_EVENTS = ("metrics", "EventType.METRICS")
ACK_WINDOW = 10000


def _ts(v, now: float) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, int) and not strict.INT64_MIN <= v <= strict.INT64_MAX:
            raise APIError(400, "integer_out_of_range", "a line's ts is outside int64")
        return float(v)
    if isinstance(v, str):
        try:
            d = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
            if d.tzinfo is None:
                d = d.replace(tzinfo=datetime.timezone.utc)
            return d.timestamp()
        except (ValueError, OverflowError):
            pass
    return now


def parse_batch(raw: bytes) -> tuple[int, list]:
    """The body `{first_seq, lines}`; APIError on malformed JSON, a wrong shape or a value the
    server does not store (server.http.strict), except that a non-finite metric value of a `metrics`
    event becomes null (a diverging loss is common and must not cost the task its log)."""
    constants: list[str] = []

    def constant(name: str) -> float:
        constants.append(name)
        return math.nan
    try:
        body = strict.loads(raw, on_constant=constant)
    except strict.NotStrictJSON as e:
        raise e.api_error() from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", "the body must be an object {first_seq, lines}")
    first, lines = body.get("first_seq"), body.get("lines")
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise APIError(400, "invalid_request", "first_seq must be an integer >= 0")
    if not isinstance(lines, list):
        raise APIError(400, "invalid_request", "lines must be a list of objects")
    if first + len(lines) > strict.ID_MAX:
        raise APIError(400, "integer_out_of_range", f"first_seq + len(lines) is past the highest seq {strict.ID_MAX}")
    if constants:      # rare: look where they stand
        if any(strict.has_nonfinite(v) for k, v in body.items() if k != "lines"):
            raise APIError(400, "non_finite_number", "the body holds NaN or Infinity outside a metrics event")
        lines = [_nonfinite_line(i, ln) if isinstance(ln, dict) and strict.has_nonfinite(ln) else ln
                 for i, ln in enumerate(lines)]
    return first, lines


def _nonfinite_line(i: int, line: dict) -> dict:
    """A line with a non-finite number: its metric values become null; anywhere else is a 400."""
    if line.get("event_type") in METRICS_EVENTS and isinstance(line.get("metrics"), dict):
        line = dict(line, metrics=strict.finite(line["metrics"]))
    bad = [k for k, v in line.items() if strict.has_nonfinite(v)]
    if bad:
        raise APIError(400, "non_finite_number", f"lines[{i}].{bad[0]} holds NaN or Infinity; only the metric "
                       "values of a metrics event may (they are stored as null)")
    return line


_extra_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# The agent's usual line: its keys are exactly these; its only extra field is the int `cts`.
_USUAL_KEYS = frozenset({"ts", "cts", "level", "stream", "message"})
_USUAL_KEYS_SEQ = frozenset({"seq", "ts", "cts", "level", "stream", "message"})
_COLUMNS = ("task_id", "seq", "ts", "level", "stream", "message", "extra")


CUT_MARKER = " [line cut by the server: %d more bytes dropped; a line holds at most %d bytes]"
FIELDS_MARKER = " [fields dropped by the server: %d bytes of JSON; a line holds at most %d bytes]"
QUOTA_MARKER = "log quota of %d bytes reached; later lines are dropped"
_CUT_CHARS = MAX_LINE // 4       # a str this long or shorter is at most MAX_LINE bytes in UTF-8


def _bounded_message(msg: str) -> tuple[str, bool]:
    """The message cut to MAX_LINE bytes with CUT_MARKER, and whether it was cut.

    The agent splits long lines into pieces of their own seqs; a line that still arrives longer
    was not sent by a conforming agent. The server cannot split it: seqs are the agent's, so a
    piece has no seq to take. It keeps the first MAX_LINE bytes and says how much went."""
    if len(msg) <= _CUT_CHARS:
        return msg, False
    raw = msg.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_LINE:
        return msg, False
    head = raw[:MAX_LINE].decode("utf-8", "ignore")
    return head + CUT_MARKER % (len(raw) - len(head.encode("utf-8", "surrogatepass")), MAX_LINE), True


def ingest(core, conn, task: dict, first_seq: int, lines: list, now: float | None = None) -> tuple[int, int]:
    """Store lines first_seq.. (re-sent seqs ignored); returns (acked, lines newly stored).

    Every line is bounded (`_bounded_message`, fields over MAX_LINE dropped) and charged to the
    task's log quota (bytes of message + extra fields JSON). The line that would pass the quota
    is stored as QUOTA_MARKER instead, and later lines are acked but not stored.
    """
    now = time.time() if now is None else now
    task_id = task["id"]
    quota = core.settings.log_quota_bytes
    used = task.get("log_bytes") or 0
    full = bool(quota) and used >= quota
    last_seq = first_seq + len(lines) - 1
    existing: set[int] = set()
    if lines and not full:
        # Re-sent lines (an agent restarted, an answer lost) are neither stored nor charged again;
        # one range read on the primary key, which finds nothing in the usual case.
        existing = set(conn.execute(_SEQS_IN, {"tid": task_id, "lo": first_seq, "hi": last_seq}).scalars())
    rows, metric_rows = [], []
    append = rows.append
    usual, usual_seq = _USUAL_KEYS, _USUAL_KEYS_SEQ
    seq = first_seq - 1
    added = dropped = cut = 0
    for line in lines:
        seq += 1
        if full:
            dropped += 1
            continue
        if existing and seq in existing:
            continue
        if type(line) is not dict and not isinstance(line, dict):
            raise APIError(400, "invalid_request", f"lines[{seq - first_seq}] is not an object")
        msg = line.get("message", "")
        if type(msg) is not str:
            msg = strict.dumps(msg) if not isinstance(msg, (int, float)) else str(msg)
            if msg in ("inf", "-inf", "nan"):
                _nonfinite_line(seq - first_seq, line)
        if len(msg) > _CUT_CHARS:
            msg, was_cut = _bounded_message(msg)
            cut += was_cut
        if "\x00" in msg:     # container output may hold NUL bytes; no text column takes them
            msg = msg.replace("\x00", "\ufffd")
        level, stream = line.get("level") or "info", line.get("stream") or "stdout"
        if type(level) is not str or type(stream) is not str or len(level) > 16 or len(stream) > 16:
            if not (isinstance(level, str) and isinstance(stream, str) and len(level) <= 16 and len(stream) <= 16):
                raise APIError(400, "invalid_request",
                               f"lines[{seq - first_seq}]: level and stream must be short strings")
        if "\x00" in level or "\x00" in stream:
            level, stream = level.replace("\x00", ""), stream.replace("\x00", "")
        ts = line.get("ts")
        if type(ts) is not float:
            ts = _ts(ts, now)
        elif ts - ts != 0.0:            # inf or nan: a number too large for a float (1e400)
            _nonfinite_line(seq - first_seq, line)
        keys = line.keys()
        metric = None
        if (keys == usual or keys == usual_seq) and type(line["cts"]) is int:
            extra = '{"cts":%d}' % line["cts"]          # what _extra_json({"cts": n}) gives, without its cost
        elif len(line) > 4 or any(k not in CORE_FIELDS for k in line):
            ex = {k: v for k, v in line.items() if k not in CORE_FIELDS}
            extra = None
            if ex:
                try:
                    extra = _extra_json(ex)
                except ValueError:      # a non-finite number (1e400): null in a metric, else a 400
                    ex = _nonfinite_line(seq - first_seq, ex)
                    extra = _extra_json(ex)
                if len(extra) > MAX_LINE:
                    msg += FIELDS_MARKER % (len(extra), MAX_LINE)
                    extra = None
                    cut += 1
                elif ex.get("event_type") in METRICS_EVENTS:
                    epoch = ex.get("epoch")
                    if isinstance(epoch, int) and not strict.INT64_MIN <= epoch <= strict.INT64_MAX:
                        raise APIError(400, "integer_out_of_range", f"lines[{seq - first_seq}].epoch is outside int64")
                    metric = {"task_id": task_id, "seq": seq, "type": str(ex.get("type") or "")[:32],
                              "epoch": epoch if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None,
                              "metrics": ex.get("metrics") if isinstance(ex.get("metrics"), dict) else {}}
        else:
            extra = None
        size = (len(msg) if msg.isascii() else len(msg.encode("utf-8", "surrogatepass"))) + (len(extra) if extra else 0)
        if quota and used + size > quota:
            # This line would pass the quota: the marker takes its seq, and the task is full.
            dropped += 1
            msg, level, stream, extra, metric = QUOTA_MARKER % quota, "warning", AGENT, None, None
            size = len(msg)
            used = max(used + size, quota)
            full = True
        else:
            used += size
        added += size
        if metric is not None:
            metric_rows.append(metric)
        append((task_id, seq, ts, level, stream, msg, extra))
    stored = 0
    if rows:
        if core.engine.dialect.name == "sqlite":
            # The hot path: straight to the driver's executemany (SQLAlchemy's per-row processing costs ~2x).
            cur = conn.connection.driver_connection.executemany(
                "INSERT OR IGNORE INTO log_lines (task_id, seq, ts, level, stream, message, extra) VALUES (?,?,?,?,?,?,?)",
                rows)
            stored = cur.rowcount or 0
        elif core.engine.dialect.name == "postgresql":
            stored = _pg_insert_lines(conn, rows)
        else:
            stored = conn.execute(db.insert_ignore(core.engine, db.log_lines),
                                  [dict(zip(_COLUMNS, r)) for r in rows]).rowcount or 0
        if metric_rows:
            conn.execute(db.insert_ignore(core.engine, db.task_metrics), metric_rows)
    acked = task["log_acked"]
    moved = False
    if lines and first_seq <= acked + 1 <= last_seq + 1:
        # Every seq of this batch is stored now (inserted, there already, or dropped over the quota)
        # and it touches the frontier: the frontier is at least its last seq; look for more beyond it.
        acked = advance_acked(conn, task_id, last_seq)
        moved = True
    if added and moved:     # one statement for both
        conn.execute(_SET_BYTES_ACKED, {"tid": task_id, "bytes": used, "acked": acked})
    elif added:
        conn.execute(_SET_BYTES, {"tid": task_id, "bytes": used})
    elif moved:
        conn.execute(_SET_ACKED, {"tid": task_id, "acked": acked})
    if added:
        core.m_log_bytes.inc(added)
    if dropped:
        core.m_log_dropped.inc(dropped)
    if cut:
        core.m_log_cut.inc(cut)
    return acked, max(stored, 0)


_PG_INSERT_LINES = ("INSERT INTO log_lines (task_id, seq, ts, level, stream, message, extra) "
                    "SELECT * FROM json_to_recordset(%s::json) AS r(task_id integer, seq integer, ts float8, "
                    "level text, stream text, message text, extra text) ON CONFLICT DO NOTHING")


def _pg_insert_lines(conn, rows: list[tuple]) -> int:
    """PostgreSQL: the whole batch in one statement whose one parameter is the rows as JSON text.
    As seven arrays, psycopg's Python array dumper took a quarter of a log POST's CPU."""
    payload = strict.dumps([dict(zip(_COLUMNS, r)) for r in rows])
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
_SET_BYTES_ACKED = update(db.tasks).where(_t.id == bindparam("tid")).values(log_bytes=bindparam("bytes"),
                                                                            log_acked=_ACKED)
_SET_BYTES = update(db.tasks).where(_t.id == bindparam("tid")).values(log_bytes=bindparam("bytes"))
_SET_ACKED = update(db.tasks).where(_t.id == bindparam("tid")).values(log_acked=_ACKED)


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
    sizes = conn.execute(select(ll.seq, _size(conn, ll.message) + func.coalesce(_size(conn, ll.extra), 0))
                         .where(*in_range).order_by(ll.seq)).all()
    last, total = after, 0
    for seq, size in sizes:
        if last > after and total + (size or 0) > max_bytes:
            break
        last, total = seq, total + (size or 0)
    rows = conn.execute(select(ll.seq, ll.ts, ll.level, ll.stream, ll.message, ll.extra)
                        .where(ll.task_id == task["id"], ll.seq > after, ll.seq <= last).order_by(ll.seq)).all()
    out = []
    for seq, ts, level, stream, message, extra in rows:
        line = {"seq": seq, "ts": ts, "level": level, "stream": stream, "message": message}
        if ts is not None and not math.isfinite(ts):
            line["ts"] = None           # a row stored before the strict checks
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
            epoch = None                # rows stored before the strict checks: never a 500
        elif epoch is not None and epoch == int(epoch):
            epoch = int(epoch)
        out.append({"seq": seq, "type": typ, "epoch": epoch,
                    "metrics": strict.finite(metrics) if isinstance(metrics, dict) else {}})
    return out
