"""Hung task processes, with real processes and real signals: a task process that sends no
heartbeat (SIGSTOP here) past HELPER_HUNG_AFTER is killed; with its container still running a
new task process re-attaches to it, else the task fails saying why."""

from __future__ import annotations

import os
import signal

import pytest

from tests.agent.conftest import assert_counter_log
from tests.support.procs import poll_for


@pytest.mark.slow
def test_hung_task_process_without_a_container_fails_the_task(server, make_agent):
    a = make_agent(server).start(HELPER_HUNG_AFTER=3)
    tid = a.create_task(config={"lines": 1000, "rate": 20})
    poll_for(lambda: a.task_pid(tid) and a.task(tid)["state"] == "running", timeout=15, what="task running")
    pid = a.task_pid(tid)
    os.kill(pid, signal.SIGSTOP)
    t = a.wait_state(tid, timeout=30)
    assert t["state"] == "failed" and t["error"].startswith("task process killed by SIGKILL (hung: no heartbeat"), t
    assert f"task {tid}: task process (pid {pid}) sent no heartbeat" in a.stderr()
    lines = a.logs(tid)
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    ok = a.create_task(config={"lines": 5, "rate": 0})  # the agent and its helpers carry on
    assert a.wait_state(ok)["state"] == "finished"
    assert_counter_log(a.logs(ok), 5)
    assert " died " not in a.stderr()  # the helpers kept beating meanwhile


@pytest.mark.slow
@pytest.mark.docker
def test_hung_task_process_is_replaced_and_reattaches_to_its_container(server, make_agent, busybox_image):
    a = make_agent(server).start(handler=None, HELPER_HUNG_AFTER=2)
    r = a.admin.post(
        a.server.url + "/api/v1/tasks",
        json={
            "agent_id": a.id,
            "type": "custom",
            "image": busybox_image,
            "command": ["sh", "-c", "for i in $(seq 1 150); do echo line $i; sleep 0.1; done"],
        },
    )
    r.raise_for_status()
    tid = r.json()["id"]

    def container_lines():
        return [line["message"] for line in a.logs(tid) if line["stream"] in ("stdout", "stderr")]

    poll_for(lambda: len(container_lines()) >= 5, timeout=30, what="container output")
    hung = a.task_pid(tid)
    os.kill(hung, signal.SIGSTOP)
    poll_for(lambda: a.task_pid(tid) not in (None, hung), timeout=20, what="a new task process")
    t = a.wait_state(tid, timeout=60)
    assert t["state"] == "finished", t
    assert container_lines() == [f"line {i}" for i in range(1, 151)]
    assert any("re-attached to container" in line["message"] for line in a.logs(tid))
    assert f"task process (pid {hung}) sent no heartbeat" in a.stderr()
