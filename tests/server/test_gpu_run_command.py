"""The run commands the server prints have a GPU form (`--gpus all`): chosen when the user says the
node has GPUs while adding it, or, for a token rotation, when the node has reported GPUs."""

from __future__ import annotations

from client import cli
from tests.support.fake_agent import FakeAgent

GPU_FLAG = "--gpus all"


def test_adding_a_gpu_node_gives_the_gpu_form(client):
    plain = client.create_agent("cpu-node")["run_command"]
    gpu = client.create_agent("gpu-node", gpus=True)["run_command"]
    assert GPU_FLAG not in plain["docker"]
    assert gpu["docker"].startswith(
        "docker run -d --name sly-agent --restart unless-stopped --network host --gpus all "
    )
    assert gpu["docker"].count(GPU_FLAG) == 1
    assert GPU_FLAG not in gpu["run_sh"]  # bare metal sees the GPUs as it is


def test_gpus_must_be_a_bool(server, client):
    r = client.session.post(f"{server.url}/api/v1/agents", json={"name": "n", "gpus": "lots"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_rotation_follows_what_the_node_reported(server, client):
    a = client.create_agent("reporting")
    assert GPU_FLAG not in client.rotate_token(a["id"])["run_command"]["docker"]  # nothing reported yet
    token = client.rotate_token(a["id"])["token"]
    agent = FakeAgent(server.url, token, a["id"])
    agent.connect(gpus=[{"index": 0, "name": "Fake A100"}])  # system info at connect
    rotated = client.rotate_token(a["id"])
    assert GPU_FLAG in rotated["run_command"]["docker"]
    agent = FakeAgent(server.url, rotated["token"], a["id"])
    agent.telemetry(cpu=1, mem=1, gpus=[{"index": 0, "name": "Fake A100"}, {"index": 1, "name": "Fake A100"}])
    assert GPU_FLAG in client.rotate_token(a["id"])["run_command"]["docker"]
    assert GPU_FLAG not in client.rotate_token(a["id"], gpus=False)["run_command"]["docker"]  # the user decides


def test_rotation_of_a_cpu_node_on_request(client):
    a = client.create_agent("cpu-then-gpu")
    assert GPU_FLAG in client.rotate_token(a["id"], gpus=True)["run_command"]["docker"]


def test_cli_nodes_add_gpus(server, capsys):
    base = ["--server", server.url, "--token", server.admin_token]
    assert cli.main([*base, "nodes", "add", "cli-gpu", "--gpus"]) == 0
    out = capsys.readouterr().out
    assert GPU_FLAG in out and "ACCESS_TOKEN=" in out
    node_id = int(out.split()[1])
    assert cli.main([*base, "nodes", "rotate", str(node_id), "--no-gpus"]) == 0
    assert GPU_FLAG not in capsys.readouterr().out
    assert cli.main([*base, "nodes", "rotate", str(node_id), "--gpus"]) == 0
    assert GPU_FLAG in capsys.readouterr().out
