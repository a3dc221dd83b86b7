"""The one test double of the agent: it speaks the real agent API (x-token) to the real server.

No agent code is involved: plain `requests` with the agent's token. Two kinds of method:

- raw (`request`, `post_raw`, `state_raw`, `logs_raw`): send exactly what the test says and return
  the `requests.Response` whatever its status. The server's conformance tests assert status codes
  and bodies with these.
- helpers (`post`, `connect`, `poll`, `poll_until`, `state`, `log`, `upload`, `results`,
  `telemetry`, `project_items`): act as a well-behaved agent; a non-2xx answer raises `requests.HTTPError`. They
  return the answer's JSON (or what the method says). The console, CLI and agent tests act as the
  agent with these: connect, poll for tasks and stops, report states, ship log lines with sequence
  numbers, upload results, post telemetry samples.

    agent = FakeAgent(server.url, token)            # agent_id is optional: kept as `agent.id`
    agent.connect()
    task = agent.poll_until("tasks")[0]
    agent.state(task["id"], "running")
    agent.log(task["id"], "hello")                  # seqs counted per task
    assert agent.state_raw(task["id"], "bogus").status_code == 400
"""

from __future__ import annotations

import hashlib
import time

import requests


class FakeAgent:
    def __init__(self, url: str, token: str, agent_id: int | None = None):
        self.url = url.rstrip("/")
        self.token, self.id = token, agent_id
        self.s = requests.Session()  # carries the x-token header; tests may use it directly
        self.s.headers["x-token"] = token
        self.seq: dict[int, int] = {}  # task id -> the next log seq `log` ships

    # --- raw: the response whatever its status -----------------------------------------------

    def request(self, method: str, path: str, **kw) -> requests.Response:
        """`method` on url + path with requests' keywords (json=, data=, params=, headers=, timeout=)."""
        return self.s.request(method, self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post_raw(self, path: str, **kw) -> requests.Response:
        return self.request("POST", path, **kw)

    def state_raw(self, task_id: int, state: str, **fields) -> requests.Response:
        return self.post_raw(f"/agent/v1/tasks/{task_id}/state", json={"state": state, **fields})

    def logs_raw(self, task_id: int, first_seq: int, lines: list[dict]) -> requests.Response:
        """Post the lines as given (no defaults filled in, no seq bookkeeping)."""
        return self.post_raw(f"/agent/v1/tasks/{task_id}/logs", json={"first_seq": first_seq, "lines": lines})

    # --- helpers: a non-2xx answer raises requests.HTTPError -----------------------------------

    def post(self, path: str, body: dict | None = None, **kw) -> requests.Response:
        """POST the body as JSON; the response, once its status is 2xx."""
        r = self.post_raw(path, json=body or {}, timeout=kw.pop("timeout", 10), **kw)
        r.raise_for_status()
        return r

    def connect(self, **system_info) -> dict:
        info = {
            "hostname": "fake-node",
            "platform": "Linux-test",
            "agent_version": "test",
            "cpus": {"logical": 8, "physical": 4},
            "memory": {"total": 16 << 30},
            "disks": [{"path": "/data", "total": 500 << 30, "used": 100 << 30, "free": 400 << 30, "percent": 20.0}],
            "gpus": [],
            "docker": {"version": "20.10"},
        }
        info.update(system_info)
        return self.post("/agent/v1/connect", info).json()

    def poll(self, free_slots: int = 1, free_gpus=(), running=(), wait: float = 0.0, refusing: str = "") -> dict:
        body = {
            "free_slots": free_slots,
            "free_gpus": list(free_gpus),
            "running": list(running or ()),
            "refusing": refusing,
        }
        return self.post(f"/agent/v1/poll?wait={wait}", body, timeout=wait + 10).json()

    def poll_until(self, key: str, timeout: float = 10.0, **poll) -> list:
        """Poll (1 s long polls; `poll`'s keywords, e.g. running=, free_slots=) until the answer's
        `key` list (tasks / stop) is non-empty; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.poll(wait=1, **poll).get(key) or []
            if got:
                return got
        raise AssertionError(f"no {key} in poll answers within {timeout}s")

    def state(self, task_id: int, state: str, **fields) -> dict:
        r = self.state_raw(task_id, state, **fields)
        r.raise_for_status()
        return r.json()

    def log(self, task_id: int, *lines: dict | str) -> int:
        """Ship lines (a str is an info stdout line) numbered on from the last ones; the server's ack."""
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

    def upload(self, data: bytes) -> str:
        """PUT the bytes as this agent (its results may name only blobs it may read); their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        r = self.request("PUT", f"/agent/v1/blobs/{sha}", data=data)
        r.raise_for_status()
        return sha

    def results(self, task_id: int, kind: str, files: dict[str, bytes], name: str = "") -> dict:
        """Upload the files as blobs and post them as the task's results."""
        refs = [{"path": p, "sha256": self.upload(d), "size": len(d)} for p, d in files.items()]
        return self.post(f"/agent/v1/tasks/{task_id}/results", {"kind": kind, "name": name, "files": refs}).json()

    def project_items(self, task_id: int, limit: int = 1000) -> list[dict]:
        """Every item ({id, dataset, name, sha256, size, ann}) of the project of a task leased to this
        agent, read a page at a time as an agent does (the poll answer carries no items)."""
        out: list[dict] = []
        cursor = ""
        while True:
            r = self.request(
                "GET", f"/agent/v1/tasks/{task_id}/project/items", params={"cursor": cursor, "limit": limit}
            )
            r.raise_for_status()
            page = r.json()
            out += page["items"]
            if page["next"] is None:
                return out
            cursor = page["next"]

    def telemetry(self, cpu: float, mem: float, disk: float = 20.0, gpus: list[dict] | None = None) -> None:
        self.post(
            "/agent/v1/telemetry",
            {
                "cpu": {"percent": cpu, "count": 8},
                "memory": {"total": 16 << 30, "used": int((16 << 30) * mem / 100), "percent": mem},
                "disks": [
                    {"path": "/data", "total": 500 << 30, "used": int((500 << 30) * disk / 100), "percent": disk}
                ],
                "gpus": gpus or [],
                "containers": [],
                "free_slots": 2,
            },
        )
