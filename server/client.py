"""A small Python client of the server's USER API (admin token). Used by the CLI, demo, tests, benches.

    c = UserClient("http://127.0.0.1:8700", admin_token)
    agent = c.create_agent("gpu-1")                 # {"id", "name", "token", "run_command"}
    project = c.upload_project_dir("data/proj", "my project")
    task = c.create_task(agent["id"], "train", image="sly-test/busybox:latest", project_id=project["id"])
    c.wait_task(task["id"], {"finished"}, timeout=300)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import requests

FINAL_STATES = frozenset({"finished", "failed", "stopped", "lost"})


class ServerError(Exception):
    """The server answered with an error: `status`, `code` (the JSON `error`) and `detail`."""

    def __init__(self, method: str, path: str, status: int, code: str = "", detail: str = ""):
        self.method, self.path, self.status, self.code, self.detail = method, path, status, code, detail
        super().__init__(f"{method} {path}: {status} {code} {detail}".strip())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class UserClient:
    """User-side API of protocol v1. Every method returns decoded JSON or raises ServerError."""

    def __init__(self, url: str, admin_token: str, timeout: float = 30.0):
        self.base = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {admin_token}"

    # --- plumbing ---
    def request(self, method: str, path: str, *, expect=(200,), timeout: float | None = None, **kw) -> requests.Response:
        r = self.session.request(method, self.base + path, timeout=timeout or self.timeout, **kw)
        if r.status_code not in expect:
            code, detail = "", r.text[:300]
            try:
                body = r.json()
                code, detail = body.get("error", ""), body.get("detail", "")
            except ValueError:
                pass
            raise ServerError(method, path, r.status_code, code, detail)
        return r

    def _json(self, method: str, path: str, body=None, **kw):
        return self.request(method, path, json=body, **kw).json()

    def _list(self, path: str, params: dict | None = None) -> list[dict]:
        """Every item of a paged list endpoint."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        items: list[dict] = []
        while True:
            page = self.request("GET", path, params=params).json()
            items.extend(page["items"])
            if not page.get("next"):
                return items
            params["cursor"] = page["next"]

    # --- agents ---
    def create_agent(self, name: str, allowed_task_types: list[str] | None = None) -> dict:
        body = {"name": name}
        if allowed_task_types is not None:
            body["allowed_task_types"] = allowed_task_types
        return self._json("POST", "/api/v1/agents", body)

    def list_agents(self) -> list[dict]:
        return self._list("/api/v1/agents")

    def get_agent(self, agent_id: int) -> dict:
        return self._json("GET", f"/api/v1/agents/{agent_id}")

    def patch_agent(self, agent_id: int, name: str | None = None, allowed_task_types: list[str] | None = None) -> dict:
        body = {k: v for k, v in {"name": name, "allowed_task_types": allowed_task_types}.items() if v is not None}
        return self._json("PATCH", f"/api/v1/agents/{agent_id}", body)

    def delete_agent(self, agent_id: int) -> dict:
        return self._json("DELETE", f"/api/v1/agents/{agent_id}")

    def rotate_token(self, agent_id: int) -> dict:
        """A new token for the agent (the old one stops working at once): {id, name, token, run_command}."""
        return self._json("POST", f"/api/v1/agents/{agent_id}/token")

    def agent_telemetry(self, agent_id: int, since: float | None = None) -> list[dict]:
        params = {"since": since} if since is not None else None
        return self.request("GET", f"/api/v1/agents/{agent_id}/telemetry", params=params).json()["items"]

    # --- blobs ---
    def blob_exists(self, sha256: str) -> bool:
        return self.request("HEAD", f"/api/v1/blobs/{sha256}", expect=(200, 404)).status_code == 200

    def upload_file(self, path: str | os.PathLike) -> str:
        """Upload a file as a blob unless the server has it already; return its sha256."""
        sha = sha256_file(path)
        if not self.blob_exists(sha):
            with open(path, "rb") as f:
                self.request("PUT", f"/api/v1/blobs/{sha}", data=f, timeout=max(self.timeout, 600),
                             headers={"content-type": "application/octet-stream"})
        return sha

    def upload_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blob_exists(sha):
            self.request("PUT", f"/api/v1/blobs/{sha}", data=data, headers={"content-type": "application/octet-stream"})
        return sha

    def download_blob(self, sha256: str, dest: str | os.PathLike | None = None) -> bytes | Path:
        """The blob's bytes, or (with dest) write them to dest and return its Path."""
        r = self.request("GET", f"/api/v1/blobs/{sha256}", stream=dest is not None, timeout=max(self.timeout, 600))
        if dest is None:
            return r.content
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)
        return dest

    # --- projects and models ---
    def create_project(self, name: str, datasets: list[dict]) -> dict:
        return self._json("POST", "/api/v1/projects", {"name": name, "datasets": datasets})

    def upload_project_dir(self, directory: str | os.PathLike, name: str | None = None) -> dict:
        """Upload a folder as a project: each subfolder is a dataset, each file in it an item."""
        root = Path(directory)
        datasets = []
        for ds in sorted(p for p in root.iterdir() if p.is_dir()):
            items = []
            for f in sorted(p for p in ds.rglob("*") if p.is_file()):
                items.append({"name": f.relative_to(ds).as_posix(), "sha256": self.upload_file(f), "size": f.stat().st_size})
            datasets.append({"name": ds.name, "items": items})
        return self.create_project(name or root.name, datasets)

    def list_projects(self) -> list[dict]:
        return self._list("/api/v1/projects")

    def get_project(self, project_id: int) -> dict:
        return self._json("GET", f"/api/v1/projects/{project_id}")

    def create_model(self, name: str, files: list[dict]) -> dict:
        return self._json("POST", "/api/v1/models", {"name": name, "files": files})

    def upload_model_dir(self, directory: str | os.PathLike, name: str | None = None) -> dict:
        """Upload every file under a folder as a model (paths relative to the folder)."""
        root = Path(directory)
        files = [{"path": f.relative_to(root).as_posix(), "sha256": self.upload_file(f), "size": f.stat().st_size}
                 for f in sorted(p for p in root.rglob("*") if p.is_file())]
        return self.create_model(name or root.name, files)

    def list_models(self) -> list[dict]:
        return self._list("/api/v1/models")

    def get_model(self, model_id: int) -> dict:
        return self._json("GET", f"/api/v1/models/{model_id}")

    # --- tasks ---
    def create_task(self, agent_id: int, type: str, image: str | None = None, *, command=None, config: dict | None = None,
                    project_id: int | None = None, model_id: int | None = None, resources: dict | None = None,
                    timeout_s: float | None = None) -> dict:
        body = {"agent_id": agent_id, "type": type, "image": image, "command": command, "config": config,
                "project_id": project_id, "model_id": model_id, "resources": resources, "timeout_s": timeout_s}
        return self._json("POST", "/api/v1/tasks", {k: v for k, v in body.items() if v is not None})

    def get_task(self, task_id: int) -> dict:
        return self._json("GET", f"/api/v1/tasks/{task_id}")

    def list_tasks(self, agent_id: int | None = None, state: str | None = None) -> list[dict]:
        return self._list("/api/v1/tasks", {"agent_id": agent_id, "state": state})

    def stop_task(self, task_id: int) -> dict:
        return self._json("POST", f"/api/v1/tasks/{task_id}/stop")

    def task_metrics(self, task_id: int) -> list[dict]:
        return self._json("GET", f"/api/v1/tasks/{task_id}/metrics")["items"]

    def wait_task(self, task_id: int, states: Iterable[str] = FINAL_STATES, timeout: float = 60.0,
                  interval: float = 0.2) -> dict:
        """Poll the task until its state is one of `states`; return it. TimeoutError after `timeout` s."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            task = self.get_task(task_id)
            if task["state"] in states:
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} is {task['state']} after {timeout}s, not one of {sorted(states)}")
            time.sleep(interval)

    def get_logs(self, task_id: int, after: int = -1, limit: int = 1000) -> dict:
        """One page: {"lines": [...], "next": seq to pass as `after` for more, or null}."""
        return self._json("GET", f"/api/v1/tasks/{task_id}/logs", params={"after": after, "limit": limit})

    def iter_logs(self, task_id: int, follow: bool = True, after: int = -1, timeout: float | None = None) -> Iterator[dict]:
        """Every log line of the task in seq order. follow=True: live (server-sent events) until the task is final."""
        if not follow:
            while True:
                page = self.get_logs(task_id, after=after, limit=10000)
                yield from page["lines"]
                if page["lines"]:
                    after = page["lines"][-1]["seq"]
                if not page.get("next"):
                    return
        r = self.request("GET", f"/api/v1/tasks/{task_id}/logs", params={"after": after, "follow": 1},
                         stream=True, timeout=(self.timeout, timeout))
        event = None
        with r:
            for raw in r.iter_lines(decode_unicode=True):
                if raw is None:
                    continue
                if raw.startswith("event:"):
                    event = raw[6:].strip()
                elif raw.startswith("data:") and event == "line":
                    yield json.loads(raw[5:])
                elif raw == "" and event == "end":
                    return
                elif raw == "":
                    event = None
