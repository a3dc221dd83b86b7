"""Container output -> task log lines.

Reads the Docker Engine's multiplexed log stream (8-byte frame headers, `timestamps=1`) straight
from the socket in large reads and turns each frame into a line dict
`{"ts", "cts", "level", "stream", "message", ...}`. A line that is a JSON object is structured:
`message`, `level` and `event_type` are lifted, every other field is kept; the Supervisely SDK's
`EventType.PROGRESS`/`CHECKPOINT`/`METRICS` become `progress`/`checkpoint`/`metrics`.
Lines longer than MAX_LINE bytes are split into pieces marked `split` (nothing is dropped);
bytes that are not UTF-8 are replaced.
"""

from __future__ import annotations

import calendar
import json
import struct
import time

from protocol.logline import MAX_LINE, RESERVED, SPLIT_MARKER, container_stream
from protocol.tasks import STDERR, STDOUT

# The engine's stream numbers. A container's line gets one of these two and nothing else: its own
# "stream" field is renamed (RESERVED), so container output never claims the agent's stream.
STREAMS = {1: STDOUT, 2: STDERR}
LEVELS = {
    "debug": "debug",
    "trace": "debug",
    "info": "info",
    "notice": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "err": "error",
    "critical": "error",
    "fatal": "error",
    "exception": "error",
}
_HEADER = struct.Struct(">BxxxL")
_loads = json.loads


def normalize_event_type(value) -> str:
    """`EventType.PROGRESS` (Supervisely SDK) -> `progress`; other spellings lower-cased."""
    s = str(value)
    if s.startswith("EventType."):
        s = s[len("EventType.") :]
    return s.lower()


def normalize_level(value) -> str:
    return LEVELS.get(str(value).lower(), "info")


def structure(line: dict, text: str) -> dict:
    """Fill `line` from a JSON object line (text starts with '{'); leave it plain when not JSON."""
    try:
        obj = _loads(text)
    except ValueError:
        return line
    if not isinstance(obj, dict):
        return line
    message = obj.pop("message", None)
    if message is None:
        message = obj.pop("msg", "")
    line["message"] = message if isinstance(message, str) else json.dumps(message)
    if "level" in obj:
        line["level"] = normalize_level(obj.pop("level"))
    if "event_type" in obj:
        obj["event_type"] = normalize_event_type(obj["event_type"])
    for k, v in obj.items():
        line[("data_" + k) if k in RESERVED else k] = v
    return line


def json_start(text: str) -> int:
    """Where the JSON object of a line starts, or -1. A line normally is one; but the SDK's tqdm
    bars (stderr, in production too) redraw with `\\r` and cursor moves and end with no newline,
    so the SDK's next JSON line arrives glued after a bar's last redraw: its object starts at the
    first `{"` after the line's last `\\r`."""
    if text.startswith("{"):
        return 0
    cr = text.rfind("\r")
    if cr < 0 or not text.endswith("}"):
        return -1
    return text.find('{"', cr)


class TimestampParser:
    """RFC 3339 with nanoseconds (Docker's `timestamps=1`) -> ns since the epoch, cached per second."""

    def __init__(self):
        self._seconds: dict[bytes, int] = {}

    def __call__(self, ts: bytes) -> int:
        # b"2026-11-29T22:41:11.113116909Z" (trailing zeros of the fraction trimmed; no fraction at all
        # when it is zero)
        head = ts[:19]
        sec = self._seconds.get(head)
        if sec is None:
            sec = calendar.timegm(time.strptime(head.decode(), "%Y-%m-%dT%H:%M:%S"))
            if len(self._seconds) > 4096:
                self._seconds.clear()
            self._seconds[head] = sec
        frac = ts[20:-1] if len(ts) > 20 and ts[19:20] == b"." else b""
        return sec * 1_000_000_000 + (int(frac.ljust(9, b"0")[:9]) if frac else 0)

    def parse_str(self, ts: str) -> int:
        """The same for a str stamp (the json-file log's `time`)."""
        head = ts[:19]
        sec = self._seconds.get(head)
        if sec is None:
            sec = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
            if len(self._seconds) > 4096:
                self._seconds.clear()
            self._seconds[head] = sec
        frac = ts[20:-1] if len(ts) > 20 and ts[19] == "." else ""
        return sec * 1_000_000_000 + (int(frac.ljust(9, "0")[:9]) if frac else 0)


class FrameDecoder:
    """Feed raw bytes of a multiplexed, timestamped log stream; get complete line dicts back.

    Docker's json-file driver stores a line longer than 16 KiB as several entries; a frame without
    a trailing newline is such a partial line and is joined with the next frame of its stream.
    `skip_until_ns`: lines whose container timestamp is not after it were shipped already (adoption).
    """

    def __init__(self, skip_until_ns: int | None = None, on_event=None):
        self.buf = b""
        self.pending = {1: b"", 2: b""}
        self.pending_cts = {1: 0, 2: 0}
        self.skip_until_ns = skip_until_ns
        # Per stream, the newest frame stamp taken in: a re-read of the log (the engine's follow
        # stream can end early) skips what was seen. Per stream because the engine stamps stdout
        # and stderr separately, so they may interleave slightly out of stamp order.
        # Frames of one long line share one stamp, so equal stamps are counted, not just compared.
        start = -1 if skip_until_ns is None else skip_until_ns
        self.seen = {1: start, 2: start}
        self.seen_n = {1: 1 << 62, 2: 1 << 62}  # adoption: every frame at the boundary was shipped
        self.skip = dict(self.seen)
        self.skip_n = dict(self.seen_n)
        self.parse_ts = TimestampParser()
        self.on_event = on_event  # called with each line that has an event_type
        self.last_cts: int | None = None

    def feed(self, data: bytes, out: list) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        unpack = _HEADER.unpack_from
        while end - pos >= 8:
            stream, size = unpack(buf, pos)
            if end - pos - 8 < size:
                break
            frame = buf[pos + 8 : pos + 8 + size]
            pos += 8 + size
            sp = frame.find(b" ")
            if sp < 0:
                continue
            if stream not in STREAMS:
                stream = 1
            self.take(stream, self.parse_ts(frame[:sp]), frame[sp + 1 :], out)
        self.buf = buf[pos:]

    def feed_jsonfile(self, data: bytes, out: list) -> None:
        """Bytes of the json-file driver's log file (`{"log", "stream", "time"}` a line)."""
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 1 :]
        chunk = buf[:end]
        try:
            # One parse for the whole chunk (a JSON array) instead of one per line.
            entries = _loads(b"[" + chunk.replace(b"\n", b",") + b"]")
        except ValueError:
            entries = None
        if entries is None or len(entries) != chunk.count(b"\n") + 1:
            self._feed_jsonfile_lines(chunk, out)
            return
        parse_ts, take, skip, seen, seen_n, pending = (
            self.parse_ts.parse_str,
            self.take,
            self.skip,
            self.seen,
            self.seen_n,
            self.pending,
        )
        on_event, append = self.on_event, out.append
        for e in entries:
            if type(e) is not dict:
                continue
            stream = 2 if container_stream(e.get("stream")) == STDERR else 1
            cts = parse_ts(e["time"])
            log = e.get("log", "")
            if (
                type(log) is str
                and log.endswith("\n")
                and cts > skip[stream]
                and not pending[stream]
                and len(log) <= MAX_LINE
                and log.isascii()
            ):
                # The usual line, as take() + _emit() would make it (ASCII: bytes and str agree).
                if cts == seen[stream]:
                    seen_n[stream] += 1
                else:
                    seen[stream], seen_n[stream] = cts, 1
                self.last_cts = cts
                text = log[:-1]
                line = {"ts": cts / 1e9, "cts": cts, "level": "info", "stream": STREAMS[stream], "message": text}
                start = json_start(text)
                if start >= 0:
                    structure(line, text[start:])
                    if "event_type" in line and on_event is not None:
                        on_event(line)
                append(line)
            else:
                take(stream, cts, log.encode("utf-8", "replace") if type(log) is str else str(log).encode(), out)

    def _feed_jsonfile_lines(self, chunk: bytes, out: list) -> None:
        loads, parse_ts, take = _loads, self.parse_ts, self.take
        for raw in chunk.split(b"\n"):
            try:
                e = loads(raw)
            except ValueError:
                continue
            take(
                2 if container_stream(e.get("stream")) == STDERR else 1,
                parse_ts(e["time"].encode()),
                e.get("log", "").encode("utf-8", "replace"),
                out,
            )

    def take(self, stream: int, cts: int, body: bytes, out: list) -> None:
        """One log entry (a line, or part of a long one when it does not end in a newline)."""
        if cts <= self.skip[stream]:
            if cts < self.skip[stream]:
                return
            if self.skip_n[stream] > 0:
                self.skip_n[stream] -= 1
                return
        if cts == self.seen[stream]:
            self.seen_n[stream] += 1
        else:
            self.seen[stream], self.seen_n[stream] = cts, 1
        if body.endswith(b"\n"):
            body = body[:-1]
            if self.pending[stream]:
                body = self.pending[stream] + body
                cts_line = self.pending_cts[stream]
                self.pending[stream] = b""
            else:
                cts_line = cts
            self._emit(stream, body, cts_line, cts, out)
        else:
            if not self.pending[stream]:
                self.pending_cts[stream] = cts
            self.pending[stream] += body
            if len(self.pending[stream]) > MAX_LINE:
                self._flush_pending(stream, cts, out)

    def resume_since(self) -> int | None:
        """Before re-opening the log: where the new stream must start so that nothing unseen is
        missed; frames already taken in are skipped then."""
        self.skip, self.skip_n = dict(self.seen), dict(self.seen_n)
        low = min(self.seen.values())
        return None if low < 0 else low

    def _flush_pending(self, stream: int, cts: int, out: list) -> None:
        data = self.pending[stream]
        while len(data) > MAX_LINE:
            self._emit_piece(stream, data[:MAX_LINE], self.pending_cts[stream], out)
            data = data[MAX_LINE:]
        self.pending[stream] = data

    def finish(self, out: list) -> None:
        """End of stream: a partial line left over is a line of its own."""
        for stream in (1, 2):
            if self.pending[stream]:
                self._emit(stream, self.pending[stream], self.pending_cts[stream], self.pending_cts[stream], out)
                self.pending[stream] = b""

    def _emit_piece(self, stream: int, piece: bytes, cts: int, out: list) -> None:
        out.append(
            {
                "ts": cts / 1e9,
                "cts": cts,
                "level": "info",
                "stream": STREAMS[stream],
                "message": piece.decode("utf-8", "replace") + SPLIT_MARKER,
                "split": True,
            }
        )

    def _emit(self, stream: int, body: bytes, cts: int, last_cts: int, out: list) -> None:
        # `cts` of a line is the stamp of its last frame: adoption resumes after the last shipped one.
        cts = last_cts
        self.last_cts = cts
        while len(body) > MAX_LINE:
            self._emit_piece(stream, body[:MAX_LINE], cts, out)
            body = body[MAX_LINE:]
        text = body.decode("utf-8", "replace")
        line = {"ts": cts / 1e9, "cts": cts, "level": "info", "stream": STREAMS[stream], "message": text}
        start = json_start(text)
        if start >= 0:
            structure(line, text[start:])
            if "event_type" in line and self.on_event is not None:
                self.on_event(line)
        out.append(line)
