"""What a log batch becomes before it is stored: the body parsed strictly, each line normalised to
its row (cut to the line limit, extra fields bounded, its metrics event taken out), the task's
quota applied. No database: server.logs.service stores the rows.
"""

from __future__ import annotations

import datetime
import json
import math

from protocol.errors import APIError
from protocol.logline import MAX_LINE
from protocol.tasks import AGENT
from server.http import strict
from server.logs.quota import LogQuota

CORE_FIELDS = ("ts", "level", "stream", "message", "seq")
METRICS_EVENTS = ("metrics", "EventType.METRICS")
CUT_MARKER = " [line cut by the server: %d more bytes dropped; a line holds at most %d bytes]"
FIELDS_MARKER = " [fields dropped by the server: %d bytes of JSON; a line holds at most %d bytes]"
_CUT_CHARS = MAX_LINE // 4  # a str this long or shorter is at most MAX_LINE bytes in UTF-8

_extra_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
# The agent's usual line: its keys are exactly these; its only extra field is the int `cts`.
_USUAL_KEYS = frozenset({"ts", "cts", "level", "stream", "message"})
_USUAL_KEYS_SEQ = frozenset({"seq", "ts", "cts", "level", "stream", "message"})
_CORE_SET = frozenset(CORE_FIELDS)


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
    if constants:  # rare: look where they stand
        if any(strict.has_nonfinite(v) for k, v in body.items() if k != "lines"):
            raise APIError(400, "non_finite_number", "the body holds NaN or Infinity outside a metrics event")
        lines = [
            _nonfinite_line(i, ln) if isinstance(ln, dict) and strict.has_nonfinite(ln) else ln
            for i, ln in enumerate(lines)
        ]
    return first, lines


def _nonfinite_line(i: int, line: dict) -> dict:
    """A line with a non-finite number: its metric values become null; anywhere else is a 400."""
    if line.get("event_type") in METRICS_EVENTS and isinstance(line.get("metrics"), dict):
        line = dict(line, metrics=strict.finite(line["metrics"]))
    bad = [k for k, v in line.items() if strict.has_nonfinite(v)]
    if bad:
        raise APIError(
            400,
            "non_finite_number",
            f"lines[{i}].{bad[0]} holds NaN or Infinity; only the metric "
            "values of a metrics event may (they are stored as null)",
        )
    return line


def _ts(v, now: float) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, int) and not strict.INT64_MIN <= v <= strict.INT64_MAX:
            raise APIError(400, "integer_out_of_range", "a line's ts is outside int64")
        return float(v)
    if isinstance(v, str):
        try:
            d = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
            if d.tzinfo is None:
                d = d.replace(tzinfo=datetime.UTC)
            return d.timestamp()
        except (ValueError, OverflowError):
            pass
    return now


def bounded_message(msg: str) -> tuple[str, bool]:
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


def normalise_line(line, task_id: int, seq: int, i: int, now: float) -> tuple[tuple, int, dict | None, int]:
    """Line `lines[i]` of a batch, to be stored as `seq`: (row, size, metric, cut).

    row: (task_id, seq, ts, level, stream, message, extra), the log_lines columns; the message is
    at most MAX_LINE bytes (`bounded_message`), `extra` (the JSON of the fields other than
    CORE_FIELDS) is dropped with FIELDS_MARKER past MAX_LINE bytes. size: the bytes charged to the
    task's quota (message + extra). metric: the task_metrics row of a metrics event, else None.
    cut: how many of the message and its fields were cut (0 to 2; the sly_log_lines_cut counter
    adds them). APIError (400) for a line the server refuses.
    """
    # Runs for every line of every batch: the usual line (a short str message, short level and
    # stream, a float ts, no fields but `cts`) calls no helper.
    if type(line) is not dict and not isinstance(line, dict):
        raise APIError(400, "invalid_request", f"lines[{i}] is not an object")
    cut = 0
    msg = line.get("message", "")
    if type(msg) is not str:
        msg = _message_text(msg, i, line)
    if len(msg) > _CUT_CHARS:
        msg, was_cut = bounded_message(msg)
        cut += was_cut
    if "\x00" in msg:  # container output may hold NUL bytes; no text column takes them
        msg = msg.replace("\x00", "\ufffd")
    level, stream = line.get("level") or "info", line.get("stream") or "stdout"
    if type(level) is not str or type(stream) is not str or len(level) > 16 or len(stream) > 16:
        _check_level_stream(level, stream, i)
    if "\x00" in level or "\x00" in stream:
        level, stream = level.replace("\x00", ""), stream.replace("\x00", "")
    ts = line.get("ts")
    if type(ts) is not float:
        ts = _ts(ts, now)
    elif ts - ts != 0.0:  # inf or nan: a number too large for a float (1e400)
        _nonfinite_line(i, line)
    keys = line.keys()
    metric = None
    extra: str | None
    cts = line.get("cts")
    if type(cts) is int and (keys == _USUAL_KEYS or keys == _USUAL_KEYS_SEQ):
        extra = f'{{"cts":{cts}}}'  # what _extra_json({"cts": n}) gives, without its cost
    elif len(line) > 4 or not keys <= _CORE_SET:
        extra, metric, dropped = _extra_fields(line, task_id, seq, i)
        if dropped:
            msg += FIELDS_MARKER % (dropped, MAX_LINE)
            cut += 1
    else:
        extra = None
    size = (len(msg) if msg.isascii() else len(msg.encode("utf-8", "surrogatepass"))) + (len(extra) if extra else 0)
    return (task_id, seq, ts, level, stream, msg, extra), size, metric, cut


def _message_text(msg, i: int, line: dict) -> str:
    """A message that is not a string, as text: a number as Python writes it, anything else as JSON."""
    msg = strict.dumps(msg) if not isinstance(msg, (int, float)) else str(msg)
    if msg in ("inf", "-inf", "nan"):
        _nonfinite_line(i, line)
    return msg


def _check_level_stream(level, stream, i: int) -> None:
    if not (isinstance(level, str) and isinstance(stream, str) and len(level) <= 16 and len(stream) <= 16):
        raise APIError(400, "invalid_request", f"lines[{i}]: level and stream must be short strings")


def _extra_fields(line: dict, task_id: int, seq: int, i: int) -> tuple[str | None, dict | None, int]:
    """The line's fields other than CORE_FIELDS: (their JSON or None, the task_metrics row of a
    metrics event or None, the bytes of JSON dropped for passing MAX_LINE or 0)."""
    ex = {k: v for k, v in line.items() if k not in CORE_FIELDS}
    if not ex:
        return None, None, 0
    try:
        extra = _extra_json(ex)
    except ValueError:  # a non-finite number (1e400): null in a metric, else a 400
        ex = _nonfinite_line(i, ex)
        extra = _extra_json(ex)
    if len(extra) > MAX_LINE:
        return None, None, len(extra)
    if ex.get("event_type") not in METRICS_EVENTS:
        return extra, None, 0
    epoch = ex.get("epoch")
    if isinstance(epoch, int) and not strict.INT64_MIN <= epoch <= strict.INT64_MAX:
        raise APIError(400, "integer_out_of_range", f"lines[{i}].epoch is outside int64")
    return (
        extra,
        {
            "task_id": task_id,
            "seq": seq,
            "type": str(ex.get("type") or "")[:32],
            "epoch": epoch if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None,
            "metrics": ex.get("metrics") if isinstance(ex.get("metrics"), dict) else {},
        },
        0,
    )


def batch_rows(
    task_id: int, first_seq: int, lines: list, quota: LogQuota, skip, now: float
) -> tuple[list[tuple], list[dict], int]:
    """The rows to store of lines first_seq.. : (log_lines rows, task_metrics rows, cuts).

    Seqs in `skip` (stored already: a re-sent batch) are neither stored nor charged again. The
    other lines are normalised and stored while their bytes fit in the quota's room; the line that
    would pass it is stored as the quota's marker, and the lines after it are dropped unread.
    """
    rows: list[tuple] = []
    metric_rows: list[dict] = []
    if quota.full:
        quota.drop(len(lines))
        return rows, metric_rows, 0
    append = rows.append
    room = quota.room
    spent = cut = 0
    seq = first_seq - 1
    for line in lines:
        seq += 1
        if skip and seq in skip:
            continue
        row, size, metric, n_cut = normalise_line(line, task_id, seq, seq - first_seq, now)
        cut += n_cut
        if spent + size > room:
            quota.charge(spent)
            quota.overflow()
            append((task_id, seq, row[2], "warning", AGENT, quota.marker, None))
            quota.drop(first_seq + len(lines) - 1 - seq)
            return rows, metric_rows, cut
        spent += size
        if metric is not None:
            metric_rows.append(metric)
        append(row)
    quota.charge(spent)
    return rows, metric_rows, cut
