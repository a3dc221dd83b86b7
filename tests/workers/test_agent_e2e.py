"""End to end through the real `python -m agent`: the real handlers, the real engine, the real server."""

from __future__ import annotations

import secrets

import pytest

from tests.agent.conftest import AgentProcess
from tests.support.procs import poll_for
from tests.workers.test_data import make_project
from workers.container_spec import LABEL_AGENT, LABEL_TASK, container_name

pytestmark = pytest.mark.docker

AGENT_ENV = {"MIN_FREE_DISK_MB": 1, "STOP_GRACE": 1, "TASK_DIR_CLEANUP": "on-success"}


@pytest.fixture
def agent(server, tmp_path, request):
    a = AgentProcess(server, tmp_path / "agent", f"e2e-{request.node.name[:30]}")
    yield a
    a.kill_tree()


def task_containers(docker_client, agent, task_id: int) -> list:
    """This agent's containers of task `task_id` (other tests' agents number their tasks from 1
    too, and an agent killed by a test may leave its container behind)."""
    labels = [f"{LABEL_TASK}={task_id}", f"{LABEL_AGENT}={agent.identity}"]
    return docker_client.containers.list(all=True, filters={"label": labels})


def stdout(agent, task_id):
    lines = agent.logs(task_id)
    assert [ln["seq"] for ln in lines] == list(range(len(lines)))
    return [ln["message"] for ln in lines if ln["stream"] == "stdout"]


@pytest.mark.slow
def test_train_task_full_life(agent, user, task_image, docker_client):
    agent.start(handler=None, **AGENT_ENV)
    tag = secrets.token_hex(4)
    project = make_project(user, f"e2e-{tag}", {"ds": {f"{i}.png": f"{tag}-{i}".encode() for i in range(4)}})
    task = user.create_task(agent.id, "train", image=task_image, command="train.sh", project_id=project["id"])
    done = agent.wait_state(task["id"], timeout=60)
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    assert done["progress"] == {"current": 3, "total": 3}
    out = stdout(agent, task["id"])
    assert out[0] == "found 4 input files" and out[-1] == "training done"
    metrics = user.task_metrics(task["id"])
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[0]["metrics"] == {"loss": 0.1}
    model = user.get_model(done["results"]["model_id"])
    assert {f["path"] for f in model["files"]} == {"weights.bin"}
    assert not task_containers(docker_client, agent, task["id"])
    assert sorted(p.name for p in (agent.root / "tasks" / str(task["id"])).iterdir()) == ["logs"]


@pytest.mark.slow
def test_stop_from_the_server(agent, user, task_image):
    agent.start(handler=None, **AGENT_ENV)
    task = user.create_task(agent.id, "custom", image=task_image, command="forever.sh")
    poll_for(
        lambda: "running forever" in stdout(agent, task["id"]),
        timeout=30,
        what=f"the task running; agent said: {agent.stderr()[-1500:]}",
    )
    user.stop_task(task["id"])
    done = agent.wait_state(task["id"], timeout=20)
    assert done["state"] == "stopped"
    assert "got SIGTERM" in stdout(agent, task["id"])


@pytest.mark.slow
def test_agent_restart_readopts_running_container(agent, user, task_image, docker_client):
    agent.start(handler=None, **AGENT_ENV)
    task = user.create_task(agent.id, "custom", image=task_image, command=["count.sh", "150", "0.02"])
    poll_for(lambda: len(stdout(agent, task["id"])) >= 20, timeout=30, what="20 lines on the server")
    agent.kill_tree()  # the agent dies hard; the container keeps running
    assert docker_client.containers.get(container_name(task["id"])).status == "running"
    agent.start(handler=None, **AGENT_ENV)
    done = agent.wait_state(task["id"], timeout=60)
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    assert stdout(agent, task["id"]) == [f"line {i}" for i in range(1, 151)]
    assert {a["path"] for a in user.task_artifacts(task["id"])} == {"out.txt"}
    assert not task_containers(docker_client, agent, task["id"])
