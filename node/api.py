"""HTTP client for the agent side of protocol v1 (see docs/protocol.md).

One `AgentAPI` per process, created after the fork (a requests.Session must not cross a fork).
Transient failures (connection errors, 502/503/504) of idempotent calls are retried by urllib3's
`Retry` with backoff; every call has a timeout. The token travels only in the `x-token` header
and never appears in an exception message (`protocol.errors.APIError` carries method, path,
status, code and detail only). Paths and headers come from `protocol.endpoints`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, cast

import orjson
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from node import __version__
from protocol import bulk
from protocol import endpoints as ep
from protocol.errors import APIError, decode_error

BLOB_CHUNK = 1 << 20
RESULTS_BUSY_WAIT_S = 600.0  # how long a results post waits out a busy server
BUSY_CODES = frozenset({"too_many_checks", "server_busy"})
BULK_TIMEOUT_S = 60.0  # the longest silence between two reads of a bulk download or upload
PAGE_ITEMS = 5000  # project items per page (the server's most)


def make_session(token: str, retries: int = 3, pool: int = 16) -> requests.Session:
    s = requests.Session()
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        backoff_factor=0.2,
        backoff_jitter=0.2,
        status_forcelist=(502, 503, 504),
        # The protocol makes every agent call safe to repeat (seqs, sha256, states).
        allowed_methods=frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=pool, pool_maxsize=pool)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers.update({ep.AGENT_TOKEN_HEADER: token, "user-agent": f"sly-agent/{__version__}"})
    return s


def _no_answer(method: str, path: str, e: BaseException) -> APIError:
    return decode_error(None, type(e).__name__, method=method, path=path)


class AgentAPI:
    """Thin wrapper over the agent endpoints. Methods return decoded JSON or raise APIError."""

    def __init__(self, server_address: str, token: str, timeout: float = 30.0, retries: int = 3):
        self.base = server_address.rstrip("/")
        self.timeout = timeout
        self.session = make_session(token, retries=retries)

    def url(self, path: str) -> str:
        return self.base + path

    def request(
        self, method: str, path: str, *, json=None, timeout: float | None = None, expect=(200,), **kw
    ) -> requests.Response:
        try:
            r = self.session.request(method, self.url(path), json=json, timeout=timeout or self.timeout, **kw)
        except requests.RequestException as e:
            raise _no_answer(method, path, e) from None
        if r.status_code not in expect:
            raise decode_error(r.status_code, r.content, method=method, path=path)
        return r

    # --- protocol v1, agent side ---
    def connect(self, system_info: dict) -> dict:
        return self.request("POST", ep.CONNECT, json=system_info).json()

    def poll(self, free_slots: int, free_gpus: list[int], running: list[int], wait: float, refusing: str = "") -> dict:
        """`refusing`: why the agent takes no task now (e.g. short of disk); shown on the server."""
        body = {"free_slots": free_slots, "free_gpus": free_gpus, "running": running}
        if refusing:
            body["refusing"] = refusing
        return self.request("POST", f"{ep.POLL}?wait={wait:g}", json=body, timeout=wait + 15).json()

    def set_state(self, task_id: int, state: str, **fields) -> dict:
        body = {"state": str(getattr(state, "value", state)), **{k: v for k, v in fields.items() if v is not None}}
        return self.request("POST", ep.path(ep.TASK_STATE, task_id=task_id), json=body).json()

    def release(self, task_id: int) -> dict:
        """Hand back a task this agent was given but will not run (it is draining): the server
        returns it to `queued`. Answer: `{id, state, progress, stop_requested}`."""
        return self.request("POST", ep.path(ep.TASK_RELEASE, task_id=task_id)).json()

    def send_logs(self, task_id: int, first_seq: int, lines: list[dict], gzip_body: bytes | None = None) -> int:
        """Ship lines first_seq.. ; returns the server's `acked` (highest contiguous seq stored)."""
        path = ep.path(ep.TASK_LOGS, task_id=task_id)
        if gzip_body is not None:
            r = self.request(
                "POST", path, data=gzip_body, headers={"content-type": "application/json", "content-encoding": "gzip"}
            )
        else:
            r = self.request("POST", path, json={"first_seq": first_seq, "lines": lines})
        return int(r.json()["acked"])

    def telemetry(self, sample: dict) -> None:
        self.request("POST", ep.TELEMETRY, json=sample, timeout=10)

    def post_results(self, task_id: int, kind: str, name: str, files: list[dict], **extra) -> dict:
        """`extra`: more fields of the body (a project's `meta`, a model's `checkpoint`).

        A server busy with this node's other checks (429 `too_many_checks`: one project check per
        node at a time) or with other large bodies (503 `server_busy`) is asked again, with
        backoff, for up to RESULTS_BUSY_WAIT_S: two tasks of one node that finish together both
        get their results in."""
        body = {"kind": kind, "name": name, "files": files, **{k: v for k, v in extra.items() if v is not None}}
        deadline = time.monotonic() + RESULTS_BUSY_WAIT_S
        attempt = 0
        while True:
            try:
                return self.request("POST", ep.path(ep.TASK_RESULTS, task_id=task_id), json=body).json()
            except APIError as e:
                wait = min(30.0, 2.0 * 2**attempt) * (0.5 + random.random() / 2)
                if e.code not in BUSY_CODES or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
                attempt += 1

    # --- blobs ---
    def blob_exists(self, sha256: str) -> bool:
        r = self.request("HEAD", ep.path(ep.AGENT_BLOB, sha256=sha256), expect=(200, 404))
        return r.status_code == 200

    def put_blob(self, sha256: str, path) -> None:
        """Upload the file at `path` (or an open binary file, from its start) as blob `sha256`
        (the server checks the hash, keeps nothing on mismatch)."""
        if not isinstance(path, (str, Path)):
            path.seek(0)
            self._put_blob(sha256, path)
            return
        with open(path, "rb") as f:
            self._put_blob(sha256, f)

    def _put_blob(self, sha256: str, f) -> None:
        self.request(
            "PUT",
            ep.path(ep.AGENT_BLOB, sha256=sha256),
            data=f,
            timeout=max(self.timeout, 600),
            headers={"content-type": "application/octet-stream"},
            expect=(200, 201, 204),
        )

    def get_blob(
        self, sha256: str, dest: str | Path, *, size: int | None = None, on_bytes=None, timeout: float = 60
    ) -> str:
        """Stream blob `sha256` into the file `dest` and return the sha256 of the whole file.

        What `dest` already holds is kept and the rest is asked for with a Range request (a
        server that answers 200 instead rewrites the file). `size`: the blob's size, when known;
        a `dest` that long already is not fetched again. `on_bytes(n)` is called for every chunk
        received. Raises APIError: status None when the connection failed (mid-stream too; the
        bytes received so far stay in `dest` for the next try), 416 when the range cannot be served.
        """
        dest = Path(dest)
        path = ep.path(ep.AGENT_BLOB, sha256=sha256)
        h = hashlib.sha256()
        have = dest.stat().st_size if dest.exists() else 0
        if have:
            with open(dest, "rb") as f:  # what an interrupted try left: hash it, then resume
                while b := f.read(BLOB_CHUNK):
                    h.update(b)
            if size is not None and have >= size:
                return h.hexdigest()  # complete (or too long: the caller starts over)
        headers = {"Range": f"bytes={have}-"} if have else {}
        r = self.request("GET", path, headers=headers, stream=True, timeout=timeout, expect=(200, 206))
        try:
            with r:
                if r.status_code == 200 and have:
                    h = hashlib.sha256()  # the server sent it all again
                with open(dest, "ab" if r.status_code == 206 else "wb") as f:
                    for chunk in r.iter_content(BLOB_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
        except requests.RequestException as e:
            raise _no_answer("GET", path, e) from None
        return h.hexdigest()

    # --- many blobs at once (protocol/bulk.py) ---
    def check_blobs(self, hashes: Iterable[str]) -> set[str]:
        """The sha256s of `hashes` this node cannot read from the server (not stored, or not its
        to read), asked MAX_COUNT at a time."""
        hashes = list(dict.fromkeys(hashes))
        missing: set[str] = set()
        for i in range(0, len(hashes), bulk.MAX_COUNT):
            body = {"sha256": hashes[i : i + bulk.MAX_COUNT]}
            missing.update(self.request("POST", ep.AGENT_BLOBS_CHECK, json=body).json()["missing"])
        return missing

    @contextlib.contextmanager
    def download_blobs(self, hashes: list[str], timeout: float = BULK_TIMEOUT_S) -> Iterator[BulkDownload]:
        """One bulk download (at most MAX_COUNT blobs and MAX_BYTES): a `BulkDownload` whose
        `entries` yields (sha256, size, chunks) as protocol.bulk.iter_entries does, streamed from
        the connection. The blobs the server left out are simply not among them (`left_out`
        counts them). A connection lost mid-stream raises APIError (status None); a stream cut
        short or malformed, bulk.BadBatch."""
        r = self.request("POST", ep.AGENT_BLOBS_DOWNLOAD, json={"sha256": list(hashes)}, stream=True, timeout=timeout)
        with r:
            try:
                left_out = int(r.headers.get(bulk.BULK_MISSING_HEADER) or 0)
            except ValueError:
                left_out = 0
            body = cast(IO[bytes], _RawBody(r.raw, ep.AGENT_BLOBS_DOWNLOAD))
            yield BulkDownload(bulk.iter_entries(body), left_out)

    def upload_blobs(
        self, files: Iterable[tuple[str, str | Path | IO[bytes]]], timeout: float = BULK_TIMEOUT_S
    ) -> list[dict]:
        """Upload (sha256, file) pairs in one bulk request (at most MAX_COUNT, MAX_BYTES); a file is
        a path or an open binary file (read from its start). The files are read while the body
        streams, never held whole. Returns the server's answer per entry, in order: {sha256, size,
        created} or {sha256, error, detail} (hash_mismatch: a file that changed since it was hashed)."""
        entries = []
        for sha, f in files:
            size = os.stat(f).st_size if isinstance(f, (str, Path)) else os.fstat(f.fileno()).st_size
            entries.append((sha, size, f))
        r = self.request(
            "POST",
            ep.AGENT_BLOBS_UPLOAD,
            data=_TarBody(entries),
            timeout=timeout,
            headers={"content-type": bulk.CONTENT_TYPE},
        )
        return list(r.json()["blobs"])

    def project_items(
        self, task_id: int, cursor: str | None = None, limit: int = PAGE_ITEMS
    ) -> tuple[list[dict], str | None]:
        """One page of the items of a task's project ({id, dataset, name, sha256, size, ann}, in
        order) and the cursor of the next page (None after the last)."""
        params: dict = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        # orjson: a page of 5,000 items with their annotations in 27 ms, against 35 ms for json.loads
        body = orjson.loads(self.request("GET", ep.path(ep.TASK_PROJECT_ITEMS, task_id=task_id), params=params).content)
        return list(body["items"]), body.get("next")


class BulkDownload:
    """What `AgentAPI.download_blobs` yields: the stream's entries and how many were left out."""

    __slots__ = ("entries", "left_out")

    def __init__(self, entries: Iterator[tuple[str, int, Iterator[bytes]]], left_out: int):
        self.entries, self.left_out = entries, left_out


class _RawBody:
    """A response's body as a file for bulk.iter_entries; a lost connection becomes an APIError
    (status None) whose message holds no URL."""

    def __init__(self, raw, path: str):
        self.raw, self.path = raw, path

    def read(self, n: int = -1) -> bytes:
        try:
            return self.raw.read(n, decode_content=True)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise _no_answer("POST", self.path, e) from None


class _TarBody:
    """The body of a bulk upload: header, bytes and padding per file, then the end blocks.

    Its length is known up front (sent as content-length), and each iteration starts over from
    the first file, so a try that urllib3 repeats sends the whole stream again. A file that
    changed size since it was listed is cut or padded to the listed size: the server then finds
    its hash wrong and keeps nothing of it (hash_mismatch); the stream stays well-formed."""

    def __init__(self, files: list[tuple[str, int, str | Path | IO[bytes]]]):
        self.files = files
        self.length = sum(bulk.BLOCK + size + (-size % bulk.BLOCK) for _, size, _ in files) + len(bulk.TAR_END)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        for sha, size, source in self.files:
            yield bulk.header(sha, size)
            if isinstance(source, (str, Path)):
                with open(source, "rb") as f:
                    yield from _exactly(f, size)
            else:
                source.seek(0)
                yield from _exactly(source, size)
            yield bulk.padding(size)
        yield bulk.TAR_END


def _exactly(f: IO[bytes], size: int) -> Iterator[bytes]:
    """`size` bytes of `f` from where it is: cut there, or padded with zeros when it is shorter."""
    left = size
    while left and (b := f.read(min(BLOB_CHUNK, left))):
        left -= len(b)
        yield b
    if left:
        yield b"\0" * left
