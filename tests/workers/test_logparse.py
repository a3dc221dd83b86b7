"""The frame decoder on synthetic Engine log streams (no Docker needed)."""

from __future__ import annotations

import struct

from workers.logparse import MAX_LINE, SPLIT_MARKER, FrameDecoder, normalize_event_type


def frame(stream: int, ts: str, body: bytes) -> bytes:
    payload = ts.encode() + b" " + body
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def stamp(i: int) -> str:
    return f"2026-11-29T22:41:{i // 1000:02d}.{i % 1000:03d}000001Z"


def stream_of(lines):
    return b"".join(frame(s, stamp(i), b) for i, (s, b) in enumerate(lines))


def test_frames_in_any_pieces_give_the_same_lines():
    data = stream_of(
        [
            (1, b"one\n"),
            (2, b"two\n"),
            (1, b'{"message": "m", "event_type": "EventType.PROGRESS", "current": 1, "total": 2, "subtask": "x"}\n'),
        ]
    )
    events = []
    dec, out = FrameDecoder(on_event=events.append), []
    for i in range(len(data)):  # one byte at a time
        dec.feed(data[i : i + 1], out)
    assert [(ln["stream"], ln["message"]) for ln in out] == [("stdout", "one"), ("stderr", "two"), ("stdout", "m")]
    assert out[2]["event_type"] == "progress" and out[2]["subtask"] == "x" and events == [out[2]]
    assert out[0]["cts"] == 1795992060000000001 and out[0]["ts"] == out[0]["cts"] / 1e9


def test_long_line_of_partial_frames_sharing_a_stamp_is_split_with_markers():
    piece = b"x" * 16384
    data = (
        b"".join(frame(1, stamp(5), piece) for _ in range(9))
        + frame(1, stamp(5), b"end\n")
        + frame(1, stamp(6), b"next\n")
    )
    dec, out = FrameDecoder(), []
    dec.feed(data, out)
    msgs = [ln["message"] for ln in out]
    assert msgs[-1] == "next" and all(ln.get("split") for ln in out[:-2]) and "split" not in out[-2]
    assert "".join(m.replace(SPLIT_MARKER, "") for m in msgs[:-1]) == "x" * 16384 * 9 + "end"
    assert all(len(m) == MAX_LINE + len(SPLIT_MARKER) for m in msgs[:-2])


def test_reopened_stream_skips_exactly_what_was_seen():
    lines = [(1, b"a\n"), (2, b"b\n"), (1, b"c\n"), (1, b"d\n"), (2, b"e\n")]
    data = stream_of(lines)
    cut = len(stream_of(lines[:3]))
    dec, out = FrameDecoder(), []
    dec.feed(data[:cut], out)  # the follow stream ended early here
    since = dec.resume_since()
    assert since is not None
    dec.feed(data, out)  # the engine sends from `since`: here, everything again
    assert [ln["message"] for ln in out] == ["a", "b", "c", "d", "e"]


def test_adoption_skips_lines_up_to_the_last_shipped_stamp():
    data = stream_of([(1, b"a\n"), (1, b"b\n"), (1, b"c\n")])
    first, out = FrameDecoder(), []
    first.feed(data, out)
    dec, rest = FrameDecoder(skip_until_ns=out[1]["cts"]), []
    dec.resume_since()
    dec.feed(data, rest)
    assert [ln["message"] for ln in rest] == ["c"]


def test_not_utf8_and_plain_json_values():
    dec, out = FrameDecoder(), []
    dec.feed(stream_of([(1, b"\xff\xfeok\n"), (1, b"[1, 2]\n"), (1, b'{"level": "CRITICAL", "seq": 3}\n')]), out)
    dec.finish(out)
    assert out[0]["message"] == "\ufffd\ufffdok" and out[1]["message"] == "[1, 2]"
    assert out[2]["level"] == "error" and out[2]["data_seq"] == 3 and out[2]["message"] == ""
    assert normalize_event_type("EventType.CHECKPOINT") == "checkpoint"


def test_an_sdk_json_line_glued_after_a_tqdm_bar_is_still_structured():
    # tqdm redraws with \r and cursor moves and ends with no newline: the SDK's next JSON line
    # arrives after the bar's last redraw, on the same line.
    bar = b"Uploading:  50%|#####     | 1/2\rUploading: 100%|##########| 2/2\r   \x1b[A"
    glued = bar + b'{"message": "archive uploaded", "level": "info", "sha256": "ab"}\n'
    plain_brace = b"weights {not json}\n"
    no_cr = b'progress {"message": "x"}\n'  # a `{"` without a redraw before it stays text
    dec, out = FrameDecoder(), []
    dec.feed(stream_of([(2, glued), (1, plain_brace), (1, no_cr)]), out)
    assert out[0]["message"] == "archive uploaded" and out[0]["sha256"] == "ab" and out[0]["stream"] == "stderr"
    assert out[1]["message"] == "weights {not json}" and "sha256" not in out[1]
    assert out[2]["message"] == 'progress {"message": "x"}'
