"""`python -m agent doctor`: one line per check, what to do when one fails, exit 1 when any fails.

Run as users run it (a subprocess, the real fixture server, the real Docker engine) on a good node,
a wrong token, a stopped server, no Docker and a full disk; the rules with no outside part
(clock skew, a proxy, a token in the storage dir) in process. Never asserts that this machine has
no GPU: the GPU lines are `ok` or `skip` on a good node, whichever holds here.
"""

from __future__ import annotations

import http.client
import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from agent import doctor
from node.config import load_config
from tests.support.procs import poll_for
from tests.support.server import REPO

CHECKS = ("config", "docker", "gpu-nvml", "gpu-container", "disk", "cache", "storage", "server", "token", "clock")


def new_token(server) -> str:
    r = server.admin().post(server.url + "/api/v1/agents", json={"name": "doctor"})
    r.raise_for_status()
    return r.json()["token"]


def doctor_env(server_url: str, token: str, root: Path, **extra) -> dict:
    env = dict(
        os.environ, SERVER_ADDRESS=server_url, ACCESS_TOKEN=token, AGENT_HOST_DIR=str(root), MIN_FREE_DISK_MB="64"
    )
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "DOCKER_HOST"):
        env.pop(k, None)
    env["DOCTOR_IMAGE"] = "sly-test/busybox:latest"  # a GPU machine runs the container check with a local image
    env.update(extra)
    return env


def run_doctor(env: dict) -> tuple[int, dict[str, tuple[str, str]], str]:
    """(exit code, check name -> (status, detail), the whole output)."""
    p = subprocess.run(
        [sys.executable, "-m", "agent", "doctor", "--no-pull"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out
    lines = {}
    for ln in p.stdout.splitlines()[:-1]:  # the last line is the summary
        status, name, detail = ln.split(None, 2)
        lines[name] = (status, detail)
    return p.returncode, lines, out


@pytest.fixture
def image(busybox_image):
    """DOCTOR_IMAGE of these tests (a GPU machine runs the container check with it)."""
    return busybox_image


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


@pytest.mark.slow
@pytest.mark.docker
def test_a_good_node_passes_every_check(server, tmp_path, image):
    token = new_token(server)
    rc, lines, out = run_doctor(doctor_env(server.url, token, tmp_path / "agent"))
    assert rc == 0, out
    assert tuple(lines) == CHECKS, out
    assert all(status in ("ok", "skip") for status, _ in lines.values()), out
    for name in ("config", "docker", "disk", "cache", "storage", "server", "token", "clock"):
        assert lines[name][0] == "ok", out
    assert "Docker engine" in lines["docker"][1] and "accepts" in lines["token"][1]
    assert out.rstrip().endswith("every check passed")
    assert token not in out


@pytest.mark.slow
@pytest.mark.docker
def test_a_wrong_token_fails_and_is_not_printed(server, tmp_path, image):
    token = new_token(server)
    wrong = token[::-1] if token[::-1] != token else "B" * 32
    rc, lines, out = run_doctor(doctor_env(server.url, wrong, tmp_path / "agent"))
    assert rc == 1, out
    status, detail = lines["token"]
    assert status == "FAIL" and "refused ACCESS_TOKEN" in detail and "rotate" in detail
    assert lines["server"][0] == "ok"
    assert wrong not in out and token not in out
    assert out.rstrip().endswith("1 check(s) failed")


@pytest.mark.docker
def test_a_stopped_server(tmp_path, image):
    url = f"http://127.0.0.1:{closed_port()}"
    rc, lines, out = run_doctor(doctor_env(url, "A" * 32, tmp_path / "agent"))
    assert rc == 1, out
    status, detail = lines["server"]
    assert status == "FAIL" and url in detail and "SERVER_ADDRESS" in detail
    assert lines["token"][0] == "skip" and lines["clock"][0] == "skip"


def test_no_docker(server, tmp_path):
    env = doctor_env(server.url, new_token(server), tmp_path / "agent", DOCKER_HOST="unix:///nonexistent/docker.sock")
    rc, lines, out = run_doctor(env)
    assert rc == 1, out
    status, detail = lines["docker"]
    assert status == "FAIL" and "/nonexistent/docker.sock" in detail and "systemctl start docker" in detail
    assert lines["gpu-container"][0] == "skip"
    assert lines["token"][0] == "ok"


@pytest.mark.docker
def test_a_full_disk(server, tmp_path, image):
    env = doctor_env(server.url, new_token(server), tmp_path / "agent", MIN_FREE_DISK_MB=str(10**12))
    rc, lines, out = run_doctor(env)
    assert rc == 1, out
    status, detail = lines["disk"]
    assert status == "FAIL" and "MIN_FREE_DISK_MB" in detail and "not enough disk" in detail


def test_unusable_settings_exit_2(tmp_path):
    env = doctor_env("not-a-url", "A" * 32, tmp_path / "agent")
    p = subprocess.run(
        [sys.executable, "-m", "agent", "doctor"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and p.stdout.startswith("FAIL  config") and "http://" in p.stdout


# --- in process: the rules with no outside part ---


def config_of(tmp_path, url: str = "http://127.0.0.1:9", token: str = "T" * 32, **env):
    return load_config({"SERVER_ADDRESS": url, "ACCESS_TOKEN": token, "AGENT_HOST_DIR": str(tmp_path / "agent"), **env})


def test_a_token_in_plain_sight_fails_storage(tmp_path):
    config = config_of(tmp_path)
    assert doctor.check_storage(config).status == "ok"
    (config.root / "state").mkdir(parents=True)
    (config.root / "state" / "notes.txt").write_text(f"ACCESS_TOKEN={config.access_token}\n")
    c = doctor.check_storage(config)
    assert c.status == "FAIL" and "state/notes.txt" in c.detail and config.access_token not in c.detail


def test_an_unwritable_storage_dir_fails(tmp_path):
    (tmp_path / "a-file").write_text("")  # a storage root under a file: not even root can make it
    c = doctor.check_storage(config_of(tmp_path, AGENT_HOST_DIR=str(tmp_path / "a-file" / "agent")))
    assert c.status == "FAIL" and "cannot write" in c.detail and "AGENT_HOST_DIR" in c.detail


@pytest.mark.parametrize(
    ("offset", "status", "words"), [(0, "ok", "within"), (120, "FAIL", "behind"), (-90, "FAIL", "ahead of")]
)
def test_clock_skew(offset, status, words):
    now = time.time()
    c = doctor._check_clock(formatdate(now + offset, usegmt=True), now, now)
    assert c.status == status and words in c.detail
    assert doctor._check_clock(None, now, now).status == "skip"


def test_gpu_lines_follow_what_nvml_and_the_driver_say(tmp_path):
    config = config_of(tmp_path)
    assert doctor.check_nvml(config, [{"index": 0, "name": "H100"}], driver=True).status == "ok"
    c = doctor.check_nvml(config, [], driver=True)  # the agent's container was started without --gpus
    assert c.status == "FAIL" and "--gpus all" in c.detail
    assert doctor.check_nvml(config, [], driver=False).status == "skip"
    assert doctor.check_nvml(config_of(tmp_path, AGENT_GPUS="none"), [], driver=True).status == "skip"


class _Proxy(http.server.BaseHTTPRequestHandler):
    """A forward HTTP proxy: absolute-URI GET/HEAD passed on; every URL it carried is recorded."""

    carried: list[str] = []

    def _forward(self):
        self.carried.append(self.path)
        u = urlsplit(self.path)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "proxy-authorization")
        }
        conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), headers=headers)
        r = conn.getresponse()
        body = r.read()
        self.send_response_only(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("connection", "transfer-encoding"):
                self.send_header(k, v)
        self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        conn.close()

    do_GET = do_HEAD = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    _Proxy.carried = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://user:secret@127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_the_server_is_reached_through_the_proxy(server, tmp_path, proxy, monkeypatch):
    config = config_of(tmp_path, url=server.url, token=new_token(server))
    for k in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    checks = {c.name: c for c in doctor.check_server(config)}
    assert checks["server"].status == "ok" and "through the proxy http://127.0.0.1:" in checks["server"].detail
    assert "secret" not in checks["server"].detail  # the proxy's credentials are not shown
    assert checks["token"].status == "ok" and checks["clock"].status == "ok"
    assert any(u.endswith("/healthz") for u in _Proxy.carried) and any("/agent/v1/blobs/" in u for u in _Proxy.carried)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    _Proxy.carried = []
    checks = {c.name: c for c in doctor.check_server(config)}
    assert "directly (NO_PROXY)" in checks["server"].detail and _Proxy.carried == []


def test_log_checks_one_line_each(server, tmp_path, caplog):
    config = config_of(tmp_path, url=server.url, token=new_token(server), MIN_FREE_DISK_MB=str(10**12))
    log = logging.getLogger("agent.test-doctor")
    with caplog.at_level(logging.INFO, logger=log.name):
        checks = doctor.log_checks(config, log)
    lines = [r for r in caplog.records if r.name == log.name]
    assert len(lines) == len(checks) == len(CHECKS) - 1  # no config line: the agent has loaded it
    disk = next(r for r in lines if " disk " in r.getMessage())
    assert disk.levelno == logging.WARNING and disk.getMessage().startswith("doctor: FAIL")


@pytest.mark.slow
@pytest.mark.docker
def test_the_agent_logs_the_checks_at_start(server, make_agent, image):
    agent = make_agent(server, "doctor-at-start").start(handler=None)

    def doctor_lines():
        logs = list((agent.root / "logs").glob("log_*.txt"))
        text = "".join(p.read_text(errors="replace") for p in logs)
        return [ln for ln in text.splitlines() if "doctor: " in ln]

    lines = poll_for(lambda: len(doctor_lines()) >= len(CHECKS) - 1 and doctor_lines(), timeout=30, what="doctor lines")
    assert any("doctor: ok    token" in ln for ln in lines)
    assert all(agent.token not in ln for ln in lines)
