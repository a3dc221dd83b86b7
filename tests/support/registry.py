"""A tiny Docker Registry (HTTP API v2, read-only) on loopback, so pulls can be tested with no
registry on the network. It serves images made of the busybox rootfs; `delay_s` spreads each
layer's bytes over that many seconds (a slow pull); `auth=(user, password)` makes every request
need HTTP basic auth (no token service: the engine answers a `Basic` challenge itself). The engine
trusts 127.0.0.0/8 over plain HTTP.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tools.images import busybox_rootfs_tar

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    def __init__(self, delay_s: float = 0.0, auth: tuple[str, str] | None = None):
        self.delay_s = delay_s
        self.auth = auth
        self.refused = 0  # requests answered 401
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.registry = self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def add_image(
        self, name: str, tag: str = "latest", cmd: list[str] | None = None, extra_files: dict[str, bytes] | None = None
    ) -> str:
        """Serve a busybox image as <host>/<name>:<tag>; returns that reference."""
        # A file unique to this image, so its layer is new to the engine and really is pulled.
        files = {"etc/sly-image-id": f"{name}:{tag}:{secrets.token_hex(8)}\n".encode(), **(extra_files or {})}
        layer_tar = busybox_rootfs_tar(files)
        layer = gzip.compress(layer_tar, compresslevel=1)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/sh"]},
                "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
            }
        ).encode()
        self.blobs[_digest(layer)] = layer
        self.blobs[_digest(config)] = config
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config),
                    "digest": _digest(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(layer),
                        "digest": _digest(layer),
                    }
                ],
            }
        ).encode()
        self.manifests[(name, tag)] = manifest
        self.manifests[(name, _digest(manifest))] = manifest  # the engine asks again by digest
        return f"{self.host}/{name}:{tag}"

    def start(self) -> Registry:
        threading.Thread(target=self.httpd.serve_forever, name="registry", daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    """One request to the Registry that `self.server.registry` is."""

    def log_message(self, *args):  # quiet
        pass

    @property
    def registry(self) -> Registry:
        return self.server.registry

    def _send(self, code: int, body: bytes = b"", ctype: str = "application/json", extra=None, slow=False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or not body:
            return
        delay_s = self.registry.delay_s
        if not slow or delay_s <= 0:
            self.wfile.write(body)
            return
        chunks = 20
        step = max(1, len(body) // chunks)
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            self.wfile.flush()
            time.sleep(delay_s / chunks)

    def _authorized(self) -> bool:
        auth = self.registry.auth
        if auth is None:
            return True
        want = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        return secrets.compare_digest(self.headers.get("Authorization", ""), want)

    def do_GET(self):
        registry = self.registry
        registry.requests.append(f"{self.command} {self.path}")
        if not self._authorized():
            registry.refused += 1
            return self._send(
                401,
                b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                extra={"WWW-Authenticate": 'Basic realm="sly-test-registry"'},
            )
        path = self.path.split("?")[0]
        if path in ("/v2/", "/v2"):
            return self._send(200, b"{}")
        if "/manifests/" in path:
            name, _, ref = path[len("/v2/") :].partition("/manifests/")
            body = registry.manifests.get((name, ref))
            if body is None:
                return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            return self._send(200, body, MANIFEST_V2, {"Docker-Content-Digest": _digest(body)})
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            body = registry.blobs.get(digest)
            if body is None:
                return self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            return self._send(
                200, body, "application/octet-stream", {"Docker-Content-Digest": digest}, slow=len(body) > 10_000
            )
        return self._send(404, b"{}")

    do_HEAD = do_GET
