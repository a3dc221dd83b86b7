"""A loopback HTTP server that answers the user API's project, model and blob paths from a dict.

It stands in for a server the tests cannot make the real one be: one that already stores
annotations, pages items through `/items`, or answers with hostile names and wrong bytes. It
records what clients POST, so the body the CLI sends is checked as it crossed the wire.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class StubServer:
    def __init__(self):
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes served (may be made not to match)
        self.projects: dict[int, dict] = {}
        self.models: dict[int, dict] = {}
        self.items_pages: dict[int, dict[str, list[list[dict]]]] = {}  # project -> dataset -> pages for /items
        self.posted: list[tuple[str, dict]] = []
        self.requests: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: bytes = b"", ctype: str = "application/json"):
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj, status: int = 200):
                self._send(status, json.dumps(obj).encode())

            def _not_found(self):
                self._json({"error": "not_found", "detail": f"no {self.path}"}, 404)

            def do_HEAD(self):
                m = re.fullmatch(r"/api/v1/blobs/([0-9a-f]{64})", urlparse(self.path).path)
                self._send(200 if m and m[1] in stub.blobs else 404)

            def do_PUT(self):
                data = self.rfile.read(int(self.headers["content-length"]))
                stub.blobs[hashlib.sha256(data).hexdigest()] = data
                self._json({})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                path = urlparse(self.path).path
                stub.posted.append((path, body))
                store = stub.projects if path == "/api/v1/projects" else stub.models
                new = {"id": len(store) + 1, **body}
                store[new["id"]] = new
                self._json(new)

            def do_GET(self):
                url = urlparse(self.path)
                stub.requests.append(url.path)
                if m := re.fullmatch(r"/api/v1/blobs/([0-9a-f]{64})", url.path):
                    return (
                        self._send(200, stub.blobs[m[1]], "application/octet-stream")
                        if m[1] in stub.blobs
                        else self._not_found()
                    )
                if m := re.fullmatch(r"/api/v1/projects/(\d+)", url.path):
                    return self._json(stub.projects[int(m[1])]) if int(m[1]) in stub.projects else self._not_found()
                if m := re.fullmatch(r"/api/v1/projects/(\d+)/items", url.path):
                    q = parse_qs(url.query)
                    pages = stub.items_pages.get(int(m[1]), {}).get(q.get("dataset", [""])[0])
                    if pages is None:
                        return self._not_found()
                    k = int(q.get("cursor", ["0"])[0])
                    return self._json({"items": pages[k], "next": str(k + 1) if k + 1 < len(pages) else None})
                if m := re.fullmatch(r"/api/v1/models/(\d+)", url.path):
                    return self._json(stub.models[int(m[1])]) if int(m[1]) in stub.models else self._not_found()
                self._not_found()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.admin_token = "stub-token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
