"""Every piece of database work runs on the server's bounded database threads (`state.db.run`).

Not on the event loop (one slow query would stall every request, `/healthz` and the long-polls
included), and not on a thread of another pool (Starlette's threadpool for sync routes and
`run_in_threadpool` has 40 threads, more than the engine has connections, so such a thread can
wait for a connection that the database threads need).

The server runs in this process (uvicorn in a thread), so a pool `checkout` listener on its engine
sees which thread takes each connection. `state.db.run` is wrapped to mark the functions it runs; a
checkout outside one, on the loop's thread or elsewhere, fails the test with the stack that did it.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import uvicorn
from PIL import Image
from sqlalchemy import event

from protocol import endpoints
from protocol.endpoints import path
from server.app import create_app
from server.auth.service import SESSION_COOKIE
from server.settings import Settings
from tests.support.procs import free_port, poll_for
from tests.support.server import TEST_DB_URL, create_test_database, drop_test_databases

POOL_SIZE = 3
SERVER_DIR = str(Path(__file__).resolve().parents[2] / "server")


def _server_frames() -> str:
    """The stack's frames in server/ code (where the checkout came from), innermost last."""
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename.startswith(SERVER_DIR)]
    return "".join(traceback.format_list(frames)) or "".join(traceback.format_stack(limit=12)[:-2])


class CheckoutWatch:
    """Records every connection checkout of the engine: on which thread, inside state.db.run or not,
    and how many connections were out at once."""

    def __init__(self, state):
        self.state = state
        self.pool_size = state.db.engine.pool.size()  # POOL_SIZE, and on SQLite the read thread's one
        self.lock = threading.Lock()
        self.local = threading.local()
        self.loop_threads: set[int] = set()
        self.checkouts = 0
        self.out = 0
        self.max_out = 0
        self.on_loop: list[str] = []
        self.outside_run: list[str] = []
        event.listen(state.db.engine, "checkout", self._checkout)
        event.listen(state.db.engine, "checkin", self._checkin)
        run, run_read = state.db.run, state.db.run_read

        async def watched_run(fn, *args, **kw):
            self.loop_threads.add(threading.get_ident())  # state.db.run is awaited on the loop
            return await run(self._marked(fn), *args, **kw)

        async def watched_run_read(fn, *args, **kw):
            self.loop_threads.add(threading.get_ident())
            return await run_read(self._marked(fn), *args, **kw)

        state.db.run, state.db.run_read = watched_run, watched_run_read

    def _marked(self, fn):
        def inside(*args, **kw):
            self.local.depth = getattr(self.local, "depth", 0) + 1
            try:
                return fn(*args, **kw)
            finally:
                self.local.depth -= 1

        return inside

    def _checkout(self, _dbapi_conn, _record, _proxy):
        stack = _server_frames()
        with self.lock:
            self.checkouts += 1
            self.out += 1
            self.max_out = max(self.max_out, self.out)
            if threading.get_ident() in self.loop_threads:
                self.on_loop.append(stack)
            elif not getattr(self.local, "depth", 0):
                self.outside_run.append(f"thread {threading.current_thread().name}:\n{stack}")

    def _checkin(self, _dbapi_conn, _record):
        with self.lock:
            self.out -= 1


@pytest.fixture
def inproc(tmp_path):
    """(base url, admin token, watch): the server app served by uvicorn in a thread of this process."""
    db_url = create_test_database() if TEST_DB_URL else None
    token = "a" * 32
    app = create_app(
        Settings(
            data_dir=tmp_path / "data", admin_token=token, db_pool_size=POOL_SIZE, db_url=db_url, telemetry_min_gap_s=0
        )
    )
    watch = CheckoutWatch(app.state.server)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    poll_for(lambda: server.started or not thread.is_alive(), timeout=30, what="the in-process server to start")
    assert server.started, "the in-process server did not start"
    watch.loop_threads.add(thread.ident)  # uvicorn runs its loop in the thread that calls run()
    try:
        yield f"http://127.0.0.1:{server.config.port}", token, watch
    finally:
        server.should_exit = True
        thread.join(30)
        if db_url:
            from sqlalchemy.engine import make_url

            drop_test_databases([make_url(db_url).database])


def _png(w=48, h=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _ok(r: requests.Response, code: int = 200) -> requests.Response:
    assert r.status_code == code, f"{r.request.method} {r.url}: {r.status_code} {r.text[:500]}"
    return r


def _drive(url: str, token: str) -> None:
    """A representative request of every route family, user side and agent side."""
    admin = requests.Session()
    admin.headers["Authorization"] = f"Bearer {token}"

    def u(template, **kw):
        return url + path(template, **kw)

    # --- ops
    _ok(requests.get(url + "/healthz", timeout=10))
    _ok(requests.get(url + "/metrics", timeout=10))

    # --- agents (user side)
    a = _ok(admin.post(u(endpoints.AGENTS), json={"name": "loop-free"}, timeout=10)).json()
    aid = a["id"]
    agent = requests.Session()
    agent.headers["x-token"] = a["token"]
    _ok(admin.get(u(endpoints.AGENTS), timeout=10))
    _ok(admin.get(u(endpoints.AGENT_BY_ID, agent_id=aid), timeout=10))
    _ok(admin.patch(u(endpoints.AGENT_BY_ID, agent_id=aid), json={"name": "loop-free-2"}, timeout=10))
    _ok(admin.get(u(endpoints.AGENT_BY_ID, agent_id=10**6), timeout=10), 404)

    # --- agent side: connect, telemetry
    _ok(agent.post(u(endpoints.CONNECT), json={"os": "linux"}, timeout=10))
    _ok(agent.post(u(endpoints.TELEMETRY), json={"cpu": 12.5, "memory": 40}, timeout=10))
    _ok(admin.get(u(endpoints.AGENT_TELEMETRY, agent_id=aid), timeout=10))
    _ok(agent.post(u(endpoints.CONNECT), json={"os": "linux"}, headers={"x-token": "wrong"}, timeout=10), 401)

    # --- blobs and thumbnails
    png = _png()
    config = json.dumps({"epochs": 3}).encode()
    for data in (png, config):
        _ok(admin.put(u(endpoints.USER_BLOB, sha256=_sha(data)), data=data, timeout=10))
    _ok(admin.head(u(endpoints.USER_BLOB, sha256=_sha(png)), timeout=10))
    _ok(admin.get(u(endpoints.USER_BLOB, sha256=_sha(png)), timeout=10))
    _ok(admin.get(u(endpoints.USER_BLOB_THUMB, sha256=_sha(png)), params={"size": 128}, timeout=30))

    # --- projects
    item = {"name": "a.png", "sha256": _sha(png), "size": len(png)}
    p = _ok(
        admin.post(u(endpoints.PROJECTS), json={"name": "p", "datasets": [{"name": "ds", "items": [item]}]}, timeout=30)
    ).json()
    _ok(admin.get(u(endpoints.PROJECTS), timeout=10))
    _ok(admin.get(u(endpoints.PROJECT, project_id=p["id"]), timeout=10))
    _ok(admin.get(u(endpoints.PROJECT_ITEMS, project_id=p["id"]), timeout=10))
    _ok(admin.get(u(endpoints.PROJECT_STATS, project_id=p["id"]), timeout=10))
    _ok(admin.get(u(endpoints.PROJECT_STATS, project_id=10**6), timeout=10), 404)

    # --- models
    files = [{"path": "config.json", "sha256": _sha(config), "size": len(config)}]
    m = _ok(admin.post(u(endpoints.MODELS), json={"name": "m", "files": files}, timeout=10)).json()
    _ok(admin.get(u(endpoints.MODELS), timeout=10))
    _ok(admin.get(u(endpoints.MODEL, model_id=m["id"]), timeout=10))

    # --- tasks, polls, state, logs, results, release
    t = _ok(admin.post(u(endpoints.TASKS), json={"agent_id": aid, "type": "custom", "image": "img"}, timeout=10)).json()
    tid = t["id"]
    _ok(admin.get(u(endpoints.TASKS), timeout=10))
    _ok(admin.get(u(endpoints.TASK, task_id=tid), timeout=10))
    poll = {"free_slots": 1, "free_gpus": [], "running": []}
    got = _ok(agent.post(u(endpoints.POLL), json=poll, timeout=10)).json()
    assert [x["id"] for x in got["tasks"]] == [tid]
    _ok(agent.post(u(endpoints.TASK_RELEASE, task_id=tid), timeout=10))
    got = _ok(agent.post(u(endpoints.POLL), json=poll, timeout=10)).json()
    assert [x["id"] for x in got["tasks"]] == [tid]
    _ok(agent.post(u(endpoints.POLL), params={"wait": 0.2}, json=dict(poll, running=[tid]), timeout=10))
    for st in ("preparing", "running"):
        _ok(agent.post(u(endpoints.TASK_STATE, task_id=tid), json={"state": st}, timeout=10))
    lines = [
        {"ts": 1.0, "level": "info", "stream": "stdout", "message": "hello"},
        {
            "ts": 2.0,
            "level": "info",
            "stream": "stdout",
            "message": "metrics",
            "event": "metrics",
            "epoch": 1,
            "metrics": {"loss": 0.5},
        },
    ]
    _ok(agent.post(u(endpoints.TASK_LOGS, task_id=tid), json={"first_seq": 0, "lines": lines}, timeout=10))
    _ok(agent.put(u(endpoints.AGENT_BLOB, sha256=_sha(b"weights")), data=b"weights", timeout=10))
    _ok(agent.head(u(endpoints.AGENT_BLOB, sha256=_sha(b"weights")), timeout=10))
    _ok(agent.get(u(endpoints.AGENT_BLOB, sha256=_sha(b"weights")), timeout=10))
    _ok(agent.get(u(endpoints.AGENT_BLOB, sha256=_sha(config)), timeout=10), 404)  # not its task's
    weights = [{"path": "w.bin", "sha256": _sha(b"weights"), "size": 7}]
    _ok(agent.post(u(endpoints.TASK_RESULTS, task_id=tid), json={"kind": "model", "files": weights}, timeout=10))
    _ok(agent.post(u(endpoints.TASK_RESULTS, task_id=tid), json={"kind": "artifacts", "files": weights}, timeout=10))
    _ok(agent.put(u(endpoints.AGENT_BLOB, sha256=_sha(png)), data=png, timeout=10))  # results name its own blobs
    _ok(
        agent.post(
            u(endpoints.TASK_RESULTS, task_id=tid),
            json={"kind": "project", "name": "out", "datasets": [{"name": "ds", "items": [item]}]},
            timeout=30,
        )
    )
    _ok(
        agent.post(u(endpoints.TASK_RESULTS, task_id=10**6), json={"kind": "artifacts", "files": weights}, timeout=10),
        404,
    )
    _ok(admin.get(u(endpoints.MODELS), params={"task_id": tid}, timeout=10))
    _ok(admin.get(u(endpoints.TASK_METRICS, task_id=tid), timeout=10))
    _ok(admin.get(u(endpoints.TASK_ARTIFACTS, task_id=tid), timeout=10))
    _ok(admin.get(u(endpoints.USER_TASK_LOGS, task_id=tid), timeout=10))
    for st in ("uploading", "finished"):
        _ok(agent.post(u(endpoints.TASK_STATE, task_id=tid), json={"state": st}, timeout=10))
    _ok(
        agent.post(u(endpoints.TASK_RESULTS, task_id=tid), json={"kind": "artifacts", "files": weights}, timeout=10),
        409,
    )
    with admin.get(u(endpoints.USER_TASK_LOGS, task_id=tid), params={"follow": 1}, stream=True, timeout=10) as r:
        _ok(r)
        assert b"hello" in r.raw.read()  # the task is final: the stream sends its lines and ends
    queued = _ok(
        admin.post(u(endpoints.TASKS), json={"agent_id": aid, "type": "custom", "image": "img"}, timeout=10)
    ).json()["id"]
    _ok(admin.post(u(endpoints.TASK_STOP, task_id=queued), timeout=10))
    _ok(admin.delete(u(endpoints.TASK, task_id=tid), timeout=10))

    # --- sessions, sign-in links, the console
    browser = requests.Session()
    _ok(browser.post(u(endpoints.SESSION), json={"token": token}, timeout=10))
    assert SESSION_COOKIE in browser.cookies
    _ok(browser.get(u(endpoints.AGENTS), timeout=10))
    _ok(browser.get(url + "/nodes", timeout=10))
    # An unknown cookie is a cache miss: the session is looked up in the database.
    _ok(requests.get(u(endpoints.AGENTS), cookies={SESSION_COOKIE: "not-a-session"}, timeout=10), 401)
    link = _ok(admin.post(u(endpoints.SESSION_LINKS), timeout=10)).json()
    other = requests.Session()
    _ok(other.get(url + link["path"], allow_redirects=False, timeout=10), 303)
    assert SESSION_COOKIE in other.cookies
    r = _ok(other.get(url + link["path"], allow_redirects=False, timeout=10), 303)  # spent: on to sign-in
    assert r.headers["location"] == "/signin?link=spent"
    _ok(browser.delete(u(endpoints.SESSION), headers={"Origin": url}, timeout=10))
    _ok(browser.get(u(endpoints.AGENTS), timeout=10), 401)

    # --- the agent's token and the agent go
    _ok(admin.post(u(endpoints.AGENT_TOKEN, agent_id=aid), timeout=10))
    _ok(agent.post(u(endpoints.POLL), json=poll, timeout=10), 401)
    _ok(admin.delete(u(endpoints.AGENT_BY_ID, agent_id=aid), timeout=10))


@pytest.mark.slow
def test_database_work_runs_only_on_the_database_threads(inproc):
    url, token, watch = inproc
    _drive(url, token)
    # Many requests at once: more than the pool has connections, never more connections out than it has.
    auth = {"Authorization": f"Bearer {token}"}
    with ThreadPoolExecutor(4 * POOL_SIZE) as ex:
        codes = list(
            ex.map(
                lambda _i: requests.get(url + endpoints.TASKS, headers=auth, timeout=30).status_code,
                range(8 * POOL_SIZE),
            )
        )
    assert codes == [200] * len(codes)

    assert watch.checkouts > 50, "the listener saw too few checkouts to mean anything"
    wrong = [f"on the event loop's thread:\n{s}" for s in dict.fromkeys(watch.on_loop)] + [
        f"outside state.db.run, on {s}" for s in dict.fromkeys(watch.outside_run)
    ]
    assert not wrong, (
        f"{len(watch.on_loop)} checkout(s) on the loop, {len(watch.outside_run)} outside state.db.run; "
        f"from:\n\n" + "\n".join(wrong)
    )
    assert watch.max_out <= watch.pool_size, f"{watch.max_out} connections out at once; the pool has {watch.pool_size}"
