"""The agent with the real Docker handler: a replaced task process / agent re-attaches to the container."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.support.procs import poll_for

pytestmark = pytest.mark.docker

COUNT = ["sh", "-c", "for i in $(seq 1 40); do echo line $i; sleep 0.1; done"]


def create(a, image) -> int:
    r = a.admin.post(
        a.server.url + "/api/v1/tasks", json={"agent_id": a.id, "type": "custom", "image": image, "command": COUNT}
    )
    r.raise_for_status()
    return r.json()["id"]


def container_lines(a, tid) -> list[str]:
    return [line["message"] for line in a.logs(tid) if line["stream"] in ("stdout", "stderr")]


@pytest.mark.slow
def test_task_process_killed_while_its_container_runs(server, make_agent, busybox_image):
    a = make_agent(server).start(handler=None)
    tid = create(a, busybox_image)
    poll_for(lambda: len(container_lines(a, tid)) >= 5, timeout=30, what="container output")
    os.kill(a.task_pid(tid), signal.SIGKILL)
    t = a.wait_state(tid, timeout=60)
    assert t["state"] == "finished", t
    assert container_lines(a, tid) == [f"line {i}" for i in range(1, 41)]
    assert any("re-attached to container" in line["message"] for line in a.logs(tid))


@pytest.mark.slow
def test_agent_killed_and_restarted_adopts_the_container(server, make_agent, busybox_image):
    a = make_agent(server).start(handler=None)
    tid = create(a, busybox_image)
    poll_for(lambda: len(container_lines(a, tid)) >= 5, timeout=30, what="container output")
    children = [psutil.Process(p) for p in a.titles()]
    a.proc.kill()
    a.proc.wait(10)
    psutil.wait_procs(children, timeout=10)
    a.start(handler=None)
    t = a.wait_state(tid, timeout=60)
    assert t["state"] == "finished", t
    assert container_lines(a, tid) == [f"line {i}" for i in range(1, 41)]
