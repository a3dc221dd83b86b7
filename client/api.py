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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from client import download, sly_format, upload
from client.download import BLOB_TIMEOUT
from client.transfer import MAX_PARALLEL, PARALLEL, Progress, Tally
from protocol import bulk
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
        # A bulk transfer runs up to MAX_PARALLEL requests at once on this session.
        self.session.mount("http://", HTTPAdapter(max_retries=busy, pool_maxsize=MAX_PARALLEL))
        self.session.mount("https://", HTTPAdapter(max_retries=busy, pool_maxsize=MAX_PARALLEL))

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
    def create_agent(self, name: str, allowed_task_types: list[str] | None = None, gpus: bool = False) -> dict:
        """A new node: {id, name, token, run_command}; `gpus`: its docker run command gets `--gpus all`."""
        body: dict = {"name": name}
        if allowed_task_types is not None:
            body["allowed_task_types"] = allowed_task_types
        if gpus:
            body["gpus"] = True
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

    def rotate_token(self, agent_id: int, gpus: bool | None = None) -> dict:
        """A new token for the agent (the old one stops working at once): {id, name, token, run_command};
        `gpus`: the GPU form of the docker run command or not (None: when the node reported GPUs)."""
        params = None if gpus is None else {"gpus": str(gpus).lower()}
        return self._json("POST", ep.path(ep.AGENT_TOKEN, agent_id=agent_id), params=params)

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

    # --- many blobs at once (protocol/bulk.py) ---
    def check_blobs(self, hashes: Iterable[str]) -> set[str]:
        """The sha256s among `hashes` the server does not hold, asked MAX_COUNT at a time."""
        unique = list(dict.fromkeys(hashes))
        missing: set[str] = set()
        for i in range(0, len(unique), bulk.MAX_COUNT):
            missing.update(
                self._json("POST", ep.USER_BLOBS_CHECK, {"sha256": unique[i : i + bulk.MAX_COUNT]})["missing"]
            )
        return missing

    def upload_blobs(
        self, files: Iterable[tuple[str, str | os.PathLike]], on_sent: Callable[[int, int], None] | None = None
    ) -> list[dict]:
        """Send (sha256, path) pairs as one bulk upload (at most MAX_COUNT files, MAX_BYTES); the files
        are read as the body streams, never held whole. on_sent(files, nbytes) counts what has gone out.
        Returns the server's answer per file, in order: {sha256, size, created} or {sha256, error,
        detail} (`hash_mismatch`: the file changed since it was hashed)."""
        body = TarBody([(sha, os.fspath(p), os.stat(p).st_size) for sha, p in files], on_sent)
        r = self.request(
            "POST",
            ep.USER_BLOBS_UPLOAD,
            data=body,
            timeout=max(self.timeout, BLOB_TIMEOUT),
            headers={"content-type": bulk.CONTENT_TYPE},
        )
        return list(r.json()["blobs"])

    def download_blobs(self, hashes: Iterable[str]) -> Iterator[tuple[str, int, Iterator[bytes]]]:
        """One bulk download (at most MAX_COUNT blobs, MAX_BYTES): yields (sha256, size, chunks) per
        blob the server sent, in the order asked, as protocol.bulk.iter_entries does, streamed from
        the connection; a blob the server does not hold is simply not among them. Each entry's
        chunks must be read before the next. bulk.BadBatch when the stream is malformed or cut short."""
        r = self.request(
            "POST",
            ep.USER_BLOBS_DOWNLOAD,
            json={"sha256": list(hashes)},
            stream=True,
            timeout=max(self.timeout, BLOB_TIMEOUT),
        )
        with r:
            yield from bulk.iter_entries(_RawBody(r.raw))  # type: ignore[arg-type]  # read() is all it uses

    # --- projects and models ---
    def create_project(self, name: str, datasets: list[dict], meta: dict | None = None) -> dict:
        """datasets: [{name, items: [{name, sha256, size, ann?}]}]; meta: the Supervisely meta.json object."""
        body = {"name": name, "datasets": datasets}
        if meta is not None:
            body["meta"] = meta
        return self._json("POST", ep.PROJECTS, body)

    def add_items(self, project_id: int, dataset: str, items: list[dict]) -> dict:
        """Add a page of items ({name, sha256, size, ann?}, at most 5,000) to a dataset of the project
        (made if new): {dataset, added, items_count}."""
        return self._json(
            "POST", ep.path(ep.PROJECT_ITEMS, project_id=project_id), {"dataset": dataset, "items": items}
        )

    def project_items_page(
        self, project_id: int, dataset: str | None = None, cursor: str | None = None, limit: int = 5000
    ) -> tuple[list[dict], str | None]:
        """One page of the project's items ({name, sha256, size, ann, ...}, in order; `dataset` filters)
        and the cursor of the next page (None after the last)."""
        params = {k: v for k, v in {"dataset": dataset, "cursor": cursor, "limit": limit}.items() if v is not None}
        page = self.request("GET", ep.path(ep.PROJECT_ITEMS, project_id=project_id), params=params).json()
        return list(page["items"]), page.get("next")

    def upload_project_dir(
        self,
        directory: str | os.PathLike,
        name: str | None = None,
        progress: Progress | None = None,
        parallel: int = PARALLEL,
    ) -> dict:
        """Upload a folder as a project: a Supervisely project (meta.json at its top) with its meta and
        annotations, else each sub-folder is a dataset and files at the top go to `ds0`."""
        return upload.upload_project(self, Path(directory), name, progress, parallel)

    def download_project(
        self,
        project_id: int,
        directory: str | os.PathLike,
        force: bool = False,
        progress: Progress | None = None,
        parallel: int = PARALLEL,
    ) -> dict:
        """Write the project into `directory` as a Supervisely project folder; refuses a non-empty one unless force."""
        return download.download_project(self, project_id, Path(directory), force, progress, parallel)

    def list_projects(self) -> list[dict]:
        return self._list(ep.PROJECTS)

    def get_project(self, project_id: int) -> dict:
        return self._json("GET", ep.path(ep.PROJECT, project_id=project_id))

    def create_model(self, name: str, files: list[dict]) -> dict:
        return self._json("POST", ep.MODELS, {"name": name, "files": files})

    def upload_model_dir(
        self,
        directory: str | os.PathLike,
        name: str | None = None,
        progress: Progress | None = None,
        parallel: int = PARALLEL,
    ) -> dict:
        """Upload every file under a folder as a model (paths relative to the folder)."""
        return upload.upload_model(self, Path(directory), name, progress, parallel)

    def download_model(
        self,
        model_id: int,
        directory: str | os.PathLike,
        force: bool = False,
        progress: Progress | None = None,
        parallel: int = PARALLEL,
    ) -> dict:
        """Write the model's files into `directory` (paths kept); refuses a non-empty one unless force."""
        return download.download_model(self, model_id, Path(directory), force, progress, parallel)

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
        dataset_id: int | None = None,
        model_id: int | None = None,
        resources: dict | None = None,
        timeout_s: float | None = None,
        retry: dict | None = None,
    ) -> dict:
        """A queued task; `retry`: its retry policy {"max": N, "agent_ids"?: [...]} (a lost task is
        continued from its last checkpoint, docs/resume.md)."""
        body = {
            "agent_id": agent_id,
            "type": type,
            "image": image,
            "command": command,
            "config": config,
            "project_id": project_id,
            "dataset_id": dataset_id,
            "model_id": model_id,
            "resources": resources,
            "timeout_s": timeout_s,
            "retry": retry,
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

    def task_metrics(self, task_id: int, chain: bool = False) -> list[dict]:
        """The task's metrics points; `chain`: those of the lost runs it continues too, each with its `task_id`."""
        params = {"chain": 1} if chain else None
        return self._json("GET", ep.path(ep.TASK_METRICS, task_id=task_id), params=params)["items"]

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

    # --- team files (one team; Apps write them) ---
    def list_files(self, path: str = "/", recursive: bool = False, page_size: int = 1000) -> list[dict]:
        """Every entry of a team-files folder: files {type: "file", path, name, size, sha256, task_id, ...}
        and sub-folders {type: "folder", path (ending in /), name}; `recursive`: every file under it.
        A path that names a file gives that file alone; one that names nothing, APIError 404."""
        return self._list(ep.FILES, {"path": path, "recursive": 1 if recursive else None, "limit": page_size})

    def download_file(
        self,
        path: str,
        dest: str | os.PathLike,
        force: bool = False,
        progress: Progress | None = None,
        parallel: int = PARALLEL,
    ) -> dict:
        """Download a team file to `dest` (into it, named as the file, when `dest` is a folder), or a
        team folder's files into the folder `dest`, paths kept (refused when it is not empty, unless
        `force`). Every file is verified by its sha256. Returns {path, type, dest, files, bytes}."""
        head = self._json("GET", ep.FILES, params={"path": path, "limit": 1})
        tally = Tally(progress)
        if head["type"] == "file":
            entry = head["items"][0]
            target = Path(dest)
            if target.is_dir():
                target = target / sly_format.check_name(entry["name"], "team file")
            tally.stage("receiving", 1, entry["size"], entry["name"])
            r = self.request(
                "GET",
                ep.FILES_DOWNLOAD,
                params={"path": entry["path"]},
                stream=True,
                timeout=max(self.timeout, BLOB_TIMEOUT),
            )
            with r:
                download.write_verified(
                    target, entry["sha256"], r.iter_content(download.CHUNK), lambda n: tally.add(nbytes=n)
                )
            tally.add(files=1)
            return {"path": entry["path"], "type": "file", "dest": str(target), "files": 1, "bytes": entry["size"]}
        folder = head["path"]
        entries = self.list_files(folder, recursive=True)
        for e in entries:
            sly_format.check_relpath(e["path"][len(folder) :], "team file")
        root = download.prepare_dir(Path(dest), force)
        files = []
        for e in entries:
            target = root.joinpath(*e["path"][len(folder) :].split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            real = Path(os.path.realpath(target.parent))
            if real != root and root not in real.parents:  # a symlinked folder in dest
                raise download.DownloadError(f"{target} would be written outside {root}; refusing")
            files.append(download.File(e["sha256"], e["size"], target))
        download.receive_all(self, files, parallel, tally)
        total = sum(f.size for f in files)
        return {"path": folder, "type": "folder", "dest": str(root), "files": len(files), "bytes": total}


class TarBody:
    """The body of a bulk upload: per file its tar header, its bytes and their padding, then the
    end blocks; read from the files as it is sent.

    Its length is known up front (sent as content-length), and each iteration starts again from
    the first file, so a try that urllib3 repeats (503 server_busy) sends the whole stream again;
    on_sent counts each file once. A file that changed size since it was listed is cut or padded
    to the listed size, which keeps the stream well-formed: the server finds its hash wrong and
    keeps nothing of it (hash_mismatch)."""

    def __init__(self, files: list[tuple[str, str, int]], on_sent: Callable[[int, int], None] | None = None):
        self.files, self.on_sent = files, on_sent
        self.length = sum(bulk.BLOCK + size + (-size % bulk.BLOCK) for _, _, size in files) + len(bulk.TAR_END)
        self.counted = 0  # files reported to on_sent (a repeated try reports only those beyond)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for k, (sha, path, size) in enumerate(self.files, 1):
            with open(path, "rb") as f:
                if size <= download.CHUNK:  # a small file goes out with its header in one piece
                    data = f.read(size)
                    yield b"".join((bulk.header(sha, size), data, b"\0" * (size - len(data)), bulk.padding(size)))
                else:
                    yield bulk.header(sha, size)
                    left = size
                    while left and (b := f.read(min(download.CHUNK, left))):
                        left -= len(b)
                        yield b
                    yield b"\0" * left + bulk.padding(size)
            if k > self.counted:
                self.counted = k
                if self.on_sent:
                    self.on_sent(1, size)
        yield bulk.TAR_END


class _RawBody:
    """A streamed response's body as a file for bulk.iter_entries; a connection lost mid-stream is a
    bulk.BadBatch (the stream was cut short) like a stream that ends early."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        try:
            return self.raw.read(n, decode_content=True)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise bulk.BadBatch(f"the connection was lost: {type(e).__name__}") from None


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
