"""Re-attaching to a task's container (agent restart): resume after the last shipped line."""

from __future__ import annotations

import pytest

from tests.support.procs import poll_for
from tests.workers.ctx import TestContext
from workers import custom
from workers.container import docker_client, spawn_container
from workers.docker_task import prepare
from workers.logparse import FrameDecoder

pytestmark = pytest.mark.docker


def started_container(node, task_image, n, delay):
    """What the first task process did before the agent died: prepare, spawn, ship some lines."""
    ctx = node.ctx(type="custom", image=task_image, command=["count.sh", str(n), str(delay)])
    ctx.set_phase("preparing")
    prepare(ctx)
    client = docker_client()
    container = spawn_container(client, ctx)
    ctx.set_phase("running")
    return ctx, client, container


def shipped_until(container, k):
    """The container timestamp of its k-th line, read the way the handler reads it."""
    r = container.client.api._get(
        container.client.api._url("/containers/{0}/logs", container.id),
        params={"stdout": 1, "stderr": 1, "timestamps": 1},
        stream=False,
    )
    out: list = []
    FrameDecoder().feed(r.content, out)
    return out[k - 1]["cts"], [ln["message"] for ln in out[:k]]


def adopt(first, last_cts):
    ctx = TestContext(first.task, first.config, adopt=True, last_cts=last_cts)
    ctx.phases = ["running"]
    return ctx


@pytest.mark.slow
def test_adopt_running_container_resumes_without_gap_or_duplicate(node, task_image, log_source):
    first, client, container = started_container(node, task_image, 60, 0.02)
    poll_for(lambda: b"line 20" in container.logs(), timeout=20, what="20 lines")
    cts, before = shipped_until(container, 15)
    ctx = adopt(first, cts)
    outcome = custom.run(ctx)
    assert outcome.state == "finished", outcome
    assert before + ctx.messages("stdout") == [f"line {i}" for i in range(1, 61)]
    assert any(m.startswith("re-attached to container") for m in ctx.messages("agent"))
    assert {a["path"] for a in node.user.task_artifacts(ctx.task_id)} == {"out.txt"}


def test_adopt_exited_container_reads_the_rest_and_finishes(node, task_image, log_source):
    first, client, container = started_container(node, task_image, 10, 0)
    container.wait(timeout=20)
    cts, before = shipped_until(container, 4)
    ctx = adopt(first, cts)
    assert custom.run(ctx).state == "finished"
    assert before + ctx.messages("stdout") == [f"line {i}" for i in range(1, 11)]


def test_adopt_without_container_fails_the_task(node, task_image):
    first = node.ctx(type="custom", image=task_image, command="env.sh")
    first.set_phase("preparing")
    first.set_phase("running")
    first.emit([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "line 1", "cts": 10**18}])
    ctx = adopt(first, 10**18)  # the container had printed, and is gone now
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and outcome.error == "container lost while the agent was down"


def test_adopt_before_the_container_started_prepares_again(node, task_image):
    first = node.ctx(type="custom", image=task_image, command="env.sh")
    first.set_phase("preparing")
    ctx = adopt(first, None)  # died while preparing: no container, no container line
    ctx.phases = ["preparing"]
    outcome = custom.run(ctx)
    assert outcome.state == "finished", outcome
    assert f"TASK_ID={ctx.task_id} TASK_TYPE=custom PYTHONUNBUFFERED=1" in ctx.messages("stdout")
