"""Container tasks end to end through the handlers: real server, real Docker engine."""

from __future__ import annotations

import threading

import pytest

from tests.support.procs import poll_for
from workers import custom, docker_task
from workers.container import find_container
from workers.container_spec import LABEL_AGENT, LABEL_TASK, container_name, create_kwargs
from workers.logparse import MAX_LINE, SPLIT_MARKER

pytestmark = pytest.mark.docker


def test_env_mount_and_no_privileges(node, task_image, docker_client):
    ctx = node.ctx(type="custom", image=task_image, command="env.sh")
    outcome = custom.run(ctx)
    assert outcome.state == "finished", outcome
    out = ctx.messages("stdout")
    assert f"TASK_ID={ctx.task_id} TASK_TYPE=custom PYTHONUNBUFFERED=1" in out
    assert any(line.split() == ["NoNewPrivs:", "1"] for line in out), out
    assert "task_config.json" in out and "results" in out
    assert any("No such file" in line for line in ctx.messages()), "the docker socket must not be mounted"
    assert ctx.phases == ["preparing", "running", "uploading"]
    assert find_container(docker_client, ctx.task_id, ctx.config.identity) is None


def test_log_lines_split_replaced_structured(node, task_image, log_source):
    ctx = node.ctx(type="custom", image=task_image, command=["weird.sh"])
    assert custom.run(ctx).state == "finished"
    lines = ctx.container_lines()
    assert all(isinstance(ln["cts"], int) and ln["ts"] > 1e9 for ln in lines)
    for stream in ("stdout", "stderr"):  # stamped per stream by the engine: ordered within each
        cts = [ln["cts"] for ln in lines if ln["stream"] == stream]
        assert cts == sorted(cts)
    long = [ln for ln in lines if ln["message"].startswith("aaa")]
    assert long[0]["split"] is True and long[0]["message"] == "a" * MAX_LINE + SPLIT_MARKER
    assert "".join(ln["message"].replace(SPLIT_MARKER, "") for ln in long) == "a" * 100000
    assert "bad \ufffd\ufffd bytes" in ctx.messages("stdout")
    assert "to stderr" in ctx.messages("stderr")
    structured = next(ln for ln in lines if ln["message"] == "structured")
    assert structured["level"] == "error" and structured["k"] == [1] and structured["data_ts"] == 5
    assert "{not json" in ctx.messages("stdout")
    assert ctx.messages("stdout")[-1] == "no newline at the end"


def test_failing_task_reports_code_and_tail(node, task_image):
    ctx = node.ctx(type="custom", image=task_image, command="fail.sh")
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and outcome.exit_code == 3
    assert "exit code 3" in outcome.error and "something broke" in outcome.error


def test_out_of_memory(node, task_image):
    ctx = node.ctx(type="custom", image=task_image, command="eat.sh", resources={"memory": "32m"})
    outcome = custom.run(ctx)
    assert outcome.state == "failed", outcome
    assert outcome.error == "out of memory (OOMKilled)" and outcome.exit_code == 137


def test_stop_reaches_container_and_resources_applied(node, task_image, docker_client):
    ctx = node.ctx(
        type="custom",
        image=task_image,
        command="forever.sh",
        resources={"cpus": 0.5, "memory": "64m", "shm_size": "16m"},
    )
    result = {}
    t = threading.Thread(target=lambda: result.update(o=custom.run(ctx)))
    t.start()
    poll_for(lambda: "running forever" in ctx.messages("stdout"), timeout=30, what="the container's first line")
    # by label: other agents on this engine may have a task with the same id
    c = find_container(docker_client, ctx.task_id, node.config().identity)
    assert c.labels == {LABEL_AGENT: node.config().identity, LABEL_TASK: str(ctx.task_id)}
    hc = c.attrs["HostConfig"]
    assert hc["NanoCpus"] == 500_000_000 and hc["Memory"] == 64 * 2**20 and hc["ShmSize"] == 16 * 2**20
    assert hc["SecurityOpt"] == ["no-new-privileges"] and not hc["Privileged"]
    mounts = {m["Target"]: (m["Source"], m.get("ReadOnly", False)) for m in hc["Mounts"]}
    assert mounts == {
        f"/sly_task_data/{name}": (str(ctx.task_dir / name), ro)
        for name, ro in [
            ("task_config.json", True),
            ("task_settings.json", True),
            ("data", True),
            ("model", True),
            ("results", False),
            ("tmp", False),
        ]
    }
    assert not hc.get("Binds"), "the task dir itself (its log) is never mounted"
    ctx.stop_event.set()
    poll_for(lambda: "got SIGTERM" in ctx.messages("stdout"), timeout=2, what="SIGTERM in the container")
    t.join(20)
    assert result["o"].state == "stopped"
    assert find_container(docker_client, ctx.task_id, ctx.config.identity) is None


def test_deadline_exceeded(node, task_image):
    ctx = node.ctx(type="custom", image=task_image, command="forever.sh", timeout_s=1)
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and outcome.error.startswith("deadline exceeded")


def test_gpus_become_device_requests(node, task_image):
    ctx = node.ctx(type="custom", image=task_image, command="env.sh")
    kw = create_kwargs(ctx)
    assert "CUDA_VISIBLE_DEVICES" not in kw["environment"] and "device_requests" not in kw
    ctx.gpus = [1, 3]
    kw = create_kwargs(ctx)
    assert kw["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # inside, the two GPUs are 0 and 1
    (req,) = kw["device_requests"]
    assert req["DeviceIDs"] == ["1", "3"] and req["Capabilities"] == [["gpu"]]


def test_missing_image_under_never_and_failed_pull(node):
    ctx = node.ctx(cfg=node.config(pull_policy="never"), type="custom", image="sly-test/absent:1")
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "PULL_POLICY=never" in outcome.error
    ctx = node.ctx(type="custom", image="127.0.0.1:9/absent:1")
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and outcome.error.startswith("cannot pull image 127.0.0.1:9/absent:1")
    assert any(m.startswith("pulling image") for m in ctx.messages("agent"))


def test_reap_orphan_containers(node, task_image, docker_client):
    cfg = node.config()
    made = [
        docker_client.containers.create(
            task_image,
            "true",
            name=f"sly_task_reap_{node.id}_{i}",
            labels={LABEL_AGENT: cfg.identity, LABEL_TASK: str(i)},
        )
        for i in (1, 2)
    ]
    other = docker_client.containers.create(task_image, "true", labels={LABEL_AGENT: "someone-else", LABEL_TASK: "2"})
    try:
        removed = docker_task.reap_orphan_containers(cfg, [1])
        assert removed == [made[1].name]
        names = {c.name for c in docker_client.containers.list(all=True)}
        assert made[0].name in names and made[1].name not in names and other.name in names
    finally:
        for c in (made[0], other):
            c.remove(force=True)


@pytest.mark.slow
def test_a_container_of_another_agent_with_our_name_is_left_alone(node, task_image, docker_client, busybox_image):
    """Two agents on one engine (say, of two servers) may both run a task 7: neither breaks the other."""
    ctx = node.ctx(type="custom", image=task_image, command=["sh", "-c", "echo mine"])
    theirs = docker_client.containers.run(
        busybox_image,
        ["sleep", "60"],
        detach=True,
        name=container_name(ctx.task_id),
        labels={LABEL_AGENT: "someone-else", LABEL_TASK: str(ctx.task_id)},
    )
    try:
        outcome = custom.run(ctx)
        assert outcome.state == "finished", outcome
        assert "mine" in ctx.messages("stdout")
        theirs.reload()
        assert theirs.status == "running", "the other agent's container was not touched"
        assert docker_task.reap_orphan_containers(node.config(), []) == []  # not ours to reap either
    finally:
        theirs.remove(force=True)
