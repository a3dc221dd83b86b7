"""Task log lines: idempotent ingest by seq, the contiguous `acked` frontier, reading, metrics events."""
from __future__ import annotations

import datetime
import json
import math
import time

from sqlalchemy import LargeBinary, cast, func, insert, select, update

from protocol.errors import APIError
from server import db, strict

CORE_FIELDS = ("ts", "level", "stream", "message", "seq")
METRICS_EVENTS = ("metrics", "EventType.METRICS")
ACK_WINDOW = 10000


def _insert_ignore(engine, table):
    name = engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        return insert(table)
    return dialect_insert(table).on_conflict_do_nothing()


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
    server does not store (server.strict), except that a non-finite metric value of a `metrics`
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
    if first + len(lines) > strict.INT64_MAX:
        raise APIError(400, "integer_out_of_range", "first_seq + len(lines) is outside int64")
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


def ingest(core, conn, task: dict, first_seq: int, lines: list, now: float | None = None) -> tuple[int, int]:
    """Store lines first_seq.. (re-sent seqs ignored); returns (acked, lines newly stored)."""
    now = time.time() if now is None else now
    task_id = task["id"]
    rows, metric_rows = [], []
    append = rows.append
    usual, usual_seq = _USUAL_KEYS, _USUAL_KEYS_SEQ
    seq = first_seq - 1
    for line in lines:
        seq += 1
        if type(line) is not dict and not isinstance(line, dict):
            raise APIError(400, "invalid_request", f"lines[{seq - first_seq}] is not an object")
        msg = line.get("message", "")
        if type(msg) is not str:
            msg = strict.dumps(msg) if not isinstance(msg, (int, float)) else str(msg)
            if msg in ("inf", "-inf", "nan"):
                _nonfinite_line(seq - first_seq, line)
        level, stream = line.get("level") or "info", line.get("stream") or "stdout"
        if type(level) is not str or type(stream) is not str or len(level) > 16 or len(stream) > 16:
            if not (isinstance(level, str) and isinstance(stream, str) and len(level) <= 16 and len(stream) <= 16):
                raise APIError(400, "invalid_request",
                               f"lines[{seq - first_seq}]: level and stream must be short strings")
        ts = line.get("ts")
        if type(ts) is not float:
            ts = _ts(ts, now)
        elif ts - ts != 0.0:            # inf or nan: a number too large for a float (1e400)
            _nonfinite_line(seq - first_seq, line)
        keys = line.keys()
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
                if ex.get("event_type") in METRICS_EVENTS:
                    epoch = ex.get("epoch")
                    if isinstance(epoch, int) and not strict.INT64_MIN <= epoch <= strict.INT64_MAX:
                        raise APIError(400, "integer_out_of_range", f"lines[{seq - first_seq}].epoch is outside int64")
                    metric_rows.append({"task_id": task_id, "seq": seq, "type": str(ex.get("type") or "")[:32],
                                        "epoch": epoch if isinstance(epoch, (int, float))
                                        and not isinstance(epoch, bool) else None,
                                        "metrics": ex.get("metrics") if isinstance(ex.get("metrics"), dict) else {}})
        else:
            extra = None
        append((task_id, seq, ts, level, stream, msg, extra))
    stored = 0
    if rows:
        if core.engine.dialect.name == "sqlite":
            # The hot path: straight to the driver's executemany (SQLAlchemy's per-row processing costs ~2x).
            cur = conn.connection.driver_connection.executemany(
                "INSERT OR IGNORE INTO log_lines (task_id, seq, ts, level, stream, message, extra) VALUES (?,?,?,?,?,?,?)",
                rows)
            stored = cur.rowcount or 0
        else:
            stored = conn.execute(_insert_ignore(core.engine, db.log_lines),
                                  [dict(zip(_COLUMNS, r)) for r in rows]).rowcount or 0
        if metric_rows:
            conn.execute(_insert_ignore(core.engine, db.task_metrics), metric_rows)
    acked = task["log_acked"]
    if rows and first_seq <= acked + 1 < first_seq + len(rows) + 1:
        # Every seq of this batch is stored now (inserted or there already) and it touches the
        # frontier: the frontier is at least its last seq; look for more only beyond it.
        acked = advance_acked(conn, task["id"], first_seq + len(rows) - 1)
        # Never backwards: a retried batch of the same task may commit after this one.
        t = db.tasks.c
        conn.execute(update(db.tasks).where(t.id == task["id"], t.log_acked < acked).values(log_acked=acked))
    return acked, max(stored, 0)


def advance_acked(conn, task_id: int, acked: int) -> int:
    """The highest seq s such that every seq 0..s is stored, starting from a known frontier."""
    ll = db.log_lines.c
    while True:
        n = conn.execute(select(func.count()).where(ll.task_id == task_id, ll.seq > acked,
                                                    ll.seq <= acked + ACK_WINDOW)).scalar_one()
        if n == ACK_WINDOW:
            acked += ACK_WINDOW
            continue
        if n == 0:
            return acked
        for seq in conn.execute(select(ll.seq).where(ll.task_id == task_id, ll.seq > acked,
                                                     ll.seq <= acked + ACK_WINDOW).order_by(ll.seq)).scalars():
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
