"""A loopback HTTP server that answers the user API's project, model and blob paths from dicts.

It stands in for a server the tests cannot make the real one be: one that answers with hostile
names, wrong bytes or a bulk stream cut short, or pages items a few at a time. It records what
clients send (every request, every JSON body, every blob that arrived and how), so what the
client put on the wire is checked as it crossed it. The bulk routes follow protocol/bulk.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from protocol import bulk

BLOB = re.compile(r"/api/v1/blobs/([0-9a-f]{64})")
PROJECT = re.compile(r"/api/v1/projects/(\d+)")
ITEMS = re.compile(r"/api/v1/projects/(\d+)/items")
MODEL = re.compile(r"/api/v1/models/(\d+)")


class _Body:
    """At most `left` bytes of a request's body, as a file (bulk.iter_entries reads it)."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        b = self.f.read(n) if n else b""
        self.left -= len(b)
        return b


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    @property
    def stub(self) -> StubServer:
        return self.server.stub

    def log_message(self, *a):
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json", headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200):
        self._send(status, json.dumps(obj).encode())

    def _not_found(self):
        self._json({"error": "not_found", "detail": f"no {self.path}"}, 404)

    def _path(self) -> str:
        path = urlparse(self.path).path
        with self.stub.lock:
            self.stub.requests.append(f"{self.command} {path}")
        return path

    def _length(self) -> int:
        return int(self.headers.get("content-length") or 0)

    def do_HEAD(self):
        m = BLOB.fullmatch(self._path())
        self._send(200 if m and m[1] in self.stub.blobs else 404)

    def do_PUT(self):
        self._path()
        data = self.rfile.read(self._length())
        self.stub.keep(data)
        self._json({})

    def do_POST(self):
        path = self._path()
        if path == "/api/v1/blobs/upload" and self.stub.busy > 0:
            self.rfile.read(self._length())
            self.stub.busy -= 1
            busy = {"error": "server_busy", "detail": "busy; nothing was stored"}
            return self._send(503, json.dumps(busy).encode(), headers={"retry-after": "0"})
        if path == "/api/v1/blobs/upload":
            body = _Body(self.rfile, self._length())
            answers = self.stub.receive(body)
            body.read()  # the end blocks after the first (the connection is kept for the next request)
            return self._json({"blobs": answers})
        body = json.loads(self.rfile.read(self._length()))
        if path == "/api/v1/blobs/check":
            return self._json({"missing": [s for s in body["sha256"] if s not in self.stub.blobs]})
        if path == "/api/v1/blobs/download":
            return self._download(body["sha256"])
        with self.stub.lock:
            self.stub.posted.append((path, body))
        if m := ITEMS.fullmatch(path):
            return self._json(self.stub.add_items(int(m[1]), body["dataset"], body["items"]))
        if path == "/api/v1/projects":
            return self._json(self.stub.summary(self.stub.add_project(body)))
        new = {"id": len(self.stub.models) + 1, **body}
        self.stub.models[new["id"]] = new
        self._json(new)

    def _download(self, asked: list[str]):
        with self.stub.lock:
            self.stub.asked.append(list(asked))
        present = [s for s in dict.fromkeys(asked) if s in self.stub.blobs]
        out = b"".join(
            bulk.header(s, len(self.stub.blobs[s])) + self.stub.blobs[s] + bulk.padding(len(self.stub.blobs[s]))
            for s in present
        )
        out += bulk.TAR_END
        if self.stub.cut_download_after is not None:
            out = out[: self.stub.cut_download_after]  # what a connection lost mid-stream delivers
        self.send_response(200)
        self.send_header("content-type", bulk.CONTENT_TYPE)
        self.send_header(bulk.BULK_MISSING_HEADER, str(len(set(asked)) - len(present)))
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        url = urlparse(self.path)
        path = self._path()
        if m := BLOB.fullmatch(path):
            if m[1] not in self.stub.blobs:
                return self._not_found()
            return self._send(200, self.stub.blobs[m[1]], "application/octet-stream")
        if m := PROJECT.fullmatch(path):
            p = self.stub.projects.get(int(m[1]))
            return self._json(self.stub.summary(p)) if p else self._not_found()
        if m := ITEMS.fullmatch(path):
            p = self.stub.projects.get(int(m[1]))
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            ds = next((d for d in (p or {}).get("datasets", []) if d["name"] == q.get("dataset")), None)
            if ds is None:
                return self._not_found()
            start, limit = int(q.get("cursor", 0)), int(q.get("limit", 100))
            end = start + min(limit, self.stub.page_size or limit)
            return self._json({"items": ds["items"][start:end], "next": str(end) if end < len(ds["items"]) else None})
        if m := MODEL.fullmatch(path):
            return self._json(self.stub.models[int(m[1])]) if int(m[1]) in self.stub.models else self._not_found()
        self._not_found()


class _Server(ThreadingHTTPServer):
    stub: StubServer
    daemon_threads = True


class StubServer:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes served (may be made not to match)
        # project id -> {id, name, meta, datasets: [{name, items: [{name, sha256, size, ann?}]}]}
        self.projects: dict[int, dict] = {}
        self.models: dict[int, dict] = {}
        self.page_size: int | None = None  # serve at most this many items per page (None: as asked)
        self.cut_download_after: int | None = None  # end every bulk download after this many bytes
        self.busy = 0  # answer this many bulk uploads 503 server_busy (after reading them) first
        self.posted: list[tuple[str, dict]] = []  # JSON bodies of POSTs that make or add to things
        self.requests: list[str] = []  # "METHOD /path" of every request
        self.uploaded: list[str] = []  # sha256 of every blob that arrived (PUT or bulk), in order
        self.asked: list[list[str]] = []  # the sha256s of every bulk download
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.stub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.admin_token = "stub-token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def keep(self, data: bytes) -> str:
        with self.lock:
            sha = self.add_blob(data)
            self.uploaded.append(sha)
        return sha

    def receive(self, body: _Body) -> list[dict]:
        """A bulk upload's answers: each entry kept when its bytes hash to its name (as the server)."""
        out = []
        for sha, size, chunks in bulk.iter_entries(body):
            data = b"".join(chunks)
            if hashlib.sha256(data).hexdigest() != sha:
                out.append({"sha256": sha, "error": "hash_mismatch", "detail": "the bytes hash otherwise"})
            else:
                self.keep(data)
                out.append({"sha256": sha, "size": size, "created": True})
        return out

    def add_project(self, body: dict) -> dict:
        with self.lock:
            new = {
                "id": len(self.projects) + 1,
                "name": body["name"],
                "meta": body.get("meta"),
                "datasets": [{"name": d["name"], "items": list(d["items"])} for d in body["datasets"]],
            }
            self.projects[new["id"]] = new
        return new

    def add_items(self, project_id: int, dataset: str, items: list[dict]) -> dict:
        with self.lock:
            datasets = self.projects[project_id]["datasets"]
            ds = next((d for d in datasets if d["name"] == dataset), None)
            if ds is None:
                datasets.append(ds := {"name": dataset, "items": []})
            ds["items"].extend(items)
        return {"dataset": dataset, "added": len(items), "items_count": len(ds["items"])}

    @staticmethod
    def summary(project: dict) -> dict:
        """A project as the server answers it: datasets as {name, items_count}, no items."""
        datasets = [{"name": d["name"], "items_count": len(d["items"])} for d in project["datasets"]]
        return {**project, "datasets": datasets}

    def items(self, project_id: int = 1) -> dict[tuple[str, str], dict]:
        """(dataset, item name) -> the item, of a stored project."""
        return {(d["name"], i["name"]): i for d in self.projects[project_id]["datasets"] for i in d["items"]}

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
