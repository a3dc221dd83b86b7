"""HTTP client for the agent side of protocol v1 (see docs/protocol.md).

One `AgentAPI` per process, created after the fork (a requests.Session must not cross a fork).
Transient failures (connection errors, 502/503/504) of idempotent calls are retried by urllib3's
`Retry` with backoff; every call has a timeout. The token travels only in the `x-token` header
and never appears in an exception message (`APIError` carries method, path and status only).
"""
from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from agent import __version__


class APIError(Exception):
    """A request to the server failed: `status` is None for a connection failure."""

    def __init__(self, method: str, path: str, status: int | None, detail: str = "", code: str = ""):
        self.method, self.path, self.status, self.detail, self.code = method, path, status, detail, code
        where = f"{method} {path}"
        super().__init__(f"{where}: {status or 'no answer'} {code} {detail}".strip())


class AuthError(APIError):
    """The server refused the token (401)."""


def make_session(token: str, retries: int = 3, pool: int = 16) -> requests.Session:
    s = requests.Session()
    retry = Retry(total=retries, connect=retries, read=retries, backoff_factor=0.2, backoff_jitter=0.2,
                  status_forcelist=(502, 503, 504),
                  # The protocol makes every agent call safe to repeat (seqs, sha256, states).
                  allowed_methods=frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"}),
                  raise_on_status=False, respect_retry_after_header=True)
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool, pool_maxsize=pool)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers.update({"x-token": token, "user-agent": f"sly-agent/{__version__}"})
    return s


class AgentAPI:
    """Thin wrapper over the agent endpoints. Methods return decoded JSON or raise APIError."""

    def __init__(self, server_address: str, token: str, timeout: float = 30.0, retries: int = 3):
        self.base = server_address.rstrip("/")
        self.timeout = timeout
        self.session = make_session(token, retries=retries)

    def url(self, path: str) -> str:
        return self.base + path

    def request(self, method: str, path: str, *, json=None, timeout: float | None = None,
                expect=(200,), **kw) -> requests.Response:
        try:
            r = self.session.request(method, self.url(path), json=json, timeout=timeout or self.timeout, **kw)
        except requests.RequestException as e:
            raise APIError(method, path, None, type(e).__name__) from None
        if r.status_code not in expect:
            code, detail = "", r.text[:300]
            try:
                body = r.json()
                code, detail = body.get("error", ""), body.get("detail", "")
            except ValueError:
                pass
            cls = AuthError if r.status_code == 401 else APIError
            raise cls(method, path, r.status_code, detail, code)
        return r

    # --- protocol v1, agent side ---
    def connect(self, system_info: dict) -> dict:
        return self.request("POST", "/agent/v1/connect", json=system_info).json()

    def poll(self, free_slots: int, free_gpus: list[int], running: list[int], wait: float,
             refusing: str = "") -> dict:
        """`refusing`: why the agent takes no task now (e.g. short of disk); shown on the server."""
        body = {"free_slots": free_slots, "free_gpus": free_gpus, "running": running}
        if refusing:
            body["refusing"] = refusing
        return self.request("POST", f"/agent/v1/poll?wait={wait:g}", json=body, timeout=wait + 15).json()

    def set_state(self, task_id: int, state: str, **fields) -> dict:
        body = {"state": state, **{k: v for k, v in fields.items() if v is not None}}
        return self.request("POST", f"/agent/v1/tasks/{task_id}/state", json=body).json()

    def send_logs(self, task_id: int, first_seq: int, lines: list[dict], gzip_body: bytes | None = None) -> int:
        """Ship lines first_seq.. ; returns the server's `acked` (highest contiguous seq stored)."""
        path = f"/agent/v1/tasks/{task_id}/logs"
        if gzip_body is not None:
            r = self.request("POST", path, data=gzip_body,
                             headers={"content-type": "application/json", "content-encoding": "gzip"})
        else:
            r = self.request("POST", path, json={"first_seq": first_seq, "lines": lines})
        return int(r.json()["acked"])

    def telemetry(self, sample: dict) -> None:
        self.request("POST", "/agent/v1/telemetry", json=sample, timeout=10)

    def blob_exists(self, sha256: str) -> bool:
        r = self.request("HEAD", f"/agent/v1/blobs/{sha256}", expect=(200, 404))
        return r.status_code == 200

    def post_results(self, task_id: int, kind: str, name: str, files: list[dict]) -> dict:
        body = {"kind": kind, "name": name, "files": files}
        return self.request("POST", f"/agent/v1/tasks/{task_id}/results", json=body).json()
