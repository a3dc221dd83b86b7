"""Run the real reference server as a subprocess on a free loopback port."""
from __future__ import annotations

import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.procs import free_port, poll_for

REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m server` on 127.0.0.1:<port> with its own data dir; stop()/start() keep both."""

    def __init__(self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None,
                 env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.admin_token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SERVER_ADMIN_TOKEN=self.admin_token, PYTHONUNBUFFERED="1", **self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--data", str(self.data_dir), *self.extra_args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        poll_for(up, timeout=timeout, what="server /healthz")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def admin(self) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {self.admin_token}"
        return s
