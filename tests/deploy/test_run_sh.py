"""run.sh as users run it: from a fresh clone, its errors, and the agent in the foreground."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import poll_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone of the working tree (committed state plus the current files on top)."""
    dest = tmp_path_factory.mktemp("clone") / "sly-agent"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    # Bring uncommitted work along so a developer's run tests what they see.
    for rel in subprocess.run(
        ["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _run(clone: Path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(clone / "run.sh"), *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_says_what_it_takes(clone):
    r = _run(clone, "--help")
    assert r.returncode == 0
    for word in ("SERVER_ADDRESS", "ACCESS_TOKEN", "demo", "test"):
        assert word in r.stdout


def test_unknown_command_fails(clone):
    r = _run(clone, "frobnicate")
    assert r.returncode != 0 and "unknown command: frobnicate" in r.stderr


def test_missing_python_is_one_clear_sentence(clone, tmp_path):
    # A PATH with bash and coreutils but no python at all.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "cat", "sha256sum", "cut", "basename", "id"):
        os.symlink(shutil.which(tool), bindir / tool)
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "SLY_VENV": str(tmp_path / "venv")}
    r = subprocess.run(
        [shutil.which("bash"), str(clone / "run.sh")], cwd=clone, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "Python 3.11 or newer is needed" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory, clone) -> Path:
    """run.sh creates the virtualenv and installs requirements.txt into it (once per module)."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    env = dict(os.environ, SLY_VENV=str(path), DOCKER_HOST="unix:///nonexistent/docker.sock")
    r = _run(clone, "agent", env=env, timeout=600)
    # With a dead daemon it must stop after installing, with one clear sentence.
    assert r.returncode != 0, r.stdout + r.stderr
    assert "the Docker daemon does not answer" in r.stderr, r.stderr[-2000:]
    assert (path / "bin" / "python").exists()
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dead_docker_daemon_is_one_clear_sentence(venv):
    assert any(p.name.startswith(".installed-requirements.txt") for p in venv.iterdir())


@pytest.mark.slow  # over 2 s: outside the fast lane
@pytest.mark.docker
@pytest.mark.timeout(300)
def test_agent_runs_in_foreground_and_sigterm_exits_zero(clone, venv, server, tmp_path, docker_client):
    admin = server.admin()
    agent = admin.post(server.url + "/api/v1/agents", json={"name": "runsh-node"}).json()
    env = dict(
        os.environ,
        SLY_VENV=str(venv),
        SERVER_ADDRESS=server.url,
        ACCESS_TOKEN=agent["token"],
        AGENT_HOST_DIR=str(tmp_path / "agent"),
        TELEMETRY_INTERVAL="1",
        MIN_FREE_DISK_MB="64",
    )
    proc = subprocess.Popen(
        ["bash", str(clone / "run.sh")], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:

        def online():
            a = admin.get(f"{server.url}/api/v1/agents/{agent['id']}").json()
            return a.get("status") == "online"

        poll_for(online, timeout=60, what="the agent started by run.sh to come online")
        # run.sh execs the agent, so the signal reaches it directly: SIGTERM drains and exits 0.
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-3000:]
        assert agent["token"] not in out
        assert (tmp_path / "agent" / "logs").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(120)
def test_sigterm_during_startup_exits_zero_at_once(tmp_path):
    """`docker stop` while the agent still tries to reach its server: exit 0, no traceback."""
    import socket
    import time

    # A server that accepts the connection and never answers: connect() blocks.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    url = f"http://127.0.0.1:{lsock.getsockname()[1]}"
    env = dict(os.environ, SERVER_ADDRESS=url, ACCESS_TOKEN="A" * 32, AGENT_HOST_DIR=str(tmp_path / "a"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        poll_for(
            lambda: (tmp_path / "a" / "logs").is_dir() and any((tmp_path / "a" / "logs").iterdir()),
            timeout=30,
            what="the agent to start connecting",
        )
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert time.monotonic() - t0 < 10
        assert "Traceback" not in err and "stopped during start-up" in err
    finally:
        lsock.close()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_with_an_engine_named_elsewhere_says_so(clone, venv):
    """`./run.sh demo` installs and starts a local engine only when none is named: a DOCKER_HOST
    that does not answer is one clear sentence, not an apt-get run."""
    env = dict(os.environ, SLY_VENV=str(venv), DOCKER_HOST="unix:///nonexistent/docker.sock")
    r = _run(clone, "demo", "--exit-when-done", env=env, timeout=120)
    assert r.returncode != 0
    assert "DOCKER_HOST=unix:///nonexistent/docker.sock does not answer" in r.stderr, r.stderr[-2000:]
    assert "installing" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_doctor_through_run_sh(clone, venv, tmp_path):
    env = dict(os.environ, SLY_VENV=str(venv), SERVER_ADDRESS="not-a-url", ACCESS_TOKEN="A" * 32)
    r = _run(clone, "doctor", env=env, timeout=120)
    assert r.returncode == 2 and r.stdout.startswith("FAIL  config") and "SERVER_ADDRESS" in r.stdout
    env.update(
        SERVER_ADDRESS="http://127.0.0.1:9",
        AGENT_HOST_DIR=str(tmp_path / "agent"),
        DOCKER_HOST="unix:///nonexistent/d.sock",
    )
    r = _run(clone, "doctor", "--no-pull", env=env, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 1 and any(ln.startswith("FAIL  docker") for ln in lines)
    assert any(ln.startswith("FAIL  server") for ln in lines) and "A" * 32 not in r.stdout
