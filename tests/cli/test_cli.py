"""The CLI (`python -m client`) against the real server subprocess (the
fake agent plays the node), and the upload path it shares with the Python client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import requests

from client import UserClient
from client.transfer import Counts
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import REPO


def cli_env(server, **extra) -> dict:
    env = dict(os.environ, SLY_SERVER=server.url, SLY_ADMIN_TOKEN=server.admin_token)
    env.update(extra)
    return env


def cli(server, *args: str, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "client", *args],
        cwd=REPO,
        env=env or cli_env(server),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if ok:
        assert p.returncode == 0, f"rc={p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def cli_json(server, *args: str):
    return json.loads(cli(server, "--json", *args).stdout)


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_nodes_add_list_edit_rotate(server):
    p = cli(server, "nodes", "add", "cli-node", "--types", "train,custom")
    token = next(ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("token:"))
    assert len(token) == 32
    assert "docker run" in p.stdout and f"ACCESS_TOKEN={token} ./run.sh" in p.stdout
    agent = FakeAgent(server.url, token)
    node_id = agent.connect()["agent"]["id"]

    listing = cli(server, "nodes", "list").stdout
    row = next(ln for ln in listing.splitlines() if "cli-node" in ln)
    assert row.split()[0] == str(node_id) and "online" in row and "train,custom" in row

    edited = cli_json(server, "nodes", "edit", str(node_id), "--name", "cli-renamed", "--types", "train")
    assert edited["name"] == "cli-renamed" and edited["allowed_task_types"] == ["train"]
    refused = cli(server, "tasks", "submit", "--node", str(node_id), "--type", "custom", "--image", "x", ok=False)
    assert refused.returncode == 1 and "409" in refused.stderr

    new = cli_json(server, "nodes", "rotate", str(node_id))
    assert new["token"] != token
    with pytest.raises(requests.HTTPError):
        agent.connect()  # the old token is refused at once
    FakeAgent(server.url, new["token"]).connect()
    cli(server, "nodes", "delete", str(node_id))
    assert all(a["id"] != node_id for a in cli_json(server, "nodes", "list"))


def test_upload_project_and_model_with_progress(server, tmp_path):
    root = tmp_path / "dogs"
    (root / "train" / "sub").mkdir(parents=True)
    (root / "val").mkdir()
    files = {"train/a.bin": os.urandom(3 << 20), "train/sub/b.txt": b"b" * 10, "val/c.txt": b"c", "top.json": b"{}"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)

    p = cli(server, "--json", "--progress", "projects", "upload", str(root), "--name", "dogs-cli")
    assert "100%" in p.stderr and "[" + "#" * 30 + "]" in p.stderr  # the bar reached its end
    # in files and bytes, through each stage
    for stage in ("hashing", "sending", "items"):
        assert f" {stage} [" + "#" * 30 + "] 100% 4/4 files" in p.stderr, p.stderr
    assert "4/4 files, 3.0 MiB/3.0 MiB" in p.stderr
    proj = json.loads(p.stdout)
    assert [d["items_count"] for d in proj["datasets"]] == [1, 2, 1]
    got = {f"{d['name']}/{i['name']}": (i["sha256"], i["size"]) for d, i in _project_items(server, proj)}
    assert got == {
        ("ds0/" + k if "/" not in k else k): (hashlib.sha256(v).hexdigest(), len(v)) for k, v in files.items()
    }
    assert (
        server.admin()
        .get(f"{server.url}/api/v1/blobs/{hashlib.sha256(files['train/a.bin']).hexdigest()}", timeout=10)
        .content
        == files["train/a.bin"]
    )
    assert "dogs-cli" in cli(server, "projects", "list").stdout

    # The same files again as a model: blobs the server has are not sent twice.
    p = cli(server, "--json", "--progress", "models", "upload", str(root / "train"))
    model = json.loads(p.stdout)
    assert model["name"] == "train"
    assert sorted((f["path"], f["size"]) for f in model["files"]) == [("a.bin", 3 << 20), ("sub/b.txt", 10)]
    assert "the server has 2 of 2 files" in p.stderr
    assert "train" in cli(server, "models", "list").stdout


def _project_items(server, project: dict) -> list[tuple[dict, dict]]:
    """(dataset, item) of every item of a stored project, paged from the server."""
    c = UserClient(server.url, server.admin_token)
    return [
        (d, i)
        for d in project["datasets"]
        for i in c._list(f"/api/v1/projects/{project['id']}/items", {"dataset": d["name"]})
    ]


def _project_shape(server, project: dict) -> dict:
    shape: dict = {d["name"]: [] for d in project["datasets"]}
    for d, i in _project_items(server, project):
        shape[d["name"]].append((i["name"], i["sha256"], i["size"]))
    return {k: sorted(v) for k, v in shape.items()}


def test_cli_and_client_upload_the_same_project(server, tmp_path):
    root = tmp_path / "cats"
    (root / "train" / "deep").mkdir(parents=True)
    (root / "val").mkdir()
    files = {"top.txt": b"top", "train/a.bin": os.urandom(1 << 20), "train/deep/b.txt": b"b", "val/c.txt": b"c"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)

    via_cli = json.loads(cli(server, "--json", "projects", "upload", str(root), "--name", "cats-cli").stdout)
    seen: list[Counts] = []
    via_client = UserClient(server.url, server.admin_token).upload_project_dir(
        root, "cats-client", progress=seen.append
    )

    assert _project_shape(server, via_cli) == _project_shape(server, via_client)
    assert sorted(_project_shape(server, via_client)) == ["ds0", "train", "val"]
    assert [i[0] for i in _project_shape(server, via_client)["ds0"]] == ["top.txt"]
    assert ("deep/b.txt", hashlib.sha256(b"b").hexdigest(), 1) in _project_shape(server, via_client)["train"]
    # The client's upload came second: every blob was there, so nothing was sent, and each stage's
    # counts went up to their totals.
    size = sum(map(len, files.values()))
    final = {c.stage: c for c in seen}
    assert [c.stage for c in final.values()] == ["hashing", "sending", "items"]
    assert final["hashing"][1:5] == (4, 4, size, None) and final["sending"][1:5] == (4, 4, size, size)
    assert final["items"][1:3] == (4, 4)
    sending = [c for c in seen if c.stage == "sending"]
    assert [c[1:3] for c in sending] == [(0, 4), (4, 4)] and sending[-1].note == "the server has 4 of 4 files"


def test_progress_bar_only_on_a_terminal(server, tmp_path):
    root = tmp_path / "tiny"
    root.mkdir()
    (root / "x.bin").write_bytes(os.urandom(4096))
    # stderr a pipe: no bar, the answer alone.
    p = cli(server, "projects", "upload", str(root))
    assert p.stderr == "" and p.stdout.startswith("project ")
    # stderr a terminal: the bar is drawn and ends at 100%.
    master, slave = os.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                b = os.read(master, 4096)
            except OSError:  # EIO once the child closed the terminal
                return
            if not b:
                return
            chunks.append(b)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "client", "models", "upload", str(root)],
            cwd=REPO,
            env=cli_env(server),
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=60,
        )
    finally:
        os.close(slave)
    reader.join(10)
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert p.returncode == 0 and p.stdout.startswith("model ")
    assert "100%" in tty and "[" + "#" * 30 + "]" in tty


def test_entry_points_run_the_same_cli(server):
    for module in ("client",):
        p = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert p.returncode == 0 and "projects" in p.stdout and "usage: sly" in p.stdout, (module, p.stderr)


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_submit_follow_logs_and_stop(server):
    created = cli_json(server, "nodes", "add", "cli-runner")
    agent = FakeAgent(server.url, created["token"])
    agent.connect()
    node = str(created["id"])

    t1 = cli_json(
        server,
        "tasks",
        "submit",
        "--node",
        node,
        "--type",
        "custom",
        "--image",
        "sly-test/busybox:latest",
        "--config",
        '{"epochs": 2}',
        "--gpus",
        "0",
        "--timeout",
        "60",
    )
    assert t1["state"] == "queued"
    task = server.admin().get(f"{server.url}/api/v1/tasks/{t1['id']}", timeout=10).json()
    assert task["config"] == {"epochs": 2} and task["timeout_s"] == 60

    follower = subprocess.Popen(
        [sys.executable, "-m", "client", "tasks", "logs", str(t1["id"]), "--follow"],
        cwd=REPO,
        env=cli_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert [t["id"] for t in agent.poll_until("tasks")] == [t1["id"]]
        agent.state(t1["id"], "preparing")
        agent.state(t1["id"], "running")
        agent.log(t1["id"], "epoch 1", {"message": "disk almost full", "stream": "stderr", "level": "warning"})
        agent.log(t1["id"], "epoch 2")
        agent.state(t1["id"], "uploading")
        agent.state(t1["id"], "finished", exit_code=0)
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    lines = out.splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == ["epoch 1", "[stderr] WARNING: disk almost full", "epoch 2"]
    assert f"task {t1['id']} finished" in err

    listing = cli(server, "tasks", "list", "--node", node).stdout
    assert any(ln.split()[:2] == [str(t1["id"]), "finished"] for ln in listing.splitlines())

    t2 = cli_json(server, "tasks", "submit", "--node", node, "--type", "custom", "--image", "sly-test/busybox:latest")
    agent.poll_until("tasks", running=[])
    agent.state(t2["id"], "running")
    cli(server, "tasks", "stop", str(t2["id"]))
    assert agent.poll_until("stop", running=[t2["id"]]) == [t2["id"]]
    agent.state(t2["id"], "stopped")
    poll_for(
        lambda: server.admin().get(f"{server.url}/api/v1/tasks/{t2['id']}", timeout=5).json()["state"] == "stopped",
        what="task stopped",
    )
    p = cli(server, "tasks", "logs", str(t2["id"]), "--follow", ok=False)
    assert p.returncode == 1 and "stopped" in p.stderr  # a task that did not finish: non-zero


def test_no_token_and_no_server_are_clear_errors(server, tmp_path):
    env = cli_env(server)
    env.pop("SLY_ADMIN_TOKEN")
    p = cli(server, "nodes", "list", ok=False, env=env)
    assert p.returncode == 2 and "no admin token" in p.stderr
    p = cli(server, "--token", "Zq9NotTheAdminToken", "nodes", "list", ok=False)
    assert p.returncode == 1 and "401" in p.stderr and "Zq9NotTheAdminToken" not in p.stderr
    p = cli(server, "--server", "http://127.0.0.1:9", "nodes", "list", ok=False)
    assert p.returncode == 1 and "no answer" in p.stderr


def test_submit_an_app_with_a_dataset_and_its_modal_state(server):
    from client import UserClient

    user = UserClient(server.url, server.admin_token)
    node = cli_json(server, "nodes", "add", "cli-apps", "--types", "app")
    p = user.create_project("cli-app-input", [{"name": "train", "items": []}, {"name": "val", "items": []}])
    ds = next(d for d in p["datasets"] if d["name"] == "val")
    t = cli_json(
        server,
        *("tasks", "submit", "--node", str(node["id"]), "--type", "app", "--image", "my/app:1"),
        *("--dataset", str(ds["id"]), "--config", '{"format": "yolo"}'),
    )
    assert (t["type"], t["dataset_id"], t["project_id"], t["config"]) == ("app", ds["id"], p["id"], {"format": "yolo"})
