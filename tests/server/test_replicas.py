"""Several server replicas on one PostgreSQL database, and revocation of open long-polls.

The replica tests need a PostgreSQL server: the one SLY_TEST_DB_URL names (as `./run.sh test`
sets it for its PostgreSQL pass), or SLY_TEST_PG_URL; each test makes a database of its own there
and drops it after. Without either they are skipped. The last tests run on SQLite.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import pytest
import requests

from client import UserClient
from protocol.logline import MAX_LINE
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import ServerProcess

PG_URL = os.environ.get("SLY_TEST_PG_URL", "") or (
    os.environ.get("SLY_TEST_DB_URL", "") if os.environ.get("SLY_TEST_DB_URL", "").startswith("postgresql") else ""
)
needs_pg = pytest.mark.skipif(
    not PG_URL,
    reason="no PostgreSQL: set SLY_TEST_DB_URL (or SLY_TEST_PG_URL) to a "
    "postgresql+psycopg:// URL to run the replica tests",
)
WAKE_S = 1.0  # the contract: a change on one replica reaches a waiter on another within this


@pytest.fixture
def pg_db():
    """A fresh database on the SLY_TEST_PG_URL server, dropped at the end: its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(PG_URL)
    name = "sly_test_" + secrets.token_hex(6)
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield admin.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def replicas(pg_db, tmp_path):
    """Two servers (A, B) on one database and one data dir, as behind a load balancer."""
    data = tmp_path / "data"
    a = ServerProcess(data, extra_args=["--db", pg_db])
    b = ServerProcess(data, extra_args=["--db", pg_db])
    b.admin_token = a.admin_token
    started = []
    try:
        for srv in (a, b):
            started.append(srv.start())
        yield a, b
    finally:
        for srv in started:
            srv.stop()


def _agent(a: ServerProcess, b: ServerProcess, name="node"):
    """One agent registered through A; a FakeAgent for it on each replica."""
    ca = UserClient(a.url, a.admin_token)
    info = ca.create_agent(name)
    return ca, FakeAgent(a.url, info["token"], info["id"]), FakeAgent(b.url, info["token"], info["id"])


class Background:
    """A call in a thread; `result()` waits for it (and re-raises what it raised)."""

    def __init__(self, fn, *args, **kw):
        self.value = self.error = None
        self.done_at = None
        self._t = threading.Thread(target=self._run, args=(fn, args, kw), daemon=True)
        self._t.start()

    def _run(self, fn, args, kw):
        try:
            self.value = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e
        self.done_at = time.monotonic()

    def result(self, timeout=30):
        self._t.join(timeout)
        assert not self._t.is_alive(), "the background call did not finish"
        if self.error:
            raise self.error
        return self.value


def _raw_poll(agent: FakeAgent, wait: float, running=()) -> requests.Response:
    return agent.post_raw(
        f"/agent/v1/poll?wait={wait}",
        json={"free_slots": 2, "free_gpus": [], "running": list(running)},
        timeout=wait + 10,
    )


def _wait_poll_open(client: UserClient, agent_id: int, n: int = 1):
    poll_for(lambda: client.get_agent(agent_id)["polls_open"] >= n, timeout=10, what=f"{n} open poll(s) of the agent")


@needs_pg
def test_task_created_on_a_wakes_a_poll_waiting_on_b(replicas):
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    poll = Background(on_b.poll, wait=20)
    _wait_poll_open(ca, on_b.id)  # polls_open is shared: A counts B's poll
    t0 = time.monotonic()
    task = ca.create_task(on_b.id, "custom", "busybox:latest")
    answer = poll.result()
    took = poll.done_at - t0
    print(f"cross-replica task wake-up: {took * 1000:.0f} ms")
    assert [t["id"] for t in answer["tasks"]] == [task["id"]]
    assert took < WAKE_S
    # B writes the end of its poll with its next contact batch (--contact-flush-s, 1 s): A sees it then.
    poll_for(lambda: ca.get_agent(on_b.id)["polls_open"] == 0, timeout=3, what="A to see B's poll end")


@needs_pg
def test_stop_on_a_reaches_the_node_polling_on_b(replicas):
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    task = ca.create_task(on_b.id, "custom", "busybox:latest")
    assert [t["id"] for t in on_b.poll()["tasks"]] == [task["id"]]
    assert on_b.state_raw(task["id"], "preparing").status_code == 200
    poll = Background(on_b.poll, wait=20, running=[task["id"]])
    _wait_poll_open(ca, on_b.id)
    t0 = time.monotonic()
    ca.stop_task(task["id"])
    answer = poll.result()
    took = poll.done_at - t0
    print(f"cross-replica stop: {took * 1000:.0f} ms")
    assert answer["stop"] == [task["id"]] and took < WAKE_S
    # Delivered once (a shared fact): the next poll on A lists it but does not answer early for it.
    t1 = time.monotonic()
    again = FakeAgent(a.url, on_b.token, on_b.id).poll(wait=1.0, running=[task["id"]])
    # It waits (at least 0.8 x its wait: idle polls end at a random point of the last fifth).
    assert again["stop"] == [task["id"]] and time.monotonic() - t1 >= 0.75


@needs_pg
def test_a_follower_on_a_sees_lines_posted_to_b(replicas):
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    task = ca.create_task(on_b.id, "custom", "busybox:latest")
    on_b.poll()
    seen: list[tuple[int, float]] = []

    def follow():
        for line in ca.iter_logs(task["id"], follow=True, timeout=30):
            seen.append((line["seq"], time.monotonic()))

    follower = Background(follow)
    assert on_b.logs_raw(task["id"], 0, [{"message": "first"}]).json()["acked"] == 0
    poll_for(lambda: len(seen) == 1, timeout=10, what="the follower to get the first line")
    for seq in (1, 2):
        t0 = time.monotonic()
        assert on_b.logs_raw(task["id"], seq, [{"message": f"line {seq}"}]).json()["acked"] == seq
        poll_for(lambda seq=seq: len(seen) == seq + 1, timeout=10, what=f"line {seq} on A")
        took = seen[seq][1] - t0
        print(f"cross-replica log line: {took * 1000:.0f} ms")
        assert took < WAKE_S
    assert on_b.state_raw(task["id"], "failed", error="done").status_code == 200
    follower.result()  # the stream on A ends when B records the final state
    assert [s for s, _ in seen] == [0, 1, 2]


@needs_pg
def test_no_task_is_handed_out_twice_when_two_nodes_race_on_two_replicas(replicas):
    a, b = replicas
    ca, on_a, on_b = _agent(a, b)
    n = 60
    ids = list(range(1, n + 1))  # a fresh database numbers the tasks from 1
    got: dict[str, list[int]] = {"a": [], "b": []}
    stop = threading.Event()

    def node(name, agent):
        while not stop.is_set():
            # Every task counts as running (so none is handed out again as missing from `running`):
            # only a fresh claim of a queued task can hand one out.
            answer = agent.poll(free_slots=3, wait=2, running=list(ids))
            got[name].extend(t["id"] for t in answer["tasks"])

    nodes = [Background(node, "a", on_a), Background(node, "b", on_b)]
    _wait_poll_open(ca, on_a.id, 2)
    made = [ca.create_task(on_a.id, "custom", "busybox:latest")["id"] for _ in range(n)]
    assert made == ids
    poll_for(lambda: len(got["a"]) + len(got["b"]) >= n, timeout=30, what="every task handed out")
    stop.set()
    for t in nodes:
        t.result()
    handed = got["a"] + got["b"]
    print(f"hand-outs: {len(got['a'])} on A, {len(got['b'])} on B")
    assert sorted(handed) == sorted(ids), "a task was handed out twice or not at all"
    for tid in ids:
        timeline = ca.get_task(tid)["timeline"]
        assert [s["state"] for s in timeline] == ["queued", "assigned"]


@needs_pg
def test_token_rotation_on_a_ends_the_open_poll_on_b_with_401_and_no_task(replicas):
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    poll = Background(_raw_poll, on_b, 20)
    _wait_poll_open(ca, on_b.id)
    t0 = time.monotonic()
    new = ca.rotate_token(on_b.id)
    r = poll.result()
    took = poll.done_at - t0
    print(f"cross-replica revocation: {took * 1000:.0f} ms")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and took < WAKE_S
    task = ca.create_task(on_b.id, "custom", "busybox:latest")
    assert _raw_poll(on_b, 0).status_code == 401
    assert ca.get_task(task["id"])["state"] == "queued"
    assert [t["id"] for t in FakeAgent(b.url, new["token"], on_b.id).poll()["tasks"]] == [task["id"]]


@needs_pg
def test_b_drops_its_kept_agent_row_when_a_rotates_the_token(replicas):
    """B keeps the agent row it looked up (server/state.py); A's rotation must reach it by NOTIFY,
    also for the telemetry fast path, which reads nothing else."""
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    assert on_b.post_raw("/agent/v1/telemetry", json={"cpu": 1}).status_code == 200  # B keeps the row now
    t0 = time.monotonic()
    new = ca.rotate_token(on_b.id)
    poll_for(
        lambda: on_b.post_raw("/agent/v1/telemetry", json={"cpu": 2}).status_code == 401,
        timeout=WAKE_S,
        what="B to refuse the rotated token",
    )
    print(f"cross-replica token revocation (kept row dropped): {(time.monotonic() - t0) * 1000:.0f} ms")
    assert FakeAgent(b.url, new["token"], on_b.id).post_raw("/agent/v1/telemetry", json={"cpu": 3}).status_code == 200
    poll_for(
        lambda: (ca.get_agent(on_b.id)["telemetry"] or {}).get("cpu") == {"percent": 3.0},
        timeout=3,
        what="A to show the sample B batched",
    )


@needs_pg
def test_settings_change_and_node_removal_on_a_reach_b(replicas):
    a, b = replicas
    ca, _, on_b = _agent(a, b)
    poll = Background(on_b.poll, wait=20)
    _wait_poll_open(ca, on_b.id)
    t0 = time.monotonic()
    ca.patch_agent(on_b.id, name="renamed")
    assert poll.result()["settings"]["name"] == "renamed" and poll.done_at - t0 < WAKE_S
    poll = Background(_raw_poll, on_b, 20)
    _wait_poll_open(ca, on_b.id)
    t0 = time.monotonic()
    ca.delete_agent(on_b.id)
    assert poll.result().status_code == 401 and poll.done_at - t0 < WAKE_S


# --- one process, SQLite ---


def test_rotation_during_an_open_poll_answers_401_and_no_task(client, make_agent, server):
    agent = make_agent("rotated")
    poll = Background(_raw_poll, agent, 20)
    _wait_poll_open(client, agent.id)
    t0 = time.monotonic()
    client.rotate_token(agent.id)
    r = poll.result()
    assert r.status_code == 401 and poll.done_at - t0 < WAKE_S
    task = client.create_task(agent.id, "custom", "busybox:latest")
    assert _raw_poll(agent, 0).status_code == 401
    assert client.get_task(task["id"])["state"] == "queued"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.server_process("measures the server process's memory")
def test_huge_lines_are_read_a_page_at_a_time_and_healthz_stays_fast(own_server):
    """Three 10 MiB lines with a follower open: each cut to the line limit, pages bounded in bytes,
    RSS growth bounded, /healthz fast."""
    srv, client, agent = own_server("--log-page-bytes", str(100 * 1024))
    task = client.create_task(agent.id, "custom", "busybox:latest")
    agent.poll()
    big = "x" * (10 * 1024 * 1024)
    seen = []

    def follow():
        for line in client.iter_logs(task["id"], follow=True, timeout=60):
            seen.append((line["seq"], len(line["message"])))

    follower = Background(follow)
    assert agent.logs_raw(task["id"], 0, [{"message": "start"}]).json()["acked"] == 0
    poll_for(lambda: seen == [(0, 5)], timeout=10, what="the follower to be open")
    base = _rss_kib(srv.proc.pid)
    peak = [base]
    health: list[float] = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(srv.proc.pid))
            t0 = time.monotonic()
            assert requests.get(srv.url + "/healthz", timeout=5).status_code == 200
            health.append(time.monotonic() - t0)

    watcher = Background(watch)
    r = agent.post_raw(
        f"/agent/v1/tasks/{task['id']}/logs",
        timeout=60,
        data=json.dumps({"first_seq": 1, "lines": [{"message": big} for _ in range(3)]}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["acked"] == 3
    poll_for(lambda: len(seen) == 4, timeout=60, what="the follower to get the three big lines")
    # A page of the log holds one such line, and says where to go on.
    readers = [Background(client.get_logs, task["id"], after=0, limit=1000) for _ in range(3)]
    pages = [r.result() for r in readers]
    done.set()
    watcher.result()
    assert all([ln["seq"] for ln in p["lines"]] == [1] and p["next"] == 1 for p in pages)
    assert client.get_logs(task["id"], after=2)["next"] is None
    assert agent.state_raw(task["id"], "failed", error="x").status_code == 200
    follower.result()
    assert seen[0] == (0, 5) and [seq for seq, _n in seen] == [0, 1, 2, 3]
    assert all(MAX_LINE < n < MAX_LINE + 200 for _seq, n in seen[1:]), seen  # cut by the server, marked
    growth = (peak[0] - base) / 1024
    health.sort()
    print(
        f"RSS growth {growth:.0f} MiB; /healthz during the reads: n={len(health)} "
        f"p50 {health[len(health) // 2] * 1000:.1f} ms, max {health[-1] * 1000:.1f} ms"
    )
    assert growth < 400
    assert health[-1] < 1.0  # measured far lower; generous for a loaded 2-state box


@needs_pg
def test_workers_serve_one_port_and_wake_each_other(pg_db, tmp_path):
    """--workers 2: two processes on one port; a poll and the task for it meet, whichever took each."""
    srv = ServerProcess(tmp_path / "data", extra_args=["--db", pg_db, "--workers", "2"]).start()
    try:
        client = UserClient(srv.url, srv.admin_token)
        for i in range(4):  # new connections: the kernel spreads them over both workers
            info = client.create_agent(f"w{i}")
            agent = FakeAgent(srv.url, info["token"], info["id"])
            poll = Background(agent.poll, wait=20)
            _wait_poll_open(client, agent.id)
            t0 = time.monotonic()
            task = client.create_task(agent.id, "custom", "busybox:latest")
            assert [t["id"] for t in poll.result()["tasks"]] == [task["id"]] and poll.done_at - t0 < WAKE_S
    finally:
        srv.stop()


def test_workers_above_one_on_sqlite_are_refused(tmp_path):
    import subprocess
    import sys

    from tests.support.server import REPO

    p = subprocess.run(
        [sys.executable, "-m", "server", "--data", str(tmp_path / "d"), "--workers", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode != 0 and "--workers above 1 needs PostgreSQL" in p.stderr
