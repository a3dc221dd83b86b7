"""The pure parts of log ingest, without a server or a database: a line normalised to its row
(server.logs.lines), the quota accountant (server.logs.quota), and the two composed for a batch."""

from __future__ import annotations

import math

import pytest

from protocol.errors import APIError
from protocol.logline import MAX_LINE
from server.logs.lines import CUT_MARKER, FIELDS_MARKER, batch_rows, normalise_line, parse_batch
from server.logs.quota import QUOTA_MARKER, LogQuota

NOW = 1234.5


def norm(line, seq=7, i=2):
    return normalise_line(line, 42, seq, i, NOW)


def line(n: int, message: str = "x" * 10, **extra) -> dict:
    return {"ts": 1700000000.0 + n, "level": "info", "stream": "stdout", "message": message, **extra}


# --- one line -> its row ---


def test_the_agents_usual_line_keeps_cts_as_its_extra_json():
    row, size, metric, cut = norm({"ts": 1.5, "cts": 99, "level": "info", "stream": "stderr", "message": "héllo"})
    assert row == (42, 7, 1.5, "info", "stderr", "héllo", '{"cts":99}')
    assert size == len("héllo".encode()) + len('{"cts":99}')  # bytes, not characters
    assert (metric, cut) == (None, 0)


def test_a_line_without_other_fields_has_no_extra_and_defaults():
    row, size, metric, cut = norm({"message": "hi", "level": "", "stream": None})
    assert row == (42, 7, NOW, "info", "stdout", "hi", None)  # no ts: the server's time
    assert (size, metric, cut) == (2, None, 0)


@pytest.mark.parametrize(
    "ts, want",
    [
        (5, 5.0),
        ("1970-01-01T00:00:10Z", 10.0),
        ("1970-01-01T00:00:10", 10.0),
        ("not a time", NOW),
        (True, NOW),
        (None, NOW),
    ],
)
def test_ts_is_read_as_a_number_or_an_iso_time(ts, want):
    assert norm({"ts": ts, "message": ""})[0][2] == want


def test_a_message_that_is_not_a_string_is_stored_as_text():
    assert norm({"message": 12})[0][5] == "12"
    assert norm({"message": 1.5})[0][5] == "1.5"
    assert norm({"message": {"a": [1, None]}})[0][5] == '{"a":[1,null]}'


def test_nul_bytes_are_replaced_in_the_message_and_dropped_from_level_and_stream():
    row = norm({"message": "a\x00b", "level": "in\x00fo", "stream": "\x00out"})[0]
    assert row[3:6] == ("info", "out", "a\ufffdb")


def test_a_message_over_the_line_limit_is_cut_with_a_marker():
    row, size, _, cut = norm({"message": "é" * MAX_LINE})  # 2 bytes each: twice the limit
    assert cut == 1
    head = "é" * (MAX_LINE // 2)
    assert row[5] == head + CUT_MARKER % (MAX_LINE, MAX_LINE)
    assert size == len(row[5].encode())


def test_a_message_at_the_line_limit_is_kept():
    row, size, _, cut = norm({"message": "a" * MAX_LINE})
    assert (row[5], size, cut) == ("a" * MAX_LINE, MAX_LINE, 0)


def test_other_fields_are_kept_as_json_and_dropped_past_the_line_limit():
    row, size, _, cut = norm({"message": "m", "step": 3, "tags": ["a"]})
    assert (row[6], cut) == ('{"step":3,"tags":["a"]}', 0)
    assert size == 1 + len(row[6])
    row, size, _, cut = norm({"message": "m", "blob": "b" * MAX_LINE})
    dropped = len('{"blob":""}') + MAX_LINE
    assert row[5:] == ("m" + FIELDS_MARKER % (dropped, MAX_LINE), None)
    assert (size, cut) == (len(row[5]), 1)


def test_a_line_cut_twice_counts_two_cuts():
    _, _, _, cut = norm({"message": "a" * (MAX_LINE + 1), "blob": "b" * MAX_LINE})
    assert cut == 2


def test_a_metrics_event_gives_its_metrics_row():
    row, _, metric, _ = norm(
        {"message": "", "event_type": "metrics", "type": "t" * 40, "epoch": 3, "metrics": {"loss": 0.5}}
    )
    assert metric == {"task_id": 42, "seq": 7, "type": "t" * 32, "epoch": 3, "metrics": {"loss": 0.5}}
    assert '"event_type":"metrics"' in row[6]  # the line keeps its fields too
    _, _, metric, _ = norm({"event_type": "EventType.METRICS", "epoch": True, "metrics": [1]})
    assert (metric["type"], metric["epoch"], metric["metrics"]) == ("", None, {})
    assert norm({"event_type": "other", "metrics": {"a": 1}})[2] is None


def test_a_metrics_event_whose_fields_pass_the_limit_gives_no_metrics_row():
    _, _, metric, cut = norm({"event_type": "metrics", "metrics": {"a": "b" * MAX_LINE}})
    assert (metric, cut) == (None, 1)


def test_a_non_finite_metric_value_is_null_and_elsewhere_a_400():
    row, _, metric, _ = norm({"event_type": "metrics", "metrics": {"loss": 1e400}})  # a float that overflowed
    assert metric["metrics"] == {"loss": None} and '"loss":null' in row[6]
    with pytest.raises(APIError) as e:
        norm({"message": "", "other": math.inf})
    assert e.value.code == "non_finite_number" and "lines[2].other" in e.value.detail


@pytest.mark.parametrize(
    "bad, code, where",
    [
        ([1], "invalid_request", "lines[2] is not an object"),
        ({"level": "x" * 17}, "invalid_request", "lines[2]: level and stream must be short strings"),
        ({"stream": 5}, "invalid_request", "lines[2]: level and stream must be short strings"),
        ({"ts": math.inf}, "non_finite_number", "lines[2].ts holds NaN or Infinity"),
        ({"message": math.nan}, "non_finite_number", "lines[2].message holds NaN or Infinity"),
        ({"ts": 2**63}, "integer_out_of_range", "a line's ts is outside int64"),
        ({"event_type": "metrics", "epoch": 2**63}, "integer_out_of_range", "lines[2].epoch is outside int64"),
    ],
)
def test_a_line_the_server_refuses_is_a_400_naming_it(bad, code, where):
    with pytest.raises(APIError) as e:
        norm(bad)
    assert (e.value.status, e.value.code) == (400, code)
    assert where in e.value.detail


# --- the quota accountant ---


def test_no_quota_leaves_room_for_anything():
    q = LogQuota(0, 10**12)
    assert not q.full and q.room > 10**15
    q.charge(500)
    assert (q.used, q.added, q.dropped) == (10**12 + 500, 500, 0)


def test_room_is_what_the_quota_leaves():
    q = LogQuota(1000, 400)
    assert (q.full, q.room) == (False, 600)
    q.charge(100)
    assert (q.room, q.used, q.added) == (500, 500, 100)


def test_overflow_stores_the_marker_and_fills_the_log():
    q = LogQuota(1000, 990)
    q.overflow()
    marker = QUOTA_MARKER % 1000
    assert q.marker == marker == "log quota of 1000 bytes reached; later lines are dropped"
    assert (q.full, q.room, q.dropped) == (True, 0, 1)
    assert (q.used, q.added) == (990 + len(marker), len(marker))
    q = LogQuota(1000, 100)  # the marker is charged, and the log counts as full after it
    q.overflow()
    assert q.used == 1000


def test_a_log_at_its_quota_is_full_from_the_start():
    assert LogQuota(1000, 1000).full and LogQuota(1000, 1500).room == 0


# --- a batch: the line normaliser and the accountant composed ---


def test_a_batch_under_the_quota_stores_every_line():
    q = LogQuota(10**6, 0)
    lines = [line(n) for n in range(3)] + [line(3, event_type="metrics", metrics={"a": 1})]
    rows, metric_rows, cut = batch_rows(42, 10, lines, q, set(), NOW)
    assert [r[1] for r in rows] == [10, 11, 12, 13]
    assert [m["seq"] for m in metric_rows] == [13]
    assert q.added == sum(len(r[5]) + len(r[6] or "") for r in rows) == q.used
    assert (cut, q.dropped, q.full) == (0, 0, False)


def test_seqs_stored_already_are_neither_stored_nor_charged_nor_read():
    q = LogQuota(0, 0)
    rows, _, _ = batch_rows(42, 10, [line(0), "not even a line", line(2)], q, {11}, NOW)
    assert [r[1] for r in rows] == [10, 12]
    assert q.added == 20


def test_the_line_that_passes_the_quota_becomes_the_marker_and_later_ones_are_dropped_unread():
    q = LogQuota(25, 0)
    lines = [line(0), line(1, event_type="metrics", metrics={"a": 1}), "never read", line(3)]
    rows, metric_rows, cut = batch_rows(42, 0, lines, q, set(), NOW)
    assert rows[0][5] == "x" * 10
    assert rows[1] == (42, 1, 1700000001.0, "warning", "agent", QUOTA_MARKER % 25, None)
    assert len(rows) == 2 and metric_rows == []  # the marker's line keeps no metrics row
    assert (q.dropped, q.full, q.added) == (3, True, 10 + len(QUOTA_MARKER % 25))
    assert q.used == 10 + len(QUOTA_MARKER % 25)


def test_a_line_that_fills_the_quota_exactly_is_stored():
    q = LogQuota(20, 0)
    rows, _, _ = batch_rows(42, 0, [line(0), line(1)], q, set(), NOW)
    assert [r[5] for r in rows] == ["x" * 10, "x" * 10]
    assert (q.used, q.full, q.dropped) == (20, False, 0)


def test_a_full_log_stores_nothing_and_drops_every_line():
    q = LogQuota(20, 20)
    assert batch_rows(42, 0, [line(0), "never read"], q, set(), NOW) == ([], [], 0)
    assert (q.dropped, q.added) == (2, 0)


def test_cuts_are_counted_over_the_batch():
    q = LogQuota(0, 0)
    long = "a" * (MAX_LINE + 1)
    _, _, cut = batch_rows(42, 0, [line(0, long), line(1), line(2, long)], q, set(), NOW)
    assert cut == 2


# --- the body ---


def test_the_body_is_parsed_strictly_except_non_finite_metric_values():
    first, lines = parse_batch(
        b'{"first_seq": 3, "lines": [{"message": "m", "event_type": "metrics", "metrics": {"loss": NaN, "acc": 1.0}}]}'
    )
    assert first == 3 and lines[0]["metrics"] == {"loss": None, "acc": 1.0}
    for body, code in [
        (b'{"first_seq": 0, "lines": [{"message": NaN}]}', "non_finite_number"),
        (b'{"first_seq": -1, "lines": []}', "invalid_request"),
        (b'{"first_seq": 0, "lines": {}}', "invalid_request"),
        (b'[]', "invalid_request"),
        (b'{', "malformed_json"),
    ]:
        with pytest.raises(APIError) as e:
            parse_batch(body)
        assert e.value.code == code, body
