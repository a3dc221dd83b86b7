"""The user client asks again when the server is busy with other large bodies (503 server_busy)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from client import UserClient


def test_a_busy_answer_is_retried_after_its_retry_after():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(self.path)
            busy = len(seen) < 3
            body = json.dumps({"error": "server_busy", "detail": "busy"} if busy else {"id": 1, "name": "p"}).encode()
            self.send_response(503 if busy else 200)
            if busy:
                self.send_header("Retry-After", "0")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = UserClient(f"http://127.0.0.1:{srv.server_address[1]}", "t" * 32)
        assert c.request("POST", "/api/v1/projects", json={"name": "p"}).json() == {"id": 1, "name": "p"}
        assert seen == ["/api/v1/projects"] * 3
    finally:
        srv.shutdown()
