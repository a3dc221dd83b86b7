"""Strict input and safe output: the server's one JSON decoding rule and its second line of defence.

Input: a request body is JSON without NaN/Infinity (Python's json takes them by default; they are
not JSON), every number finite and every integer within int64 (what the database can hold).
`check_body` applies this to every JSON body before a route sees it
(server.http.errors.BodyLimitMiddleware calls it); the log batch, parsed by hand for speed, applies it
through `loads` itself, with the one documented exception that a non-finite metric value in a
`metrics` event is stored as null.

Output: `SafeJSONResponse` answers null for a non-finite float instead of failing, so a row
written before these checks (or by hand) can never turn a read into a 500.
"""

from __future__ import annotations

import gc
import json
import math
import re
import threading
from contextlib import contextmanager
from typing import Annotated, Any

import orjson
from fastapi import Path, Query
from fastapi.responses import JSONResponse

from protocol.errors import APIError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Row ids and log seqs are INTEGER columns, 32-bit on PostgreSQL: a larger id names no row and a
# larger seq could not be stored, so both are refused at the door (400) on every database.
ID_MAX = (1 << 31) - 1

# Ids in paths and queries: what a database row id can be.
RowId = Annotated[int, Path(ge=0, le=ID_MAX)]


def query_id(default=None, **kw):
    """A Query() for an id-like integer (agent_id, after ...): bounded as a row id, 0 to ID_MAX."""
    kw.setdefault("ge", 0)
    kw.setdefault("le", ID_MAX)
    return Query(default, **kw)


class NotStrictJSON(ValueError):
    """Valid for Python's json module, not for this server: NaN/Infinity, a non-finite or huge number."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail

    def api_error(self) -> APIError:
        return APIError(400, self.code, self.detail)


def _constant(name: str):
    raise NotStrictJSON("non_finite_number", f"the body holds {name}, which is not JSON; send finite numbers (or null)")


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise NotStrictJSON("non_finite_number", f"the number {text[:40]} is too large to be finite")
    return v


def _int(text: str) -> int:
    if len(text) > 20:  # cheap: int64 has at most 19 digits and a sign
        raise NotStrictJSON("integer_out_of_range", f"the integer {text[:25]}... is outside int64")
    v = int(text)
    if not INT64_MIN <= v <= INT64_MAX:
        raise NotStrictJSON("integer_out_of_range", f"the integer {text} is outside int64 [{INT64_MIN}, {INT64_MAX}]")
    return v


# orjson decodes and encodes several times faster than the json module, and its rules are the
# strict ones (no NaN/Infinity, no float that overflows); only integers differ: past 64 bits it
# turns them into floats. A body with a run of 19 or more digits (somewhere) takes the standard
# library's path, which checks int64 and says what is wrong; so does one orjson refuses.
# Bytes: every digit made "0" by translate, then a substring search (5 us on a 4 KB telemetry
# sample, where the regex took 95 us: it retries at every digit of every long number), a slice at
# a time: the translated copy of a whole 64 MiB body would be 64 MiB more while it is decoded.
_NUMS = bytes.maketrans(b"123456789E-", b"000000000e+")
_RUN_19 = b"0" * 19
_SCAN_SLICE = 1 << 20
_LONG_DIGITS_S = re.compile(r"[0-9]{19}")
_ORJSON_OUT = orjson.OPT_NON_STR_KEYS


def _scan(raw: bytes | bytearray, exponents: bool = False) -> tuple[bool, bool]:
    """(a run of 19 digits, an exponent of 3 digits: "e400", "E-0001"): the only ways to write an
    integer outside int64 or a float that overflows; a string that looks so only costs the hooks."""
    digits = exps = False
    for i in range(0, len(raw), _SCAN_SLICE):
        t = raw[i : i + _SCAN_SLICE + 18].translate(_NUMS)  # overlap: a run across two slices
        digits = digits or _RUN_19 in t
        exps = exponents and (exps or b"e000" in t or b"e+000" in t)
        if digits and (exps or not exponents):
            break
    return digits, exps


def _fast_loads(raw: bytes | str) -> Any:
    """What `raw` decodes to by orjson, or _SLOW when the standard library must decide."""
    if isinstance(raw, (bytes, bytearray)):
        if _scan(raw)[0]:
            return _SLOW
    elif _LONG_DIGITS_S.search(raw):
        return _SLOW
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:  # not JSON, NaN, an overflowing float, a lone surrogate: decided below
        return _SLOW


_SLOW = object()


def loads(raw: bytes | str, *, on_constant=None, lean: bool = False) -> Any:
    """Decode a body strictly: NotStrictJSON for NaN/Infinity, a non-finite number, an integer
    outside int64; json.JSONDecodeError for what is not JSON at all.

    With `on_constant` (the log batch), NaN/Infinity tokens are passed to it (its result is the
    value), an overflowing float decodes to inf and integers are not checked: the caller decides
    where such values may stand and checks what it stores in typed columns; a batch of thousands
    of lines costs no extra call per number that way.

    `lean` (a large body, decoded in a worker thread): the standard library decodes it, with the
    garbage collector paused. orjson first builds a whole document of its own (yyjson's), then the
    Python objects: for a 60 MiB project body the peak was 712 MiB over the body, 516 MiB this
    way. Collections over the growing result made the standard library's decoding 5.5 CPU-s
    instead of 1.6 (orjson's took 2.7, 2.2 of them collecting)."""
    value = _SLOW if lean else _fast_loads(raw)
    if value is not _SLOW:
        return value
    if on_constant is not None:
        value = json.loads(raw, parse_constant=on_constant)
    elif lean and isinstance(raw, (bytes, bytearray)):
        # A Python call per number only where a number could be out of range.
        digits, exps = _scan(raw, exponents=True)
        with gc_paused():
            value = json.loads(
                raw,
                parse_constant=_constant,
                parse_float=_float if digits or exps else float,
                parse_int=_int if digits else int,
            )
    else:
        value = json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
    found = _SURROGATE_B.search(raw) if isinstance(raw, (bytes, bytearray)) else _SURROGATE_S.search(raw)
    return _replace_lone_surrogates(value) if found else value


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused():
    """No cyclic garbage collection while this runs (JSON makes no cycles; the collector would
    walk the growing result again and again). Threads may nest it: the last one out resumes it."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


# A lone UTF-16 surrogate escape ("\ud800" without its pair) decodes to a str that is not text:
# no database column takes it. orjson refuses it; on the standard library's path it becomes
# U+FFFD, as a UTF-8 decoder does with a broken sequence, so a log line keeps its place.
_SURROGATE_B = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_S = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_CHAR = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(obj: Any) -> Any:
    """In place: the value was just decoded and no one else holds it, and a copy of every list and
    object would double a large body's memory."""
    if isinstance(obj, str):
        return _SURROGATE_CHAR.sub("\ufffd", obj) if _SURROGATE_CHAR.search(obj) else obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _replace_lone_surrogates(v)  # same keys: the dict does not change size
        if any(_replace_lone_surrogates(k) is not k for k in obj):
            return {_replace_lone_surrogates(k): v for k, v in obj.items()}
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _replace_lone_surrogates(v)
    return obj


NOT_JSON = object()


def check_body(raw: bytes, lean: bool = False) -> Any:
    """Raise NotStrictJSON when `raw` is JSON only by Python's lax rules; anything else passes
    (a body that is not JSON at all gets the route's own 400). Returns what `raw` decodes to, so
    a route need not decode it again, or NOT_JSON. `lean`: a large body (see `loads`)."""
    if not raw:
        return NOT_JSON
    try:
        value = loads(raw, lean=lean)
    except NotStrictJSON:
        raise
    except (ValueError, RecursionError):
        return NOT_JSON
    if b"\\u0000" in raw:  # a NUL in a string: no text column takes it (PostgreSQL refuses it)
        raise NotStrictJSON(
            "nul_character", "a string in the body holds a NUL character (\\u0000), which no text field may hold"
        )
    return value


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (lists and dicts copied only if needed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def has_nonfinite(obj: Any) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(has_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_nonfinite(v) for v in obj)
    return False


_compact = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


def dumps_bytes(obj: Any) -> bytes:
    """Compact JSON (UTF-8); a non-finite float becomes null."""
    try:
        return orjson.dumps(obj, option=_ORJSON_OUT)  # non-finite floats are null there already
    except TypeError:  # what orjson does not take (an integer past 64 bits, a lone surrogate)
        try:
            return _compact(obj).encode()
        except ValueError:
            return _compact(finite(obj)).encode()


def dumps(obj: Any) -> str:
    """Compact JSON; a non-finite float becomes null."""
    return dumps_bytes(obj).decode()


class SafeJSONResponse(JSONResponse):
    """JSONResponse that answers null for NaN/Infinity instead of raising (the read paths' guard)."""

    def render(self, content: Any) -> bytes:
        return dumps_bytes(content)
