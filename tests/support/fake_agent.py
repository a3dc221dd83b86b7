"""A test double of the agent that speaks the real agent API (x-token) to the real server.

The console and CLI tests act as the agent with it: connect, poll for tasks and stops, report
states, ship log lines with sequence numbers, post telemetry samples.
"""
from __future__ import annotations

import hashlib
import time

import requests


class FakeAgent:
    def __init__(self, server_url: str, token: str):
        self.base = server_url.rstrip("/")
        self.s = requests.Session()
        self.s.headers["x-token"] = token
        self.seq: dict[int, int] = {}

    def post(self, path: str, body: dict | None = None, **kw) -> requests.Response:
        r = self.s.post(self.base + path, json=body or {}, timeout=kw.pop("timeout", 10), **kw)
        r.raise_for_status()
        return r

    def connect(self, **system_info) -> dict:
        info = {"hostname": "fake-node", "platform": "Linux-test", "agent_version": "test",
                "cpus": {"logical": 8, "physical": 4}, "memory": {"total": 16 << 30},
                "disks": [{"path": "/data", "total": 500 << 30, "used": 100 << 30, "free": 400 << 30, "percent": 20.0}],
                "gpus": [], "docker": {"version": "20.10"}}
        info.update(system_info)
        return self.post("/agent/v1/connect", info).json()

    def poll(self, running: list[int] | None = None, wait: float = 0, free_slots: int = 2, refusing: str = "") -> dict:
        body = {"free_slots": free_slots, "free_gpus": [], "running": running or [], "refusing": refusing}
        return self.post(f"/agent/v1/poll?wait={wait}", body, timeout=wait + 10).json()

    def poll_until(self, key: str, timeout: float = 10.0, running: list[int] | None = None) -> list:
        """Poll until the answer's `key` list (tasks / stop) is non-empty; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.poll(running=running, wait=1).get(key) or []
            if got:
                return got
        raise AssertionError(f"no {key} in poll answers within {timeout}s")

    def state(self, task_id: int, state: str, **fields) -> dict:
        return self.post(f"/agent/v1/tasks/{task_id}/state", {"state": state, **fields}).json()

    def log(self, task_id: int, *lines: dict | str) -> int:
        """Ship lines (a str is an info stdout line); returns the server's ack."""
        first = self.seq.get(task_id, 0)
        out = []
        for ln in lines:
            ln = {"message": ln} if isinstance(ln, str) else dict(ln)
            ln.setdefault("ts", time.time())
            ln.setdefault("level", "info")
            ln.setdefault("stream", "stdout")
            out.append(ln)
        self.seq[task_id] = first + len(out)
        return self.post(f"/agent/v1/tasks/{task_id}/logs", {"first_seq": first, "lines": out}).json()["acked"]

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        r = self.s.put(f"{self.base}/agent/v1/blobs/{sha}", data=data, timeout=30)
        r.raise_for_status()
        return sha

    def results(self, task_id: int, kind: str, files: dict[str, bytes], name: str = "") -> dict:
        """Upload the files as blobs and post them as the task's results."""
        refs = [{"path": p, "sha256": self.put_blob(d), "size": len(d)} for p, d in files.items()]
        return self.post(f"/agent/v1/tasks/{task_id}/results", {"kind": kind, "name": name, "files": refs}).json()

    def telemetry(self, cpu: float, mem: float, disk: float = 20.0, gpus: list[dict] | None = None) -> None:
        self.post("/agent/v1/telemetry", {
            "cpu": {"percent": cpu, "count": 8}, "memory": {"total": 16 << 30, "used": int((16 << 30) * mem / 100), "percent": mem},
            "disks": [{"path": "/data", "total": 500 << 30, "used": int((500 << 30) * disk / 100), "percent": disk}],
            "gpus": gpus or [], "containers": [], "free_slots": 2})
