"""`app` tasks: the API forwarder in process (workers/app_proxy.py), the App's environment
(workers/app.py), and one App through the real agent, the real Engine and the real SDK image."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import socket
import threading
import time
import tracemalloc

import pytest
import requests

from node.config import Config
from tests.support.images import build_image
from tests.support.procs import poll_for
from tests.support.server import IN_THREAD
from workers import app as app_worker
from workers.app_proxy import MAX_LINE, ApiForwarder, local_token, new_token
from workers.container_spec import LABEL_ROLE, LABEL_TASK, create_kwargs
from workers.errors import TaskError

MB = 1 << 20


# --- helpers: a Unix-socket HTTP client and a recording upstream ---
def unix_connect(path, timeout=30.0) -> socket.socket:
    """A connection to the socket at `path`, reached through its folder's fd when the path is
    longer than sun_path allows (as the forwarder binds it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        s.connect(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
    finally:
        os.close(fd)
    return s


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self):
        self.sock = unix_connect(self.unix_path, self.timeout)


def request(path, method, target, token=None, body=None, headers=None, chunked=False):
    """(status, parsed JSON or bytes) of one request through the forwarder's socket."""
    c = UnixHTTPConnection(path)
    h = dict(headers or {})
    if token is not None:
        h["x-api-key"] = token
    c.request(method, target, body=body, headers=h, encode_chunked=chunked)
    r = c.getresponse()
    data = r.read()
    c.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


class Upstream(http.server.ThreadingHTTPServer):
    """A stand-in server: records each request's path and headers, hashes its body as it streams
    (never holding it), and answers `GET /public/api/v3/big?n=N` with N bytes, streamed."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[dict] = []
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _body(self):
        h, total = hashlib.sha256(), 0
        if self.headers.get("transfer-encoding") == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                while size:
                    d = self.rfile.read(min(size, 65536))
                    size -= len(d)
                    total += len(d)
                    h.update(d)
                self.rfile.readline()
        else:
            n = int(self.headers.get("content-length") or 0)
            while n:
                d = self.rfile.read(min(n, 65536))
                n -= len(d)
                total += len(d)
                h.update(d)
        return total, h.hexdigest()

    def do_POST(self):
        total, digest = self._body()
        self.server.seen.append({"path": self.path, "headers": dict(self.headers.items()), "size": total})
        out = json.dumps({"size": total, "sha256": digest}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        self.server.seen.append({"path": self.path, "headers": dict(self.headers.items()), "size": 0})
        n = int(self.path.split("n=")[1]) if "n=" in self.path else 0
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(n))
        self.end_headers()
        piece = b"z" * 65536
        while n:
            k = min(n, len(piece))
            self.wfile.write(piece[:k])
            n -= k


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.shutdown()
    u.server_close()


@pytest.fixture
def forwarder(tmp_path, upstream):
    """A forwarder to the stand-in server, on a socket whose path is longer than sun_path allows."""
    folder = tmp_path / ("deep" * 30) / "api"
    folder.mkdir(parents=True)
    local, real = new_token(), new_token()
    f = ApiForwarder(folder / "api.sock", upstream.url, local, real).start()
    f.local, f.real = local, real
    yield f
    f.close()


class Stream:
    """`n` bytes made as they are read (a 200 MB body that is never in memory)."""

    def __init__(self, n: int):
        self.left = n
        self.piece = bytes(range(256)) * 256

    def read(self, size=-1):
        k = min(self.left, len(self.piece) if size is None or size < 0 else min(size, len(self.piece)))
        self.left -= k
        return self.piece[:k]

    def __iter__(self):
        while self.left:
            yield self.read(65536)


def stream_sha(n: int) -> str:
    h, s = hashlib.sha256(), Stream(n)
    for piece in s:
        h.update(piece)
    return h.hexdigest()


# --- the forwarder ---
def test_only_the_public_api_is_forwarded(forwarder, upstream):
    sock, tok = forwarder.sock_path, forwarder.local
    for target in (
        "/api/v1/tasks",
        "/public/api/v3/../../api/v1/agents",
        "/public/api/v3/%2e%2e/%2e%2e/api/v1/agents",
        "/public/api/v3/a/./b",
        "/public/api/v3/a\\b",
        "http://example.com/public/api/v3/projects.info",
        "/public/api/v2/projects.info",
    ):
        status, body = request(sock, "POST", target, tok, body=b"{}")
        assert status == 404 and body["code"] == "not_forwarded", (target, status, body)
    status, body = request(sock, "PUT", "/public/api/v3/projects.info", tok, body=b"{}")
    assert status == 405 and "GET and POST" in body["error"]
    assert upstream.seen == []
    status, body = request(sock, "GET", "/public/api/v3/projects.info?id=1", tok)
    assert status == 200 and upstream.seen[-1]["path"] == "/public/api/v3/projects.info?id=1"


def test_the_local_token_is_required_and_replaced_by_the_real_one(forwarder, upstream):
    sock = forwarder.sock_path
    for token, extra in ((None, {}), ("x" * 128, {}), (forwarder.local[:-1], {}), (forwarder.real, {})):
        status, body = request(sock, "POST", "/public/api/v3/projects.info", token, b"{}", extra)
        assert status == 403 and body == {
            "error": "x-api-key must hold this task's API_TOKEN",
            "code": "forbidden",
            "details": {},
        }
    assert upstream.seen == []
    status, body = request(
        sock, "POST", "/public/api/v3/images.upload", forwarder.local, b'{"a": 1}', {"x-custom": "kept"}
    )
    assert status == 200 and body["size"] == 8
    (seen,) = upstream.seen
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-api-key"] == forwarder.real and headers["x-custom"] == "kept"
    assert forwarder.local not in json.dumps(seen)
    assert forwarder.forwarded == 1 and forwarder.refused == 4


def test_the_real_token_reaches_the_real_server(tmp_path, node, server):
    task = node.lease(type="app", image="sly-test/app:1")
    local = local_token(tmp_path / "api_token")
    assert local_token(tmp_path / "api_token") == local and (tmp_path / "api_token").stat().st_mode & 0o777 == 0o600
    f = ApiForwarder(tmp_path / "api" / "api.sock", server.url, local, task["api_token"]).start()
    try:
        status, body = request(f.sock_path, "POST", "/public/api/v3/no.such.method", local, b"{}")
        assert status == 404 and body["code"] == "method_not_supported", body  # past the server's token check
        direct = requests.post(f"{server.url}/public/api/v3/no.such.method", headers={"x-api-key": local}, json={})
        assert direct.status_code == 401  # the local token is worth nothing at the server
        node.api.set_state(task["id"], "running")
        node.api.set_state(task["id"], "finished", exit_code=0)
        status, body = request(f.sock_path, "POST", "/public/api/v3/no.such.method", local, b"{}")
        assert status == 401  # the App token died with its task; the forwarder passes the answer on
    finally:
        f.close()
    assert not f.sock_path.exists()


@pytest.mark.slow
def test_200_mb_each_way_streams_in_bounded_memory(forwarder, upstream):
    sock, tok = forwarder.sock_path, forwarder.local
    n = 200 * MB
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        status, body = request(sock, "POST", "/public/api/v3/files.upload", tok, Stream(n), {"content-length": str(n)})
        up_s = time.monotonic() - t0
        assert status == 200 and body == {"size": n, "sha256": stream_sha(n)}
        status, body = request(sock, "POST", "/public/api/v3/files.upload", tok, iter(Stream(n)), chunked=True)
        assert status == 200 and body == {"size": n, "sha256": stream_sha(n)}
        c = UnixHTTPConnection(sock)
        t0 = time.monotonic()
        c.request("GET", f"/public/api/v3/big?n={n}", headers={"x-api-key": tok})
        r = c.getresponse()
        got = 0
        while piece := r.read(MB):
            got += len(piece)
        down_s = time.monotonic() - t0
        c.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == n
    # Client, forwarder and stand-in server together, all in this process: a few 64 KiB pieces.
    assert peak < 16 * MB, f"peak {peak / MB:.1f} MB"
    print(f"through the forwarder: up {n / MB / up_s:.0f} MB/s, down {n / MB / down_s:.0f} MB/s (tracemalloc on)")


def raw_exchange(path, data: bytes, read_timeout=10.0) -> bytes:
    s = unix_connect(str(path), read_timeout)
    try:
        s.sendall(data)
    except OSError:
        pass  # the forwarder may close before taking everything
    out = b""
    try:
        while piece := s.recv(65536):
            out += piece
    except OSError:
        pass
    s.close()
    return out


def test_header_bombs_are_bounded(forwarder, upstream):
    sock, tok = forwarder.sock_path, forwarder.local
    req = f"POST /public/api/v3/x HTTP/1.1\r\nx-api-key: {tok}\r\n"
    for bomb in (
        req + "x-long: " + "a" * (MAX_LINE + 10) + "\r\n\r\n",  # one long line
        req + "".join(f"x-h{i}: v\r\n" for i in range(100)) + "\r\n",  # too many headers
        req + "".join(f"x-h{i}: {'b' * 1000}\r\n" for i in range(40)) + "\r\n",  # too many bytes in all
        "GET /" + "c" * (4 * MB),  # a request line that never ends
    ):
        t0 = time.monotonic()
        answer = raw_exchange(sock, bomb.encode())
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b'"code": "header_too_large"' in answer and time.monotonic() - t0 < 5
    answer = raw_exchange(sock, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    answer = raw_exchange(sock, (req + "content-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc").encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and b"both" in answer  # no request smuggling
    assert upstream.seen == []


def test_keep_alive_expect_continue_and_chunked_answers(forwarder, upstream):
    c = UnixHTTPConnection(forwarder.sock_path)
    for i in range(3):  # one connection, three requests
        c.request("POST", "/public/api/v3/m", body=b"x" * i, headers={"x-api-key": forwarder.local})
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["size"] == i
    c.close()
    answer = raw_exchange(
        forwarder.sock_path,
        f"POST /public/api/v3/m HTTP/1.1\r\nx-api-key: {forwarder.local}\r\ncontent-length: 2\r\n"
        "expect: 100-continue\r\nconnection: close\r\n\r\nhi".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ") and b'"size": 2' in answer


# --- the App's environment and containers (no Engine) ---
class EnvCtx:
    """Just what app_env() and create_kwargs() read of a TaskContext."""

    def __init__(self, tmp_path, task, **cfg):
        self.task = task
        self.gpus = []
        self.config = Config(
            server_address="http://127.0.0.1:1",
            access_token="n" * 32,
            host_dir=str(tmp_path),
            agent_dir=str(tmp_path),
            **cfg,
        )
        self.lines = []

    task_id = property(lambda self: int(self.task["id"]))
    task_dir = property(lambda self: self.config.task_dir(self.task_id))

    def log(self, message, level="info", **kw):
        self.lines.append((level, message))


def test_the_app_environment_is_the_real_agents(tmp_path):
    config = {
        "slyProjectId": 7,
        "nested": {"a": 1, "b": [1, "x"], "c": {"d": None}, "e": {}},
        "flag": True,
        "name": "hello world",
        "bad=key": 1,
    }
    task = {"id": 42, "type": "app", "image": "i", "config": config, "team_id": 1, "workspace_id": 1, "dataset_id": 9}
    ctx = EnvCtx(tmp_path, task, proxy_env={"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "corp"})
    env = app_worker.app_env(ctx, "L" * 128)
    assert env["SERVER_ADDRESS"] == "http://127.0.0.1:8787" and env["API_TOKEN"] == "L" * 128
    assert (env["TASK_ID"], env["TEAM_ID"], env["WORKSPACE_ID"], env["DATASET_ID"]) == ("42", "1", "1", "9")
    assert env["PROJECT_ID"] == env["context.projectId"] == "7"  # from the dialog's slyProjectId, as the agent does
    assert json.loads(env["CONTEXT"]) == {"teamId": 1, "workspaceId": 1, "taskId": 42, "datasetId": 9}
    assert json.loads(env["MODAL_STATE"]) == config
    assert env["modal.state.nested.a"] == env["MODAL_STATE_NESTED_A"] == "1"
    assert env["modal.state.nested.b"] == "[1, 'x']" and env["modal.state.flag"] == "True"
    assert env["modal.state.name"] == "hello world" and env["CONTEXT_TEAMID"] == env["context.teamId"] == "1"
    assert "modal.state.nested.c.d" not in env and not any(k.startswith("modal.state.nested.e") for k in env)
    assert not any("bad=key" in k for k in env) and "bad=key" in ctx.lines[0][1]
    assert env["NO_PROXY"] == env["no_proxy"] == "corp,127.0.0.1,localhost"
    assert env["ENV"] == "production" and env["SLY_APP_DATA_DIR"] == "/sly_task_data/tmp"
    assert not any("n" * 32 in v for v in env.values()) and "AGENT_TOKEN" not in env
    task["config"] = {"huge": "x" * (200 * 1024)}
    with pytest.raises(TaskError, match="at most 131,071"):
        app_worker.app_env(ctx, "L" * 128)


def test_the_sidecar_and_the_app_container_kwargs(tmp_path):
    ctx = EnvCtx(tmp_path, {"id": 5, "type": "app", "image": "img:1"}, task_user="1000:1000")
    ctx.task_dir.mkdir(parents=True)
    (ctx.task_dir / app_worker.API_DIR).mkdir()
    side = app_worker.sidecar_kwargs(ctx)
    assert side["labels"][LABEL_ROLE] == "api-relay" and side["labels"][LABEL_TASK] == "5"
    assert side["image"] == "img:1" and side["entrypoint"][0] == "python3" and side["cap_drop"] == ["ALL"]
    assert side["read_only"] and side["user"] == "1000:1000" and side["network_mode"] == "bridge"
    assert {m["Target"]: m["ReadOnly"] for m in side["mounts"]} == {"/sly-api": True, "/sly-relay.py": True}
    assert (ctx.task_dir / app_worker.RELAY_FILE).stat().st_mode & 0o777 == 0o444
    kw = create_kwargs(ctx, None, {"environment": {"API_TOKEN": "t"}, "network_mode": "container:abc"})
    assert kw["network_mode"] == "container:abc" and kw["environment"]["API_TOKEN"] == "t"
    assert kw["environment"]["TASK_TYPE"] == "app" and LABEL_ROLE not in kw["labels"]


# --- through the real agent, Engine and SDK ---
APP_SCRIPT = r"""
import json, os, socket, sys
import requests
import supervisely as sly

env = dict(os.environ)
print("ENV " + json.dumps(env), flush=True)
api = sly.Api.from_env()  # the SDK accepts the address and the token's form
r = requests.post(api.server_address + "/public/api/v3/no.such.method", headers={"x-api-key": api.token}, json={})
print("CALL " + json.dumps({"status": r.status_code, "body": r.json()}), flush=True)
progress = sly.Progress("steps", 3)
for _ in range(3):
    progress.iter_done_report()

def reach(host, port):
    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as e:
        return type(e).__name__

gateway = None
for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    if f[1] == "00000000":
        gateway = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
port = int(os.environ["modal.state.serverPort"])
print("REACH " + json.dumps({"loopback": reach("127.0.0.1", port), "gateway": gateway and reach(gateway, port)}))
"""


# Calls the server every 0.2 s for `modal.state.seconds`; exits 0 when its last call got through.
LOOP_SCRIPT = r"""
import os, time
import requests

address, token = os.environ["SERVER_ADDRESS"], os.environ["API_TOKEN"]
end = time.time() + float(os.environ["modal.state.seconds"])
status = None
while time.time() < end:
    try:
        r = requests.post(address + "/public/api/v3/no.such.method", headers={"x-api-key": token}, timeout=5)
        status = r.status_code
    except requests.RequestException as e:
        status = type(e).__name__
    print(f"CALL {status}", flush=True)
    time.sleep(0.2)
raise SystemExit(0 if status == 404 else 1)
"""


@pytest.fixture(scope="module")
def app_image(docker_client):
    from tools.sdk_image import BuildError, SiteUnavailable, ensure_sdk_image

    try:
        base = ensure_sdk_image(docker_client)
    except SiteUnavailable as e:
        pytest.skip(f"the Supervisely SDK could not be installed (is PyPI reachable?): {e}")
    except BuildError as e:
        pytest.fail(str(e))
    dockerfile = f'FROM {base}\nCOPY *.py /\nCMD ["python3", "-u", "/app.py"]\n'
    return build_image(docker_client, "sly-test/app-env:1", dockerfile, {"app.py": APP_SCRIPT, "loop.py": LOOP_SCRIPT})


@pytest.fixture
def minted(monkeypatch):
    """The App tokens the in-process server mints ({task_id: token}), so a test can try the real one."""
    if not IN_THREAD:
        return None
    from server.public import tokens

    out: dict[int, str] = {}
    real_mint = tokens.mint

    def mint(conn, task_id, now=None):
        out[task_id] = real_mint(conn, task_id, now)
        return out[task_id]

    monkeypatch.setattr(tokens, "mint", mint)
    return out


def _mine(identity: str, task_id: int) -> dict:
    """Docker filters for the containers of one agent's task (other tests' agents on this engine
    have tasks of the same ids)."""
    from workers.container_spec import LABEL_AGENT

    return {"label": [f"{LABEL_TASK}={task_id}", f"{LABEL_AGENT}={identity}"]}


def _identity(agent) -> str:
    return hashlib.sha256(agent.token.encode()).hexdigest()[:16]  # node.config.Config.identity


def prefixed(lines, prefix):
    return json.loads(next(m for m in lines if m.startswith(prefix))[len(prefix) :])


@pytest.mark.slow  # over 2 s: outside the fast lane
@pytest.mark.docker
def test_an_app_reaches_the_server_only_through_its_relay(server, user, tmp_path, docker_client, app_image, minted):
    from tests.agent.conftest import AgentProcess
    from tests.workers.test_data import make_project

    agent = AgentProcess(server, tmp_path / "agent", "app-e2e")
    agent.start(handler=None, MIN_FREE_DISK_MB=1, STOP_GRACE=1, TASK_DIR_CLEANUP="on-success")
    try:
        project = make_project(user, f"app-{tmp_path.name[-12:]}", {"ds": {"a.png": b"not downloaded"}})
        port = int(server.url.rsplit(":", 1)[1])
        config = {"serverPort": port, "nested": {"a": 1}, "flag": True}
        task = user.create_task(agent.id, "app", image=app_image, config=config, project_id=project["id"])
        done = agent.wait_state(task["id"], timeout=90)
        lines = [ln["message"] for ln in agent.logs(task["id"])]
        assert done["state"] == "finished", (done, lines[-20:], agent.stderr()[-2000:])
    finally:
        agent.kill_tree()
    env = prefixed(lines, "ENV ")
    assert env["SERVER_ADDRESS"] == "http://127.0.0.1:8787" and env["TASK_ID"] == str(task["id"])
    assert env["PROJECT_ID"] == str(project["id"]) and env["TEAM_ID"] == env["WORKSPACE_ID"] == "1"
    assert env["modal.state.nested.a"] == "1" and env["modal.state.flag"] == "True"
    assert json.loads(env["MODAL_STATE"]) == config and json.loads(env["CONTEXT"])["projectId"] == project["id"]
    assert "AGENT_TOKEN" not in env and not any(agent.token in v for v in env.values())
    # The App called the server through SERVER_ADDRESS (past its token check: the method is unknown) ...
    assert prefixed(lines, "CALL ") == {
        "status": 404,
        "body": {
            "error": "public API method 'no.such.method' is not supported by this server (docs/apps.md lists the "
            "supported ones)",
            "code": "method_not_supported",
            "details": {"method": "no.such.method"},
        },
    }
    # ... but could not reach it directly, and holds nothing the server takes for a token.
    reach = prefixed(lines, "REACH ")
    assert reach["loopback"] != "connected" and reach["gateway"] not in (None, "connected"), reach
    for value in {v for v in env.values() if len(v) >= 16}:
        r = requests.post(f"{server.url}/public/api/v3/no.such.method", headers={"x-api-key": value[:4096]}, json={})
        assert r.status_code == 401
    assert done["progress"] == {"current": 3, "total": 3}  # the SDK's progress lines
    assert not any(m.startswith("data ready") for m in lines)  # the App reads its project itself
    ready = next(m for m in lines if m.startswith("App API: SERVER_ADDRESS"))
    print(ready)
    assert not docker_client.containers.list(all=True, filters=_mine(_identity(agent), task["id"]))
    if minted is not None:  # the real token: never in the App's reach, dead now
        real = minted[task["id"]]
        assert not any(real in v for v in env.values()) and not any(real in m for m in lines)
        r = requests.post(f"{server.url}/public/api/v3/no.such.method", headers={"x-api-key": real}, json={})
        assert r.status_code == 401


@pytest.mark.docker
def test_an_image_without_python3_fails_clearly(node, task_image, docker_client):
    ctx = node.ctx(type="app", image=task_image, command="env.sh")
    outcome = app_worker.run(ctx)
    assert outcome.state == "failed" and "has no python3" in outcome.error, outcome
    assert not docker_client.containers.list(all=True, filters=_mine(ctx.config.identity, ctx.task_id))
    assert not (ctx.task_dir / "api" / "api.sock").exists()


@pytest.mark.slow
@pytest.mark.docker
def test_stopping_an_app_removes_both_containers(node, app_image, docker_client):
    ctx = node.ctx(type="app", image=app_image, command=["sh", "-c", "echo up; sleep 60"])
    result = {}
    t = threading.Thread(target=lambda: result.update(outcome=app_worker.run(ctx)))
    t.start()
    poll_for(lambda: "up" in ctx.messages("stdout"), timeout=30, what="the App running")
    labels = _mine(ctx.config.identity, ctx.task_id)
    roles = sorted(c.labels.get(LABEL_ROLE, "app") for c in docker_client.containers.list(filters=labels))
    assert roles == ["api-relay", "app"]
    ctx.stop_event.set()
    t.join(30)
    assert result["outcome"].state == "stopped"
    assert not docker_client.containers.list(all=True, filters=labels)


@pytest.mark.docker
@pytest.mark.slow
def test_an_agent_restart_keeps_the_app_and_serves_it_again(server, user, tmp_path, docker_client, app_image):
    from tests.agent.conftest import AgentProcess

    env = dict(MIN_FREE_DISK_MB=1, STOP_GRACE=1, TASK_DIR_CLEANUP="on-success")
    agent = AgentProcess(server, tmp_path / "agent", "app-adopt")
    agent.start(handler=None, **env)
    try:
        task = user.create_task(agent.id, "app", image=app_image, command="python3 -u /loop.py", config={"seconds": 14})
        calls = lambda: [ln["message"] for ln in agent.logs(task["id"]) if ln["message"].startswith("CALL ")]  # noqa: E731
        poll_for(lambda: "CALL 404" in calls(), timeout=60, what=f"the App's first call; {agent.stderr()[-1500:]}")
        agent.kill_tree()  # the task process and its forwarder die; both containers keep running
        labels = _mine(_identity(agent), task["id"])
        assert len(docker_client.containers.list(filters=labels)) == 2
        before = len(calls())
        agent.start(handler=None, **env)
        done = agent.wait_state(task["id"], timeout=60)
        lines = [ln["message"] for ln in agent.logs(task["id"])]
        assert done["state"] == "finished", (done, lines[-20:], agent.stderr()[-2000:])
    finally:
        agent.kill_tree()
    after = calls()[before:]
    # The new task process serves the same socket and local token, with the new real token.
    assert after and after[-1] == "CALL 404", after
    assert any(m.startswith("re-attached to container") for m in lines)
    assert not docker_client.containers.list(all=True, filters=labels)


@pytest.mark.docker
def test_an_orphan_relay_is_reaped_and_never_taken_for_the_task(node, docker_client, busybox_image):
    from workers.container import find_container
    from workers.container_spec import LABEL_AGENT
    from workers.docker_task import reap_orphan_containers

    cfg = node.config()
    labels = {LABEL_AGENT: cfg.identity, LABEL_TASK: "999999", LABEL_ROLE: app_worker.RELAY_ROLE}
    c = docker_client.containers.run(busybox_image, ["sleep", "60"], labels=labels, detach=True)
    try:
        assert find_container(docker_client, 999999, cfg.identity) is None  # not the task's own container
        assert find_container(docker_client, 999999, cfg.identity, role=app_worker.RELAY_ROLE).id == c.id
        assert reap_orphan_containers(cfg, keep_task_ids=[]) == [c.name]
    finally:
        for left in docker_client.containers.list(all=True, filters={"id": c.id}):
            left.remove(force=True)
