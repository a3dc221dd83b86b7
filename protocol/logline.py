"""The durable task log line: one JSON object per line, `{"seq": n, "ts", "level", "stream", "message", ...}`.

The task process encodes (`encode`), the log-shipper reads the seq without decoding the line
(`seq_of`) and the server checks what it stores (`parse`). A line that is not one of ours raises
`BadLine`; a reader skips it with a marker and never dies of it.
"""

from __future__ import annotations

import json
import math

from protocol.tasks import AGENT, CONTAINER_STREAMS, STREAMS

MAX_LINE = 64 * 1024  # bytes of message; longer lines are split, nothing dropped
SPLIT_MARKER = " [line split: continues in the next line]"
RESERVED = frozenset({"ts", "cts", "stream", "seq"})  # set by the agent; a container's own are renamed
USUAL_KEYS = ("ts", "cts", "level", "stream", "message")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode
_json_str = getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
_INF = (float("inf"), float("-inf"))
_PREFIX = b'{"seq":'


class BadLine(ValueError):
    """A durable-log line that is not `{"seq": <int>, ...}`."""


def dumps(line: dict) -> str:
    """Compact JSON of a line (without its seq); the fast path for the usual container line."""
    if len(line) == 5 and tuple(line) == USUAL_KEYS:
        ts, cts, level, stream, message = line.values()
        if (
            type(ts) is float
            and type(cts) is int
            and type(level) is str
            and type(stream) is str
            and type(message) is str
            and ts == ts
            and ts not in _INF
        ):
            return (
                f'{{"ts":{ts!r},"cts":{cts:d},"level":{_json_str(level)},"stream":{_json_str(stream)},'
                f'"message":{_json_str(message)}}}'
            )
    return _dumps(_finite(line))


def _finite(line: dict) -> dict:
    # NaN/Infinity are not JSON; a metric that diverged is stored as null (docs/protocol.md).
    for v in line.values():
        if isinstance(v, float) and not math.isfinite(v):
            return json.loads(json.dumps(line, default=str), parse_constant=lambda _c: None)
        if isinstance(v, (dict, list)):
            return json.loads(json.dumps(line, default=str), parse_constant=lambda _c: None)
    return line


def with_seq(seq: int, body: str) -> str:
    """Prefix the seq to a line's JSON text (from `dumps`); the result ends with a newline."""
    if len(body) > 2:
        return f'{{"seq":{seq:d},{body[1:]}\n'
    return f'{{"seq":{seq:d}}}\n'


def encode(seq: int, line: dict) -> str:
    return with_seq(seq, dumps({k: v for k, v in line.items() if k != "seq"}))


def seq_of(raw: bytes) -> int:
    """The seq of a durable line (bytes, no newline) without decoding it; BadLine if it has none."""
    if not raw.startswith(_PREFIX):
        raise BadLine("the line does not start with a seq")
    end = len(_PREFIX)
    n = len(raw)
    while end < n and 48 <= raw[end] <= 57:
        end += 1
    if end == len(_PREFIX) or end >= n or raw[end] not in (44, 125):  # ',' or '}'
        raise BadLine("the line's seq is not an integer")
    return int(raw[len(_PREFIX) : end])


def parse(raw: bytes | str) -> dict:
    """Decode a durable line; BadLine unless it is a JSON object with an int seq."""
    try:
        obj = json.loads(raw, parse_constant=lambda _c: None)
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e.msg})") from None
    except ValueError as e:  # e.g. a number too long to convert
        raise BadLine(f"not JSON ({e})") from None
    if not isinstance(obj, dict) or type(obj.get("seq")) is not int or obj["seq"] < 0:
        raise BadLine("not an object with a non-negative integer seq")
    return obj


def container_stream(stream: str) -> str:
    """The stream a container's line may have: stdout or stderr, never the agent's."""
    return stream if stream in CONTAINER_STREAMS else "stdout"


def valid_stream(stream) -> bool:
    return stream in STREAMS


__all__ = [
    "AGENT",
    "BadLine",
    "MAX_LINE",
    "RESERVED",
    "SPLIT_MARKER",
    "container_stream",
    "dumps",
    "encode",
    "parse",
    "seq_of",
    "valid_stream",
    "with_seq",
]
