"""The agent image as users run it: host docker socket, host dir mounted at another path inside."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tools.demo.__main__ import make_sample_data
from tools.images import build_python_base, ensure_demo_train_image

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def agent_image(docker_client):
    """Built FROM a base made of this machine's Python: no registry is needed."""
    base = build_python_base(docker_client, requirements=str(REPO / "requirements-agent.txt"))
    image, _ = docker_client.images.build(path=str(REPO), buildargs={"BASE": base}, tag="sly-agent:test", rm=True)
    return image.tags[0]


@pytest.mark.slow
def test_agent_container_runs_a_task_with_host_paths(agent_image, server, docker_client, tmp_path):
    from client import UserClient

    client = UserClient(server.url, server.admin_token)
    agent = client.create_agent("image-node")
    assert agent["run_command"], "the server prints a ready run command"
    host_dir = tmp_path / "host-agent-dir"  # the path on the host...
    inside = "/var/lib/sly-agent-inside"  # ...and a different one inside the agent container
    host_dir.mkdir()
    name = f"sly-agent-test-{agent['id']}"
    for stale in docker_client.containers.list(all=True, filters={"name": name}):  # an interrupted earlier run
        stale.remove(force=True)
    container = docker_client.containers.run(
        agent_image,
        detach=True,
        name=name,
        network_mode="host",
        volumes={
            "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(host_dir): {"bind": inside, "mode": "rw"},
        },
        environment={
            "SERVER_ADDRESS": server.url,
            "ACCESS_TOKEN": agent["token"],
            "AGENT_HOST_DIR": str(host_dir),
            "AGENT_DIR": inside,
            "TASK_DIR_CLEANUP": "never",
            "MIN_FREE_DISK_MB": "64",
            "TELEMETRY_INTERVAL": "1",
        },
    )
    try:
        image = ensure_demo_train_image(docker_client)
        project_dir, model_dir = make_sample_data(tmp_path / "samples", images=6)
        project = client.upload_project_dir(project_dir, name="image-project")
        model = client.upload_model_dir(model_dir, name="image-model")
        # The image's own command: a train task without one would run the Supervisely entry point.
        task = client.create_task(
            agent_id=agent["id"],
            type="train",
            image=image,
            command=["/bin/sly-train"],
            config={"epochs": 2, "epoch_seconds": 0.1},
            project_id=project["id"],
            model_id=model["id"],
            timeout_s=120,
        )
        final = client.wait_task(task["id"], states=("finished", "failed", "stopped", "lost"), timeout=180)
        logs = container.logs(tail=50).decode(errors="replace")
        assert final["state"] == "finished", (final.get("error"), final.get("timeline"), logs)
        assert final["results"]["model_id"]
        # The task's files are on the HOST, under the host dir (the bind source was translated).
        tdir = host_dir / "tasks" / str(task["id"])
        cfg = json.loads((tdir / "task_config.json").read_text())
        assert cfg == {"epochs": 2, "epoch_seconds": 0.1}
        items = sorted(p.name for p in (tdir / "data" / "image-project").rglob("*.ppm"))
        assert len(items) == 6
        assert (tdir / "results" / "model" / "weights.bin").stat().st_size == 4096
        assert list((host_dir / "storage" / "images").rglob("*.ppm")), "downloads went to the host cache"
        assert not (host_dir / "var").exists(), "no path of the container leaked onto the host"
        assert agent["token"] not in logs
        container.stop(timeout=30)
        assert container.wait(timeout=60)["StatusCode"] == 0
        # this agent's task containers (other tests' agents, at the same time, number their tasks from 1 too)
        identity = hashlib.sha256(agent["token"].encode()).hexdigest()[:16]
        labels = [f"sly-agent.task={task['id']}", f"sly-agent.agent={identity}"]
        leftovers = docker_client.containers.list(all=True, filters={"label": labels})
        assert leftovers == []
    finally:
        container.remove(force=True)
