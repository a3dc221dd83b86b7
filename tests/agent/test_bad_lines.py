"""A bad line harms one task at most: lines in a task's durable log that are not log lines are
skipped by the log-shipper (logged and counted), every good line still arrives once, the shipper
is never restarted for it, and other tasks keep shipping; a task whose log file cannot be read
fails its own shipping with a clear error line and nothing else."""

from __future__ import annotations

import logging
import os
import time

import pytest

from agent.log_shipper import LogShipper
from node import tasklog
from node.api import AgentAPI
from node.config import load_config
from node.masking import Masker
from node.storage import ensure_layout
from protocol import logline
from tests.agent.conftest import assert_counter_log
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for


@pytest.mark.slow
def test_garbage_in_a_task_log_harms_neither_the_shipper_nor_other_tasks(server, make_agent):
    """A real agent: one task appends 20 lines that are not log lines between its 60 own and emits
    an empty line dict (`emit([{}])`, which once killed the shipper); a second task runs beside it."""
    a = make_agent(server).start(handler="dispatch", MAX_TASKS=2)
    shipper = a.child("log-shipper")
    bad = a.create_task(config={"handler": "garbler", "lines": 60, "rate": 30, "every": 3})
    good = a.create_task(config={"handler": "counter", "lines": 60, "rate": 20})
    assert a.wait_state(bad)["state"] == "finished"
    assert a.wait_state(good)["state"] == "finished"

    lines = a.logs(bad)
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    out = [line["message"] for line in lines if line["stream"] == "stdout"]
    assert [m for m in out if m] == [f"line {i}" for i in range(60)]  # each good line once, in order
    assert out.count("") == 1  # the empty line dict, stored as one line
    assert "appended 20 bad lines" in [line["message"] for line in lines if line["stream"] == "agent"]
    assert not any(
        "garbage" in line["message"] or "nowhere" in line["message"] or "repeated" in line["message"] for line in lines
    )
    assert_counter_log(a.logs(good), 60)

    assert a.child("log-shipper") == shipper and a.proc.poll() is None  # never died, never restarted
    agent_log = next((a.root / "logs").glob("log_*.txt")).read_text()
    assert "log-shipper died" not in agent_log
    assert f"task {bad}: skipped a line of its log that is not a log line" in agent_log
    assert f"task {good}: skipped" not in agent_log


@pytest.fixture
def leased(server, tmp_path):
    """An agent's local storage and two tasks leased to it on the real server: (config, [task ids])."""
    admin = server.admin()
    body = admin.post(server.url + "/api/v1/agents", json={"name": "bad-lines-unit"}).json()
    ids = [
        admin.post(
            server.url + "/api/v1/tasks", json={"agent_id": body["id"], "type": "custom", "image": "none"}
        ).json()["id"]
        for _ in range(2)
    ]
    fake = FakeAgent(server.url, body["token"])
    fake.connect()
    got = []
    poll_for(
        lambda: (
            got.extend(t["id"] for t in fake.poll(free_slots=2, running=got, wait=1).get("tasks") or [])
            or set(ids) <= set(got)
        ),
        timeout=15,
        what="both tasks leased",
    )
    config = load_config(
        {"SERVER_ADDRESS": server.url, "ACCESS_TOKEN": body["token"], "AGENT_HOST_DIR": str(tmp_path / "root")}
    )
    ensure_layout(config)
    yield config, ids, admin


def _server_lines(server, admin, task_id):
    return admin.get(f"{server.url}/api/v1/tasks/{task_id}/logs", params={"after": -1, "limit": 1000}).json()["lines"]


def test_an_unreadable_log_fails_that_task_alone(server, leased, caplog):
    """A task whose log is a FIFO: one clear error line, no hang, no exception; the other task ships,
    including past a line that only looks like ours (the server refuses that batch, the shipper
    checks each line and skips it)."""
    config, (broken, fine), admin = leased
    tasklog.task_logs_dir(config, broken).mkdir(parents=True)
    os.mkfifo(tasklog.new_log_path(config, broken))
    w = tasklog.TaskLogWriter(config, fine, Masker(config.access_token))
    w.write([{"message": "m0"}])
    with open(w.path, "ab") as f:
        f.write(b'{"seq":1,"message":"not JSON after all\n')  # a seq prefix, then a broken line
    w.write([{"message": f"m{i}"} for i in range(1, 5)])
    for tid in (broken, fine):
        tasklog.register_active(config, tid)
    shipper = LogShipper(config)
    shipper.api = AgentAPI(config.server_address, config.access_token, timeout=10, retries=0)
    with caplog.at_level(logging.INFO, logger="agent.log_shipper"):
        poll_for(
            lambda: (
                shipper.loop_once(time.monotonic(), ignore_backoff=True) is not None
                and tasklog.acked_seq(config, fine) == 4
            ),
            timeout=15,
            what="the fine task's lines acked",
        )
        for _ in range(3):
            shipper.loop_once(time.monotonic(), ignore_backoff=True)
    assert [line["message"] for line in _server_lines(server, admin, fine)] == [f"m{i}" for i in range(5)]
    assert shipper.bad_lines == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"task {broken}: cannot ship its log" in errors[0] and "not a regular file" in errors[0]
    assert _server_lines(server, admin, broken) == []
    assert not shipper.pending(shipper.cursors[broken])  # a drain does not wait for it


def test_badline_is_what_the_shipper_skips():
    # The shipper decides with protocol.logline: what it skips is exactly what seq_of refuses.
    for raw in (b"garbage-without-seq", b'{"seq":', b'{"seq":"3"}', b'{"seq":1x}'):
        with pytest.raises(logline.BadLine):
            logline.seq_of(raw)
    assert logline.seq_of(logline.encode(5, {}).rstrip("\n").encode()) == 5  # emit([{}]) is a good line
