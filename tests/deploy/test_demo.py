"""The README's first command, as a new user meets it: `./run.sh demo`.

A first run with --exit-when-done (its one-time sign-in link is used while it runs), a second run
on the same data dir and port that stays up (reuse by name, the same port although the first
run's connections sit in TIME_WAIT, results checked through the API, then Ctrl-C), and a run
interrupted in the middle of training.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from client import UserClient
from tests.support.procs import free_port, poll_for

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
# The demo runs whole (a server, an agent, five tasks): every test here is outside the fast lane.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]
# What "looks like an error" in a log: a traceback, or a line at ERROR/CRITICAL level.
ERROR_LINE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Exception\b")


class DemoRun:
    """`./run.sh demo ARGS` in the background; its output is collected line by line."""

    def __init__(self, data: Path, port: int, *extra: str):
        args = ["demo", "--epochs", str(EPOCHS), "--data", str(data), "--port", str(port), *extra]
        if sys.prefix != sys.base_prefix:  # in a venv (as under ./run.sh test): go through run.sh itself
            cmd, env = ["bash", str(REPO / "run.sh"), *args], dict(os.environ, SLY_VENV=sys.prefix)
        else:
            cmd, env = [sys.executable, "-m", "tools.demo", *args[1:]], dict(os.environ)
        self.data = data
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def out(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 300) -> re.Match:
        """The first match of `pattern` in the output; fails at once if the demo exits without it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None and not self._reader.is_alive()
            m = next((m for m in map(rx.search, list(self.lines)) if m), None)
            if m is not None:
                return m
            if exited:
                raise AssertionError(
                    f"the demo exited ({self.proc.returncode}) without printing {pattern!r}:\n" + self.out[-4000:]
                )
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the demo's output after {timeout}s:\n" + self.out[-4000:])

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _logs(data: Path) -> dict[str, str]:
    return {name: (data / name).read_text() for name in ("server.log", "agent.log")}


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ERROR_LINE.search(ln)]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo") / "demo-data", free_port()


@pytest.fixture(scope="module")
def first_run(demo_dir, docker_client):
    """Run 1, --exit-when-done; its sign-in link is tried (twice) while the server is up."""
    data, port = demo_dir
    run = DemoRun(data, port, "--exit-when-done")
    try:
        link = run.wait_line(r"sign in once with this link.*: (http://\S+/signin/\S+)", timeout=120).group(1)
        browser = requests.Session()
        first = browser.get(link, timeout=30)
        nodes_api = browser.get(link.split("/signin/")[0] + "/api/v1/agents", timeout=30)
        stranger = requests.Session()
        second = stranger.get(link, timeout=30)
        code = run.finish()
    finally:
        run.stop()
    return {
        "run": run,
        "code": code,
        "link": link,
        "first": first,
        "cookies": browser.cookies,
        "nodes_api": nodes_api,
        "second": second,
        "stranger_cookies": stranger.cookies,
        "port": port,
        "data": data,
    }


@pytest.fixture(scope="module")
def second_run(first_run):
    """Run 2 on the same data dir and port, left running (no --exit-when-done) until a test stops it."""
    data, port = first_run["data"], first_run["port"]
    run = DemoRun(data, port)
    try:
        run.wait_line(r"keep running; Ctrl-C stops both", timeout=300)
        url = run.wait_line(r"server on (http://\S+)").group(1)
        yield {"run": run, "url": url, "client": UserClient(url, (data / "admin_token").read_text().strip())}
    finally:
        run.stop()


@pytest.mark.slow
def test_the_signin_link_signs_in_once(first_run):
    r = first_run["first"]
    assert r.status_code == 200 and r.url.endswith("/nodes"), (r.status_code, r.url)
    assert "sly_session" in first_run["cookies"]
    assert first_run["nodes_api"].status_code == 200, "the cookie is a session the API takes"
    again = first_run["second"]
    assert again.url.endswith("/signin?link=spent") and "Sign in" in again.text, "a spent link shows the sign-in page"
    assert "sly_session" not in first_run["stranger_cookies"]
    out = first_run["run"].out
    assert f"cat {first_run['data'] / 'admin_token'}" in out, "the admin token's place is printed as a fallback"


def test_no_token_is_printed_or_logged(first_run):
    data = first_run["data"]
    out = first_run["run"].out
    secrets = {"admin": (data / "admin_token").read_text().strip(), "node": (data / "node_token").read_text().strip()}
    assert (data / "node_token").stat().st_mode & 0o077 == 0
    for where, text in {"output": out, **_logs(data)}.items():
        for name, secret in secrets.items():
            assert secret not in text, f"the {name} token is in the {where}"


def test_the_first_run_trained_and_predicted(first_run):
    assert first_run["code"] == 0, first_run["run"].out[-4000:]
    out = first_run["run"].out
    assert "Epochs [" in out and "metrics train epoch 1" in out and "metrics val   epoch 1" in out
    assert re.search(
        r"predictions: project \d+ .*12 of 12 images with a 'prediction' label; see them at "
        r"http://\S+/projects/\d+",
        out,
    ), out[-3000:]
    assert re.search(r"app task \d+ ended finished", out), out[-3000:]
    assert re.search(r"export: /exports/\d+/demo-project\.tar in team files", out), out[-3000:]


@pytest.mark.slow
def test_a_rerun_reuses_node_project_model_and_port(first_run, second_run):
    out = second_run["run"].out
    assert f"server on http://127.0.0.1:{first_run['port']} " in out, "the same port, its TIME_WAIT notwithstanding"
    assert "port" not in out.split("server on")[0], "no 'port is taken' note"
    for what in ("node demo-node", "project demo-project", "model demo-base-model"):
        assert re.search(rf"{what} \(id \d+\) reused", out), what
    client = second_run["client"]
    assert [a["name"] for a in client.list_agents()].count("demo-node") == 1
    assert [p["name"] for p in client.list_projects() if p.get("task_id") is None].count("demo-project") == 1
    assert [m["name"] for m in client.list_models() if m.get("task_id") is None].count("demo-base-model") == 1
    node = next(a for a in client.list_agents() if a["name"] == "demo-node")
    poll_for(lambda: client.get_agent(node["id"])["status"] == "online", timeout=60, what="the reused node online")


def test_training_made_checkpoint_models_and_inference_a_result_project(second_run):
    from tools.demo.__main__ import project_items

    client = second_run["client"]
    tasks = sorted(client.list_tasks(), key=lambda t: t["id"])
    trains = [t for t in tasks if t["type"] == "train"]
    infers = [t for t in tasks if t["type"] == "inference"]
    apps = [t for t in tasks if t["type"] == "app"]
    assert len(trains) == 2 and len(infers) == 2 and len(apps) == 2, [(t["id"], t["type"], t["state"]) for t in tasks]
    for app in apps:
        path = f"/exports/{app['id']}/demo-project.tar"
        assert app["state"] == "finished" and app["output"]["path"] == path, (app.get("error"), app.get("output"))
        [entry] = client.list_files(path)
        assert entry["type"] == "file" and entry["task_id"] == app["id"] and entry["size"] > 0
    models = client.list_models()
    for train, infer in zip(trains, infers, strict=True):
        assert train["state"] == "finished", train.get("error")
        made = sorted(m["id"] for m in models if m.get("task_id") == train["id"])
        assert len(made) == EPOCHS, "one model per checkpoint"
        final = client.get_model(train["results"]["model_id"])
        assert final["id"] == made[-1] and final["config"]["epoch"] == EPOCHS, "the task's model is the last checkpoint"
        assert {f["path"] for f in final["files"]} == {"config.json", "weights.bin"}
        metrics = client.task_metrics(train["id"])
        assert {m["type"] for m in metrics} == {"train", "val"} and len(metrics) == 2 * EPOCHS
        assert infer["state"] == "finished", infer.get("error")
        result = client.get_project(infer["results"]["project_id"])
        assert "prediction" in [c["title"] for c in result["meta"]["classes"]]
        items = list(project_items(client, result["id"]))
        assert len(items) == 12
        for it in items:
            titles = [o["classTitle"] for o in it["ann"]["objects"]]
            assert titles.count("prediction") == 1 and {"square", "triangle", "blob"} <= set(titles), titles


def test_ctrl_c_stops_the_agent_then_the_server_quietly(second_run):
    run = second_run["run"]
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=120) == 0, run.out[-3000:]
    logs = _logs(run.data)
    for name, text in logs.items():
        assert not _error_lines(text), (name, _error_lines(text))
    assert "supervisor exits with code 0" in logs["agent.log"]
    assert "Finished server process" in logs["server.log"]
    assert not _error_lines(run.out), _error_lines(run.out)


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_training(tmp_path, docker_client):
    data = tmp_path / "demo-data"
    run = DemoRun(data, free_port())
    try:
        run.wait_line(r"\[stdout\] task \d+ \(train\)", timeout=300)
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(timeout=120) == 0, run.out[-3000:]
    finally:
        run.stop()
    assert "stopping: the agent (and its tasks), then the server" in run.out
    for name, text in _logs(data).items():
        assert not _error_lines(text), (name, _error_lines(text))
    agent_log = _logs(data)["agent.log"]
    assert re.search(r"task \d+: stopped", agent_log) or "reported stopped" in agent_log, agent_log[-2000:]
    left = [c.name for c in docker_client.containers.list(all=True) if str(data) in json.dumps(c.attrs)]
    assert left == [], "the task container was removed"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(data) not in ps, "nothing of the demo keeps running"
