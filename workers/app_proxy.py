"""The API forwarder of an `app` task: the App's only way to the server (docs/workers.md "App tasks").

It runs in the task process and listens on a Unix socket, `tasks/<id>/api/api.sock`, in a folder
that holds nothing else and that only the task's sidecar container gets (the sidecar relays its
loopback TCP port to this socket; the App shares the sidecar's network namespace). Per request:

- only `GET`/`POST` of a path under `/public/api/v3/` (no dot segments, no backslash): else 405/404;
- only with `x-api-key` equal to the task's local token (constant-time compare): else 403. The
  local token is all the App ever holds; it is worth nothing outside this socket;
- the local token is replaced by the real App token (the poll answer's `api_token`) and the
  request goes to the agent's own SERVER_ADDRESS through a `requests` session that trusts the
  environment as the agent's own does (proxies, `REQUESTS_CA_BUNDLE`);
- request and answer bodies stream through in 64 KiB pieces (an image or a file may be hundreds
  of MB), `Content-Length` or chunked either way;
- the request head is bounded (line 8 KiB, 64 headers, 32 KiB in all: else 431), at most
  MAX_CONNECTIONS connections are served (more wait in the listen backlog) and at most
  MAX_REQUESTS requests are forwarded at once (more wait for a slot).

Refusals are JSON in the SDK's error shape (`{"error", "code", "details"}`) and close the
connection. Neither token is ever logged or put into an error.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import string
import threading
from pathlib import Path
from urllib.parse import unquote

import requests
from requests.adapters import HTTPAdapter

PREFIX = "/public/api/v3/"
API_KEY = "x-api-key"
TOKEN_LEN = 128  # the SDK refuses an API_TOKEN of another length
TOKEN_ALPHABET = string.ascii_letters + string.digits
CHUNK = 64 * 1024
MAX_LINE = 8 * 1024  # request line, one header line, one chunk-size line
MAX_HEADERS = 64
MAX_HEAD = 32 * 1024  # the request line and every header together
MAX_TARGET = 4096
MAX_TRAILER = 8 * 1024  # trailers of a chunked request body (read and dropped)
MAX_CONNECTIONS = 128
MAX_REQUESTS = 16
IDLE_S = 15.0  # a kept-alive connection with no new request for this long is closed
IO_S = 300.0  # the longest silence of the App while it sends a request
LINGER_S, LINGER_BYTES = 2.0, 1 << 20  # a refused request's body is read and dropped, this much at most
CONNECT_S, READ_S = 10.0, 600.0  # to the server: connect, and the longest silence of its answer
METHODS = ("GET", "POST")
NO_BODY = (204, 304)  # answers without a body, so without framing
# Hop-by-hop headers (RFC 9110 7.6.1) and those this forwarder sets itself.
HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
        "content-length",
        API_KEY,
    }
)
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 502: "Bad Gateway"}


class Refused(Exception):
    """A request answered here, not forwarded: status, code, sentence."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class ClientGone(Exception):
    """The App closed its connection, or went silent, while sending a request body."""


def new_token() -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(TOKEN_LEN))


def local_token(path: Path) -> str:
    """The task's local token, kept in `path` (mode 0600, beside the task's other agent-only files):
    a task process that re-adopts the task after an agent restart serves the same one, which the
    running App already holds."""
    try:
        token = path.read_text().strip()
        if len(token) == TOKEN_LEN and token.isascii() and token.isalnum():
            return token
    except OSError:
        pass
    token = new_token()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)
    return token


class ApiForwarder:
    """Serves `sock_path` in a thread per connection until `close()`. Built and started in the task
    process (it holds a requests.Session and threads)."""

    def __init__(self, sock_path: Path, server_address: str, local: str, real: str):
        self.sock_path = Path(sock_path)
        self.base = server_address.rstrip("/")
        self._local = local.encode("latin-1")
        self._real = real
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._conn_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._request_slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._closed = threading.Event()
        self.forwarded = 0
        self.refused = 0
        self.session: requests.Session | None = None

    def start(self) -> ApiForwarder:
        """Bind the socket (a stale one from an earlier task process is replaced) and accept."""
        s = requests.Session()
        s.headers.clear()  # the App's own headers go as they are: no Accept-Encoding of ours
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=MAX_REQUESTS, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        self.session = s
        self.sock_path.parent.mkdir(parents=True, exist_ok=True)
        self.sock_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _bind(listener, self.sock_path)
        # The sidecar may run as another user than the agent (TASK_USER, the image's user).
        os.chmod(self.sock_path, 0o666)
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="api-forwarder", daemon=True).start()
        return self

    def close(self) -> None:
        """Stop accepting, end every open connection, remove the socket. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.sock_path.unlink(missing_ok=True)
        except OSError:
            pass
        if self.session is not None:
            self.session.close()

    # --- connections ---
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            self._conn_slots.acquire()  # past MAX_CONNECTIONS, new ones wait in the backlog
            try:
                conn, _ = self._listener.accept()
            except OSError:
                self._conn_slots.release()
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            rfile = conn.makefile("rb", buffering=CHUNK)
            while not self._closed.is_set():
                conn.settimeout(IDLE_S)
                try:
                    head = read_head(rfile)
                except Refused as e:
                    self._count("refused")
                    _send_error(conn, e)
                    _linger(conn)
                    return
                if head is None:
                    return
                conn.settimeout(IO_S)
                if not self._handle(conn, rfile, *head):
                    _linger(conn)
                    return
        except Exception:  # noqa: BLE001 - the App gone, or the server's answer cut short: the connection ends
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            finally:
                self._conn_slots.release()

    def _handle(self, conn, rfile, method: str, target: str, version: str, headers: list) -> bool:
        """One request; True: the connection may carry another."""
        try:
            check_request(method, target)
            self._check_token(headers)
            body = request_body(rfile, headers)
        except Refused as e:
            self._count("refused")
            _send_error(conn, e)
            return False
        if any(n == "expect" and v.lower() == "100-continue" for n, v in headers):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        out = [(n, v) for n, v in headers if n not in HOP] + [(API_KEY, self._real)]
        with self._request_slots:
            try:
                r = self.session.request(
                    method,
                    self.base + target,
                    data=body,
                    headers=dict(_join(out)),
                    stream=True,
                    allow_redirects=False,
                    timeout=(CONNECT_S, READ_S),
                )
            except ClientGone:
                return False
            except requests.RequestException as e:
                self._count("refused")
                _send_error(conn, Refused(502, "server_unreachable", f"the server did not answer ({type(e).__name__})"))
                return False
            self._count("forwarded")
            try:
                keep = self._answer(conn, r, version, headers)
            finally:
                r.close()
        return keep and (body is None or body.done)

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def _check_token(self, headers: list) -> None:
        given = [v for n, v in headers if n == API_KEY]
        if len(given) != 1 or not hmac.compare_digest(given[0].encode("latin-1"), self._local):
            raise Refused(403, "forbidden", "x-api-key must hold this task's API_TOKEN")

    def _answer(self, conn, r, version: str, req_headers: list) -> bool:
        """Stream the server's answer to the App; True when the connection stays usable."""
        raw = r.raw
        upstream = [(n.lower(), v) for n, v in raw.headers.items()]
        length = next((v for n, v in upstream if n == "content-length"), None)
        chunked = any(n == "transfer-encoding" for n, _ in upstream) or length is None
        close = version != "HTTP/1.1" or any(n == "connection" and "close" in v.lower() for n, v in req_headers)
        lines = [f"HTTP/1.1 {r.status_code} {raw.reason or 'OK'}"]
        lines += [f"{n}: {v}" for n, v in upstream if n not in HOP]
        if r.status_code in NO_BODY:
            chunked = False
            length = None
        elif chunked and close:
            pass  # the end of the connection ends the body (HTTP/1.0 style)
        elif chunked:
            lines.append("transfer-encoding: chunked")
        elif length is not None:
            lines.append(f"content-length: {length}")
        if close:
            lines.append("connection: close")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        for piece in raw.stream(CHUNK, decode_content=False):
            if not piece:
                continue
            if chunked and not close:
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                conn.sendall(piece)
        if chunked and not close:
            conn.sendall(b"0\r\n\r\n")
        return not close


def _join(headers: list) -> list:
    """Repeated request headers joined with ", " (requests takes a dict)."""
    out: dict[str, str] = {}
    for n, v in headers:
        out[n] = f"{out[n]}, {v}" if n in out else v
    return list(out.items())


def _bind(sock: socket.socket, path: Path) -> None:
    """bind() to `path`; a path longer than sun_path allows (108 bytes) is reached through the
    folder's descriptor in /proc/self/fd (deep temporary folders in tests, a long AGENT_DIR)."""
    if len(os.fsencode(path)) < 100:
        sock.bind(os.fspath(path))
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def _linger(conn: socket.socket) -> None:
    """Close our half, then read and drop what the App still sends (up to LINGER_BYTES, for up to
    LINGER_S): closing with its request body unread would reset the connection, and the App
    would see a broken pipe instead of our answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(LINGER_S)
        left = LINGER_BYTES
        while left > 0:
            piece = conn.recv(min(left, CHUNK))
            if not piece:
                return
            left -= len(piece)
    except OSError:
        pass


def _send_error(conn: socket.socket, e: Refused) -> None:
    body = json.dumps({"error": e.detail, "code": e.code, "details": {}}).encode()
    head = (
        f"HTTP/1.1 {e.status} {_REASONS.get(e.status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    try:
        conn.sendall(head.encode() + body)
    except OSError:
        pass


# --- the request, read from the App ---
def _line(rfile, what: str) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise Refused(431, "header_too_large", f"{what} is longer than {MAX_LINE} bytes")
    return line


def read_head(rfile):
    """(method, target, version, [(lower-case name, value)]) of the next request, or None at the
    end of the connection. Bounded: a line of MAX_LINE, MAX_HEADERS headers, MAX_HEAD in all."""
    line = _line(rfile, "the request line")
    if not line:
        return None
    if line in (b"\r\n", b"\n"):  # one empty line before a request is allowed (RFC 9112 2.2)
        line = _line(rfile, "the request line")
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise Refused(400, "bad_request", "the request line must be: METHOD TARGET HTTP/1.1")
    method, target, version = (p.decode("latin-1") for p in parts)
    total = len(line)
    headers: list[tuple[str, str]] = []
    while True:
        line = _line(rfile, "a header line")
        total += len(line)
        if total > MAX_HEAD:
            raise Refused(431, "header_too_large", f"the request head is longer than {MAX_HEAD} bytes")
        if line in (b"\r\n", b"\n"):
            return method, target, version, headers
        if not line.endswith(b"\n"):
            raise ClientGone()
        if len(headers) >= MAX_HEADERS:
            raise Refused(431, "header_too_large", f"more than {MAX_HEADERS} headers")
        name, sep, value = line.decode("latin-1").rstrip("\r\n").partition(":")
        if not sep or not name or not set(name) <= _TCHAR:
            raise Refused(400, "bad_request", "a header line is not `name: value`")
        headers.append((name.lower(), value.strip(" \t")))


def check_request(method: str, target: str) -> None:
    """Only GET/POST of /public/api/v3/<method>, with no dot segment or backslash."""
    if method not in METHODS:
        raise Refused(405, "method_not_allowed", "only GET and POST are forwarded")
    path = target.split("?", 1)[0]
    if (
        len(target) > MAX_TARGET
        or not path.startswith(PREFIX)
        or "#" in target
        or not target.isprintable()
        or not target.isascii()
    ):
        raise Refused(404, "not_forwarded", f"only {PREFIX}<method> is forwarded to the server")
    decoded = unquote(path)
    if "\\" in decoded or "\0" in decoded or any(seg in (".", "..") for seg in decoded.split("/")):
        raise Refused(404, "not_forwarded", f"only {PREFIX}<method> is forwarded to the server")


def request_body(rfile, headers: list):
    """The request's body as a stream for requests: a `LengthBody`, a `ChunkedBody`, or None."""
    te = [v.lower() for n, v in headers if n == "transfer-encoding"]
    cl = {v for n, v in headers if n == "content-length"}
    if te:
        if cl:
            raise Refused(400, "bad_request", "a request may not have both Content-Length and Transfer-Encoding")
        if te != ["chunked"]:
            raise Refused(400, "bad_request", "Transfer-Encoding other than chunked is not accepted")
        return ChunkedBody(rfile)
    if not cl:
        return None
    if len(cl) != 1:
        raise Refused(400, "bad_request", "Content-Length is given twice, differently")
    value = cl.pop()
    if not value.isdigit() or len(value) > 18:
        raise Refused(400, "bad_request", "Content-Length must be a number of bytes")
    return LengthBody(rfile, int(value)) if int(value) else None


class LengthBody:
    """`n` bytes of the App's request, read as requests/urllib3 send them (`__len__` makes requests
    send Content-Length; `read` streams)."""

    def __init__(self, rfile, n: int):
        self.rfile, self.left, self.n = rfile, n, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        while True:
            piece = self.read(CHUNK)
            if not piece:
                return
            yield piece

    @property
    def done(self) -> bool:
        return self.left == 0

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        want = self.left if size is None or size < 0 else min(size, self.left)
        want = min(want, CHUNK)
        try:
            piece = self.rfile.read1(want)
        except OSError:
            raise ClientGone() from None
        if not piece:
            raise ClientGone()
        self.left -= len(piece)
        return piece


class ChunkedBody:
    """A chunked request body, undone here and sent on chunked again (a generator for requests)."""

    def __init__(self, rfile):
        self.rfile = rfile
        self.done = False

    def __iter__(self):
        try:
            while True:
                line = _line(self.rfile, "a chunk-size line")
                size_text = line.split(b";", 1)[0].strip()
                if not line.endswith(b"\n") or not size_text or len(size_text) > 15:
                    raise ClientGone()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ClientGone() from None
                if size == 0:
                    break
                while size:
                    piece = self.rfile.read1(min(size, CHUNK))
                    if not piece:
                        raise ClientGone()
                    size -= len(piece)
                    yield piece
                if self.rfile.read(2) not in (b"\r\n",):
                    raise ClientGone()
            trailer = 0
            while True:  # trailers: read and dropped
                line = _line(self.rfile, "a trailer line")
                trailer += len(line)
                if not line.endswith(b"\n") or trailer > MAX_TRAILER:
                    raise ClientGone()
                if line in (b"\r\n", b"\n"):
                    break
        except (OSError, Refused):
            raise ClientGone() from None
        self.done = True
