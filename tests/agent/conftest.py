"""Fixtures for the agent tests: a real `python -m agent` subprocess against the real server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.procs import poll_for
from tests.support.server import REPO

HANDLERS = "tests.agent.handlers"


class AgentProcess:
    """One agent (server-side record + local storage) and its `python -m agent` process."""

    def __init__(self, server, root: Path, name: str):
        self.server = server
        self.admin = server.admin()
        r = self.admin.post(server.url + "/api/v1/agents", json={"name": name})
        r.raise_for_status()
        body = r.json()
        self.id, self.token = body["id"], body["token"]
        self.root = root
        self.proc: subprocess.Popen | None = None
        self.stderr_path = root.parent / f"{name}.stderr"

    @property
    def identity(self) -> str:
        """The agent's public identity, on its containers' labels (node.config.Config.identity)."""
        return hashlib.sha256(self.token.encode()).hexdigest()[:16]

    def env(self, handler: str | None = "counter", **extra) -> dict:
        env = dict(
            os.environ,
            SERVER_ADDRESS=self.server.url,
            ACCESS_TOKEN=self.token,
            AGENT_HOST_DIR=str(self.root),
            POLL_WAIT="5",
            TELEMETRY_INTERVAL="1",
            LOG_BATCH_INTERVAL="0.1",
            PYTHONUNBUFFERED="1",
        )
        env.pop("SLY_AGENT_HANDLER", None)
        if handler:
            env["SLY_AGENT_HANDLER"] = f"{HANDLERS}:{handler}"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def start(self, handler: str | None = "counter", **extra) -> AgentProcess:
        err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent"],
            cwd=REPO,
            env=self.env(handler, **extra),
            stdout=err,
            stderr=subprocess.STDOUT,
        )
        err.close()
        poll_for(
            lambda: self.child("log-shipper") and self.child("telemetry"),
            timeout=20,
            what="the agent's helper processes",
        )
        return self

    # --- the process tree ---
    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []

    def titles(self) -> dict[int, str]:
        out = {}
        for p in self.children():
            try:
                out[p.pid] = " ".join(p.cmdline())
            except psutil.NoSuchProcess:
                pass
        return out

    def child(self, role: str) -> int | None:
        """pid of the child titled `sly-agent: <role>...`."""
        for pid, title in self.titles().items():
            if title.startswith(f"sly-agent: {role}"):
                return pid
        return None

    def task_pid(self, task_id: int) -> int | None:
        return self.child(f"task {task_id} ")

    # --- tasks ---
    def create_task(self, type: str = "custom", config: dict | None = None) -> int:
        r = self.admin.post(
            self.server.url + "/api/v1/tasks",
            json={"agent_id": self.id, "type": type, "image": "none", "config": config or {}},
        )
        r.raise_for_status()
        return r.json()["id"]

    def task(self, task_id: int) -> dict:
        r = self.admin.get(f"{self.server.url}/api/v1/tasks/{task_id}")
        r.raise_for_status()
        return r.json()

    def wait_state(self, task_id: int, states=("finished", "failed", "stopped", "lost"), timeout: float = 60) -> dict:
        return poll_for(
            lambda: (t := self.task(task_id))["state"] in states and t,
            timeout=timeout,
            interval=0.2,
            what=f"task {task_id} in {states}",
        )

    def logs(self, task_id: int) -> list[dict]:
        lines, after = [], -1
        while True:
            r = self.admin.get(
                f"{self.server.url}/api/v1/tasks/{task_id}/logs", params={"after": after, "limit": 10000}
            )
            r.raise_for_status()
            page = r.json()["lines"]
            if not page:
                return lines
            lines += page
            after = page[-1]["seq"]

    # --- ending ---
    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill_tree(self) -> None:
        if self.proc is None:
            return
        procs = self.children()
        for p in procs:
            try:
                procs += p.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


def assert_counter_log(lines: list[dict], n: int) -> None:
    """The server's log of a `counter` task: seqs 0.. contiguous; stdout lines 'line 0'..'line n-1' once each,
    in order."""
    seqs = [line["seq"] for line in lines]
    assert seqs == list(range(len(lines))), "seqs not contiguous from 0"
    out = [line["message"] for line in lines if line["stream"] == "stdout"]
    assert out == [f"line {i}" for i in range(n)], (
        f"{len(out)} stdout lines; first wrong at {next((i for i, m in enumerate(out) if m != f'line {i}'), None)}"
    )


@pytest.fixture
def make_agent(tmp_path, request):
    """make_agent(server) -> AgentProcess (killed with its whole tree at the end)."""
    made: list[AgentProcess] = []

    def make(server, name: str | None = None) -> AgentProcess:
        a = AgentProcess(server, tmp_path / f"agent{len(made)}", name or f"{request.node.name[:40]}-{len(made)}")
        made.append(a)
        return a

    yield make
    for a in made:
        a.kill_tree()
