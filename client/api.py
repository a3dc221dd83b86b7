"""A Python client of the server's user API (admin token), used by the CLI, the demo, tests and benches.

    c = UserClient("http://127.0.0.1:8700", admin_token)
    agent = c.create_agent("gpu-1")                 # {"id", "name", "token", "run_command"}
    project = c.upload_project_dir("data/proj", "my project")
    task = c.create_task(agent["id"], "train", image="sly-test/busybox:latest", project_id=project["id"])
    c.wait_task(task["id"], {"finished"}, timeout=300)

Every method returns decoded JSON or raises `protocol.errors.APIError` (`AuthError` for a
refused token).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from client import download, upload
from client.download import BLOB_TIMEOUT
from protocol import endpoints as ep
from protocol.errors import decode_error
from protocol.states import FINAL

FINAL_STATES = frozenset(s.value for s in FINAL)
OCTETS = {"content-type": "application/octet-stream"}


class UserClient:
    """User-side API of protocol v1."""

    def __init__(self, url: str, admin_token: str, timeout: float = 30.0):
        self.base = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = ep.BEARER + admin_token
        # 503 `server_busy` (the server is decoding other large bodies; nothing was stored) is asked
        # again after its Retry-After. A PUT's body may be a file already read, so it is not.
        busy = Retry(
            total=6,
            connect=0,
            read=0,
            other=0,
            status=6,
            status_forcelist=(503,),
            allowed_methods=frozenset({"GET", "HEAD", "POST", "PATCH", "DELETE"}),
            backoff_factor=0.5,
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=busy))
        self.session.mount("https://", HTTPAdapter(max_retries=busy))

    # --- plumbing ---
    def request(
        self, method: str, path: str, *, expect=(200,), timeout: float | None = None, **kw
    ) -> requests.Response:
        r = self.session.request(method, self.base + path, timeout=timeout or self.timeout, **kw)
        if r.status_code not in expect:
            raise decode_error(r.status_code, r.content, method=method, path=path)
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
        return self._json("POST", ep.AGENTS, body)

    def list_agents(self) -> list[dict]:
        return self._list(ep.AGENTS)

    def get_agent(self, agent_id: int) -> dict:
        return self._json("GET", ep.path(ep.AGENT_BY_ID, agent_id=agent_id))

    def patch_agent(self, agent_id: int, name: str | None = None, allowed_task_types: list[str] | None = None) -> dict:
        body = {k: v for k, v in {"name": name, "allowed_task_types": allowed_task_types}.items() if v is not None}
        return self._json("PATCH", ep.path(ep.AGENT_BY_ID, agent_id=agent_id), body)

    def delete_agent(self, agent_id: int) -> dict:
        return self._json("DELETE", ep.path(ep.AGENT_BY_ID, agent_id=agent_id))

    def rotate_token(self, agent_id: int) -> dict:
        """A new token for the agent (the old one stops working at once): {id, name, token, run_command}."""
        return self._json("POST", ep.path(ep.AGENT_TOKEN, agent_id=agent_id))

    def agent_telemetry(self, agent_id: int, since: float | None = None) -> list[dict]:
        """History points {ts, cpu, mem, disks: [%], gpus: [[util, mem %]]}, oldest first."""
        params = {"since": since} if since is not None else None
        return self.request("GET", ep.path(ep.AGENT_TELEMETRY, agent_id=agent_id), params=params).json()["items"]

    # --- blobs ---
    def blob_exists(self, sha256: str) -> bool:
        return self.request("HEAD", ep.path(ep.USER_BLOB, sha256=sha256), expect=(200, 404)).status_code == 200

    def put_blob(self, sha256: str, data) -> None:
        """PUT bytes or a readable object (give it a __len__ to send a Content-Length) as blob `sha256`."""
        self.request(
            "PUT",
            ep.path(ep.USER_BLOB, sha256=sha256),
            data=data,
            timeout=max(self.timeout, BLOB_TIMEOUT),
            headers=OCTETS,
        )

    def upload_file(self, path: str | os.PathLike) -> str:
        """Upload a file as a blob unless the server has it already; return its sha256."""
        return upload.upload_one(self, Path(path))

    def upload_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.blob_exists(sha):
            self.put_blob(sha, data)
        return sha

    def download_blob(self, sha256: str, dest: str | os.PathLike | None = None) -> bytes | Path:
        """The blob's bytes, or (with dest) write them to dest, verified against sha256, and return its Path."""
        if dest is not None:
            return download.fetch_blob(self, sha256, Path(dest))
        return self.request(
            "GET", ep.path(ep.USER_BLOB, sha256=sha256), timeout=max(self.timeout, BLOB_TIMEOUT)
        ).content

    # --- projects and models ---
    def create_project(self, name: str, datasets: list[dict], meta: dict | None = None) -> dict:
        """datasets: [{name, items: [{name, sha256, size, ann?}]}]; meta: the Supervisely meta.json object."""
        body = {"name": name, "datasets": datasets}
        if meta is not None:
            body["meta"] = meta
        return self._json("POST", ep.PROJECTS, body)

    def upload_project_dir(
        self, directory: str | os.PathLike, name: str | None = None, progress: upload.Progress | None = None
    ) -> dict:
        """Upload a folder as a project: a Supervisely project (meta.json at its top) with its meta and
        annotations, else each sub-folder is a dataset and files at the top go to `ds0`."""
        return upload.upload_project(self, Path(directory), name, progress)

    def download_project(
        self,
        project_id: int,
        directory: str | os.PathLike,
        force: bool = False,
        progress: download.Progress | None = None,
    ) -> dict:
        """Write the project into `directory` as a Supervisely project folder; refuses a non-empty one unless force."""
        return download.download_project(self, project_id, Path(directory), force, progress)

    def list_projects(self) -> list[dict]:
        return self._list(ep.PROJECTS)

    def get_project(self, project_id: int) -> dict:
        return self._json("GET", ep.path(ep.PROJECT, project_id=project_id))

    def create_model(self, name: str, files: list[dict]) -> dict:
        return self._json("POST", ep.MODELS, {"name": name, "files": files})

    def upload_model_dir(
        self, directory: str | os.PathLike, name: str | None = None, progress: upload.Progress | None = None
    ) -> dict:
        """Upload every file under a folder as a model (paths relative to the folder)."""
        return upload.upload_model(self, Path(directory), name, progress)

    def download_model(
        self,
        model_id: int,
        directory: str | os.PathLike,
        force: bool = False,
        progress: download.Progress | None = None,
    ) -> dict:
        """Write the model's files into `directory` (paths kept); refuses a non-empty one unless force."""
        return download.download_model(self, model_id, Path(directory), force, progress)

    def list_models(self) -> list[dict]:
        return self._list(ep.MODELS)

    def get_model(self, model_id: int) -> dict:
        return self._json("GET", ep.path(ep.MODEL, model_id=model_id))

    # --- tasks ---
    def create_task(
        self,
        agent_id: int,
        type: str,
        image: str | None = None,
        *,
        command=None,
        config: dict | None = None,
        project_id: int | None = None,
        model_id: int | None = None,
        resources: dict | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        body = {
            "agent_id": agent_id,
            "type": type,
            "image": image,
            "command": command,
            "config": config,
            "project_id": project_id,
            "model_id": model_id,
            "resources": resources,
            "timeout_s": timeout_s,
        }
        return self._json("POST", ep.TASKS, {k: v for k, v in body.items() if v is not None})

    def get_task(self, task_id: int) -> dict:
        return self._json("GET", ep.path(ep.TASK, task_id=task_id))

    def list_tasks(self, agent_id: int | None = None, state: str | None = None) -> list[dict]:
        return self._list(ep.TASKS, {"agent_id": agent_id, "state": state})

    def stop_task(self, task_id: int) -> dict:
        return self._json("POST", ep.path(ep.TASK_STOP, task_id=task_id))

    def delete_task(self, task_id: int) -> dict:
        """Delete a final task with its log (409 task_not_final otherwise): {deleted, kept: {models, projects}}."""
        return self._json("DELETE", ep.path(ep.TASK, task_id=task_id))

    def task_artifacts(self, task_id: int, page_size: int = 1000) -> Iterator[dict]:
        """The task's artifacts {path, sha256, size}, by path, a page at a time."""
        path = ep.path(ep.TASK_ARTIFACTS, task_id=task_id)
        params: dict = {"limit": page_size}
        while True:
            page = self.request("GET", path, params=params).json()
            yield from page["items"]
            if page["next"] is None:
                return
            params["after"] = page["next"]

    def task_metrics(self, task_id: int) -> list[dict]:
        return self._json("GET", ep.path(ep.TASK_METRICS, task_id=task_id))["items"]

    def wait_task(
        self, task_id: int, states: Iterable[str] = FINAL_STATES, timeout: float = 60.0, interval: float = 0.2
    ) -> dict:
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
        return self._json("GET", ep.path(ep.USER_TASK_LOGS, task_id=task_id), params={"after": after, "limit": limit})

    def iter_logs(
        self, task_id: int, follow: bool = True, after: int = -1, timeout: float | None = None
    ) -> Iterator[dict]:
        """Every log line of the task in seq order. follow=True: live (server-sent events) until the task is final."""
        if not follow:
            while True:
                page = self.get_logs(task_id, after=after, limit=10000)
                yield from page["lines"]
                if page["lines"]:
                    after = page["lines"][-1]["seq"]
                if page.get("next") is None:  # seq 0 is a valid `next`
                    return
        r = self.request(
            "GET",
            ep.path(ep.USER_TASK_LOGS, task_id=task_id),
            params={"after": after, "follow": 1},
            stream=True,
            timeout=(self.timeout, timeout),
        )
        event = None
        with r:
            for raw in _sse_lines(r):
                if raw.startswith("event:"):
                    event = raw[6:].strip()
                elif raw.startswith("data:") and event == "line":
                    yield json.loads(raw[5:])
                elif raw == "" and event == "end":
                    return
                elif raw == "":
                    event = None


def _sse_lines(response) -> Iterator[str]:
    """The text lines of a streamed answer, in linear time even for a line of many MiB
    (requests' iter_lines re-scans the whole pending line at every chunk)."""
    buf, scanned = bytearray(), 0
    for chunk in response.iter_content(chunk_size=256 * 1024):
        buf += chunk
        start = 0
        while True:
            i = buf.find(b"\n", max(start, scanned))
            if i < 0:
                break
            yield buf[start:i].rstrip(b"\r").decode()
            start = i + 1
        del buf[:start]
        scanned = len(buf)
    if buf:
        yield buf.decode()
