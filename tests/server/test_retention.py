"""Retention: deleting tasks (API, CLI) with their logs, expiring old logs, deleting a node, space
given back to SQLite, and the rate limit on repeated error messages."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest
import requests
from sqlalchemy import create_engine, func, select, text

from protocol.errors import APIError
from server import db
from server.db import migrate
from server.http.logfilter import RateLimitFilter, install
from server.tasks import retention
from tests.support.procs import poll_for
from tests.support.server import REPO

METRICS = {"message": "m", "event_type": "EventType.METRICS", "type": "train", "epoch": 1, "metrics": {"loss": 0.5}}


def lines(n0: int, n1: int) -> list[dict]:
    return [
        {"ts": 1700000000.0 + i, "level": "info", "stream": "stdout", "message": f"line {i}"} for i in range(n0, n1)
    ]


def finished_task(client, agent, n_lines: int = 5, kind: str = "custom", state: str = "finished") -> dict:
    t = client.create_task(agent.id, kind, image="x:1")
    assert [x["id"] for x in agent.poll()["tasks"]] == [t["id"]]
    agent.state_raw(t["id"], "running")
    agent.logs_raw(t["id"], 0, lines(0, n_lines - 1) + [METRICS])
    agent.state_raw(t["id"], state, **({"exit_code": 0} if state == "finished" else {"error": "x"}))
    return t


def count(db_url: str, table: str, task_id: int) -> int:
    eng = create_engine(db_url)
    try:
        with eng.connect() as conn:
            return conn.execute(text(f"SELECT count(*) FROM {table} WHERE task_id = :t"), {"t": task_id}).scalar()
    finally:
        eng.dispose()


def test_delete_a_final_task_takes_its_log_and_metrics_and_keeps_its_model(server, client, make_agent):
    agent = make_agent("del")
    t = client.create_task(agent.id, "train", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    agent.logs_raw(t["id"], 0, lines(0, 4) + [METRICS])
    blob = agent.upload(b"weights")
    model = agent.post_raw(
        f"/agent/v1/tasks/{t['id']}/results",
        json={"kind": "model", "name": "m", "files": [{"path": "w.bin", "sha256": blob, "size": 7}]},
    ).json()["results"]["model_id"]
    with pytest.raises(APIError) as e:  # running: refused, nothing deleted
        client.delete_task(t["id"])
    assert e.value.status == 409 and e.value.code == "task_not_final"
    assert len(client.get_logs(t["id"])["lines"]) == 5
    agent.state_raw(t["id"], "finished", exit_code=0)

    answer = client.delete_task(t["id"])
    assert answer["deleted"] == {"log_lines": 5, "metrics": 1, "artifacts": 0}
    assert answer["kept"] == {"models": [model], "projects": []} and "kept" in answer["detail"]
    for path in (f"/api/v1/tasks/{t['id']}", f"/api/v1/tasks/{t['id']}/logs", f"/api/v1/tasks/{t['id']}/metrics"):
        r = requests.get(server.url + path, headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "task_not_found", path
    assert count(server.db_url, "log_lines", t["id"]) == 0 and count(server.db_url, "task_metrics", t["id"]) == 0
    assert client.get_model(model)["task_id"] == t["id"]  # the model stays, naming the deleted task
    with pytest.raises(APIError) as e:
        client.delete_task(t["id"])
    assert e.value.status == 404
    assert agent.state_raw(t["id"], "running").status_code == 404  # its agent is told it is gone


def test_delete_refuses_every_unfinished_state(server, client, make_agent):
    agent = make_agent("unfinished")
    queued = client.create_task(agent.id, "custom", image="x:1")
    for state in ("queued", "assigned", "running"):
        if state == "assigned":
            agent.poll()
        elif state == "running":
            agent.state_raw(queued["id"], "running")
        with pytest.raises(APIError) as e:
            client.delete_task(queued["id"])
        assert e.value.status == 409 and state in e.value.detail
    client.stop_task(queued["id"])
    agent.state_raw(queued["id"], "stopped")
    assert client.delete_task(queued["id"])["id"] == queued["id"]


def test_cli_deletes_a_task_and_says_what_it_kept(server, client, make_agent):
    agent = make_agent("cli-del")
    done = finished_task(client, agent, state="failed")
    running = client.create_task(agent.id, "custom", image="x:1")
    env = dict(os.environ, SLY_SERVER=server.url, SLY_ADMIN_TOKEN=server.admin_token)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "client", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )

    p = cli("tasks", "delete", str(done["id"]))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"deleted task {done['id']} (5 log lines, 1 metrics points)"
    assert count(server.db_url, "log_lines", done["id"]) == 0
    p = cli("tasks", "delete", str(running["id"]))
    assert p.returncode == 1 and "409 task_not_final" in p.stderr
    client.get_task(running["id"])  # still there


@pytest.mark.slow
@pytest.mark.server_process("reads the server's log file")
def test_log_lines_of_tasks_final_longer_than_the_setting_expire(own_server):
    srv, client, agent = own_server("--log-retention-days", "1", "--housekeeping-s", "0.2")
    old = finished_task(client, agent)
    recent = finished_task(client, agent)
    live = client.create_task(agent.id, "custom", image="x:1")
    agent.poll(free_slots=1, running=[])
    agent.state_raw(live["id"], "running")
    agent.logs_raw(live["id"], 0, lines(0, 3))
    eng = create_engine(srv.db_url)
    try:
        with eng.begin() as conn:  # backdate: `old` ended 2 days ago; `live` has run for 2 days
            conn.execute(
                text("UPDATE tasks SET updated_at = updated_at - 172800 WHERE id IN (:a, :b)"),
                {"a": old["id"], "b": live["id"]},
            )
    finally:
        eng.dispose()
    poll_for(lambda: client.get_task(old["id"])["logs_expired_at"], timeout=20, what="the old task's log expired")
    assert count(srv.db_url, "log_lines", old["id"]) == 0
    assert client.get_logs(old["id"])["lines"] == []
    assert client.task_metrics(old["id"]) == [{"seq": 4, "type": "train", "epoch": 1, "metrics": {"loss": 0.5}}]
    assert len(client.get_logs(recent["id"])["lines"]) == 5 and client.get_task(recent["id"])["logs_expired_at"] is None
    assert len(client.get_logs(live["id"])["lines"]) == 3  # not final: kept
    # A follower of an expired log is told at once that it has ended.
    r = requests.get(
        f"{srv.url}/api/v1/tasks/{old['id']}/logs?follow=1",
        headers={"Authorization": f"Bearer {srv.admin_token}"},
        stream=True,
        timeout=10,
    )
    assert "event: end" in next(r.iter_content(chunk_size=None)).decode()
    r.close()
    assert "log retention: deleted 5 lines of 1 tasks" in srv.log_path.read_text()


def test_deleting_a_node_fails_its_active_tasks_and_keeps_its_final_ones(own_server):
    srv, client, agent = own_server("--telemetry-min-gap-s", "0")
    done = finished_task(client, agent)
    active = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(active["id"], "running")
    queued = client.create_task(agent.id, "custom", image="x:1")
    agent.post_raw("/agent/v1/telemetry", json={"cpu": 3})

    answer = client.delete_agent(agent.id)
    assert sorted(answer["failed_tasks"]) == sorted([active["id"], queued["id"]])
    assert answer["kept_tasks"] == 3 and "node deleted" in answer["tasks"]
    for tid in (active["id"], queued["id"]):
        t = client.get_task(tid)
        assert (t["state"], t["error"], t["agent_id"]) == ("failed", "node deleted", agent.id)
    t = client.get_task(done["id"])
    assert t["state"] == "finished" and t["agent_id"] == agent.id and len(client.get_logs(done["id"])["lines"]) == 5
    with pytest.raises(APIError) as e:
        client.get_agent(agent.id)
    assert e.value.status == 404
    assert agent.post_raw("/agent/v1/telemetry", json={"cpu": 1}).status_code == 401
    eng = create_engine(srv.db_url)
    try:
        with eng.connect() as conn:
            for table in ("telemetry_latest", "telemetry_history"):
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, table
    finally:
        eng.dispose()
    assert client.delete_task(done["id"])["deleted"]["log_lines"] == 5  # and can be deleted afterwards
    # Ids are never given again: the kept tasks name the deleted node alone, models their deleted task.
    client.delete_task(queued["id"])  # the newest task
    newer = client.create_agent("successor")
    assert newer["id"] > agent.id
    assert client.create_task(newer["id"], "custom", image="x:1")["id"] > queued["id"]


@pytest.mark.sqlite_only("SQLite's auto_vacuum and page counts")
def test_sqlite_gives_the_pages_of_a_big_delete_back(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'server.db'}")
    state = types.SimpleNamespace(db=types.SimpleNamespace(engine=engine))  # what retention needs of it
    migrate.upgrade(engine)
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # INCREMENTAL, set at creation
        conn.execute(
            db.tasks.insert().values(
                id=1,
                agent_id=1,
                type="custom",
                config={},
                resources={},
                state="finished",
                timeline=[],
                results={},
                log_acked=-1,
                created_at=0,
                updated_at=0,
                stop_requested=False,
            )
        )
        conn.execute(
            db.log_lines.insert(),
            [
                {"task_id": 1, "seq": i, "ts": 0.0, "level": "info", "stream": "stdout", "message": "x" * 200}
                for i in range(30_000)
            ],
        )

    def pages():
        with engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return conn.exec_driver_sql("PRAGMA page_count").scalar()

    before = pages()
    with engine.begin() as conn:
        answer = retention.delete_task(conn, 1)
    retention.after_delete(state, answer["deleted"]["log_lines"])
    after = pages()
    assert answer["deleted"]["log_lines"] == 30_000
    assert after < before / 4, (before, after)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
        assert conn.execute(select(func.count()).select_from(db.log_lines)).scalar() == 0
    engine.dispose()


def record(msg: str, *args, name: str = "asyncio", level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_rate_limit_filter_lets_through_a_few_identical_messages_a_minute():
    now = [1000.0]
    f = RateLimitFilter(burst=5, period=60.0, clock=lambda: now[0])
    passed = [f.filter(record("socket.accept() out of system resource")) for _ in range(10_000)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    # Another message or another logger: a budget of its own.
    assert f.filter(record("other message")) and f.filter(record("socket.accept() out of system resource", name="x"))
    now[0] += 30
    assert not f.filter(record("socket.accept() out of system resource"))
    now[0] += 31  # a new minute: through again, saying how many were dropped
    r = record("socket.accept() out of system resource")
    assert f.filter(r)
    assert r.getMessage() == "socket.accept() out of system resource [9996 more like this not logged in the last 60 s]"
    r = record("accept failed on %s: %d%%", "fd 9", 24)  # a formatted message keeps its formatting
    for _ in range(7):
        f.filter(record("accept failed on %s: %d%%", "fd 10", 24))
    now[0] += 60
    assert f.filter(r) and r.getMessage() == "accept failed on fd 9: 24% [2 more like this not logged in the last 60 s]"


def test_rate_limit_is_installed_on_the_loggers_that_report_accept_errors(caplog):
    f = install()
    assert install() is f  # once per process
    for name in ("asyncio", "uvicorn.error"):
        assert f in logging.getLogger(name).filters
    caplog.set_level(logging.ERROR)
    for _ in range(50):
        logging.getLogger("asyncio").error("socket.accept() out of system resource %s", "test-only")
    assert len([r for r in caplog.records if "test-only" in r.getMessage()]) <= f.burst
    for name in ("asyncio", "uvicorn.error"):
        logging.getLogger(name).removeFilter(f)
