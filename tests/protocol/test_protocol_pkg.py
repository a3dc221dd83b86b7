"""The protocol package: stdlib only, one definition each, and its encode/parse pairs agree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from protocol import backoff, endpoints, errors, logline, states, tasks

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_protocol_imports_only_the_standard_library():
    for py in (ROOT / "protocol").rglob("*.py"):
        for mod in _imports(py):
            assert mod == "protocol" or mod in sys.stdlib_module_names, f"{py.name} imports {mod}"


@pytest.mark.parametrize(
    "line",
    [
        {"ts": 1.5, "cts": 7, "level": "info", "stream": "stdout", "message": "plain"},
        {"message": "x", "event_type": "metrics", "metrics": {"loss": 0.5}, "stream": "stdout"},
        {"message": "ünïcode \"quoted\"\n", "level": "error", "stream": "stderr"},
        {},
    ],
)
def test_encode_parse_round_trip(line):
    text = logline.encode(41, line)
    assert text.endswith("\n") and text.count("\n") == 1
    raw = text[:-1].encode()
    assert logline.seq_of(raw) == 41
    back = logline.parse(raw)
    assert back.pop("seq") == 41 and back == line


def test_nan_metric_is_stored_as_null():
    raw = logline.encode(0, {"metrics": {"loss": float("nan"), "acc": float("inf")}, "x": float("-inf")})
    back = logline.parse(raw.strip())
    assert back["metrics"] == {"loss": None, "acc": None} and back["x"] is None


@pytest.mark.parametrize(
    "raw", [b"garbage-without-seq", b'{"seq":', b'{"seq":"3"}', b'{"seq":-1}', b"[1]", b'{"seq":1x}', b""]
)
def test_bad_lines_raise_badline(raw):
    with pytest.raises(logline.BadLine):
        logline.parse(raw)
        logline.seq_of(raw)


def test_container_lines_never_claim_the_agent_stream():
    assert logline.container_stream("agent") == "stdout"
    assert logline.container_stream("stderr") == "stderr"


def test_state_edges_cover_every_state_and_finals_are_terminal():
    for st in states.TaskState:
        assert st in states.EDGES
    for final in states.FINAL:
        for dst in states.TaskState:
            assert final not in states.EDGES[dst], f"{final} -> {dst} must not be allowed"
    states.check_transition(states.TaskState.RUNNING, states.TaskState.RUNNING)
    with pytest.raises(states.IllegalTransition):
        states.check_transition(states.TaskState.QUEUED, states.TaskState.RUNNING)


def test_task_types_and_error_decoding():
    assert tasks.TASK_TYPES == ("train", "inference", "custom", "app", "cleanup")
    assert tasks.CONTAINER_TYPES == {"train", "inference", "custom", "app"}
    e = errors.decode_error(409, b'{"error":"type_not_allowed","detail":"no","agent_id":3}', method="POST", path="/p")
    assert (e.status, e.code, e.detail, e.extra) == (409, "type_not_allowed", "no", {"agent_id": 3})
    assert isinstance(errors.decode_error(401, b"{}"), errors.AuthError)
    e = errors.decode_error(502, b"<html>bad gateway</html>")
    assert e.code == "http_error" and "bad gateway" in e.detail
    assert errors.decode_error(None, None).code == "no_answer"
    assert endpoints.path(endpoints.TASK_LOGS, task_id=5) == "/agent/v1/tasks/5/logs"


def test_backoff_grows_caps_and_jitters():
    def mid(a, b):
        return (a + b) / 2

    assert backoff.backoff_delay(1, 0.2, 5.0, rng=mid) == pytest.approx(0.2)
    assert backoff.backoff_delay(3, 0.2, 5.0, rng=mid) == pytest.approx(0.8)
    assert backoff.backoff_delay(100, 0.2, 5.0, rng=mid) == pytest.approx(5.0)
    assert backoff.backoff_delay(1, 1.0, 5.0, rng=lambda a, b: a) == 0.5
