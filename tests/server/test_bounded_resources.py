"""Bounded resources: the server's own line-size limit, the per-task log quota, which blobs an
agent may read, the blob collector and the blob-store quota. Real server subprocesses."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import psutil
import pytest
import requests
from alembic import command

from protocol.logline import MAX_LINE
from server import db
from server.db import migrate
from server.logs.quota import QUOTA_MARKER
from tests.support.procs import poll_for


def _lines(start, n, size=10):
    return [
        {"ts": time.time(), "level": "info", "stream": "stdout", "message": f"{i:0{size}d}"}
        for i in range(start, start + n)
    ]


def _metric(srv, name: str) -> float:
    for line in requests.get(f"{srv.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _follow(srv, task_id: int, got: list, done: threading.Event) -> None:
    """Read the task's log as server-sent events until `end`, appending each line's message length."""
    with requests.get(
        f"{srv.url}/api/v1/tasks/{task_id}/logs?follow=1",
        stream=True,
        timeout=60,
        headers={"Authorization": f"Bearer {srv.admin_token}"},
    ) as r:
        event = None
        for raw in r.iter_lines():
            if raw.startswith(b"event: "):
                event = raw[7:].decode()
            elif raw.startswith(b"data: ") and event == "line":
                got.append(len(json.loads(raw[6:])["message"]))
            elif raw.startswith(b"data: ") and event == "end":
                break
    done.set()


@pytest.mark.slow  # over 2 s: outside the fast lane
@pytest.mark.timeout(300)
@pytest.mark.server_process("measures the server process's memory")
def test_three_10_mib_lines_are_cut_to_the_line_limit_and_server_memory_stays_bounded(own_server):
    srv, client, agent = own_server()
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    proc = psutil.Process(srv.proc.pid)
    got, done = [], threading.Event()
    follower = threading.Thread(target=_follow, args=(srv, t["id"], got, done), daemon=True)
    follower.start()
    rss_before = proc.memory_info().rss
    huge = "x" * (10 * 1024 * 1024)
    for seq in range(3):
        r = agent.logs_raw(t["id"], seq, [{"ts": time.time(), "level": "info", "stream": "stdout", "message": huge}])
        assert r.status_code == 200 and r.json() == {"acked": seq}, r.text[:300]
    poll_for(lambda: len(got) == 3, timeout=30, what="the follower's three lines")
    agent.state_raw(t["id"], "finished", exit_code=0)
    assert done.wait(30), "the follower did not see the end"
    growth = proc.memory_info().rss - rss_before
    print(f"server RSS growth over three 10 MiB lines with a follower: {growth / 2**20:.1f} MiB")
    assert growth < 200 * 2**20, growth
    lines = client.get_logs(t["id"])["lines"]
    assert [ln["seq"] for ln in lines] == [0, 1, 2]
    for ln in lines:
        assert ln["message"].startswith("x" * MAX_LINE) and "line cut by the server" in ln["message"]
        assert f"{len(huge) - MAX_LINE} more bytes dropped" in ln["message"]
        assert len(ln["message"]) < MAX_LINE + 200
    assert got == [len(lines[0]["message"])] * 3
    assert _metric(srv, "sly_log_lines_cut_total") == 3


def test_a_line_with_huge_fields_keeps_its_message_and_drops_the_fields(own_server):
    srv, client, agent = own_server()
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    line = {"ts": time.time(), "message": "épsilon " * 3000, "blob": "y" * (MAX_LINE + 10)}
    assert agent.logs_raw(t["id"], 0, [line]).json() == {"acked": 0}
    (stored,) = client.get_logs(t["id"])["lines"]
    assert "blob" not in stored and stored["message"].startswith("épsilon " * 3000)  # under the limit: whole
    assert "fields dropped by the server" in stored["message"]


def test_the_log_quota_stores_one_marker_acks_everything_and_counts(own_server):
    srv, client, agent = own_server("--log-quota-bytes", "1000")
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    assert agent.logs_raw(t["id"], 0, _lines(0, 5, size=100)).json() == {"acked": 4}
    assert agent.logs_raw(t["id"], 0, _lines(0, 5, size=100)).json() == {"acked": 4}  # re-sent: not charged again
    assert agent.logs_raw(t["id"], 5, _lines(5, 25, size=100)).json() == {"acked": 29}  # acked, mostly dropped
    assert agent.logs_raw(t["id"], 30, _lines(30, 10, size=100)).json() == {"acked": 39}
    lines = client.get_logs(t["id"])["lines"]
    assert [ln["seq"] for ln in lines] == list(range(11))
    assert [ln["message"] for ln in lines[:10]] == [f"{i:0100d}" for i in range(10)]
    assert lines[10]["message"] == QUOTA_MARKER % 1000 == "log quota of 1000 bytes reached; later lines are dropped"
    assert lines[10]["level"] == "warning"
    assert client.get_task(t["id"])["log_bytes"] >= 1000
    assert _metric(srv, "sly_log_lines_dropped_total") == 30  # seq 10 (the marker's) .. 39
    assert _metric(srv, "sly_log_bytes_stored_total") == 1000 + len(lines[10]["message"])
    # A follower of the finished task reaches its end although nothing is stored past seq 10.
    agent.state_raw(t["id"], "finished", exit_code=0)
    got, done = [], threading.Event()
    threading.Thread(target=_follow, args=(srv, t["id"], got, done), daemon=True).start()
    assert done.wait(20) and len(got) == 11


def _project(client, *blobs: bytes) -> tuple[dict, list[str]]:
    shas = [client.upload_bytes(b) for b in blobs]
    p = client.session.post(
        f"{client.base}/api/v1/projects",
        json={
            "name": "p",
            "datasets": [
                {
                    "name": "ds",
                    "items": [
                        {"name": f"i{n}.bin", "sha256": h, "size": len(b)}
                        for n, (h, b) in enumerate(zip(shas, blobs, strict=True))
                    ],
                }
            ],
        },
    ).json()
    return p, shas


def test_an_agent_reads_only_the_blobs_of_its_own_tasks(own_server):
    srv, client, node_a = own_server(name="node-a")
    from tests.support.fake_agent import FakeAgent

    b = client.create_agent("node-b")
    node_b = FakeAgent(srv.url, b["token"], b["id"])
    project, (item,) = _project(client, b"item of A's project")
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    t = client.create_task(node_a.id, "inference", image="x:1", project_id=project["id"])
    assert node_a.poll()["tasks"][0]["id"] == t["id"]
    url = f"{srv.url}/agent/v1/blobs/"
    assert node_a.s.get(url + item).content == b"item of A's project"
    assert node_a.s.head(url + item).status_code == 200
    for sha in (item, missing):  # B cannot tell A's blob from one that does not exist
        r = node_b.s.get(url + sha)
        assert r.status_code == 404 and r.json() == {"error": "blob_not_found", "detail": f"no blob {sha}"}
        assert node_b.s.head(url + sha).status_code == 404
    # A node reads back what it uploaded; another node does not.
    out = b"A's result"
    out_sha = hashlib.sha256(out).hexdigest()
    assert node_a.s.put(url + out_sha, data=out).status_code == 200
    assert node_a.s.get(url + out_sha).content == out and node_b.s.get(url + out_sha).status_code == 404
    # B uploading the same bytes proves it has them: then it may read them too.
    assert node_b.s.put(url + out_sha, data=out).json()["created"] is False
    assert node_b.s.get(url + out_sha).content == out
    # Once A's task is over, its inputs are not A's to read any more; the user reads everything.
    node_a.state_raw(t["id"], "running")
    node_a.state_raw(t["id"], "finished", exit_code=0)
    assert node_a.s.get(url + item).status_code == 404
    assert client.download_blob(item) == b"item of A's project"


def _store_path(srv, sha: str):
    return srv.data_dir / "blobs" / sha[:2] / sha[2:5] / sha


@pytest.mark.slow
def test_unreferenced_blobs_and_partial_uploads_are_collected_after_the_grace(own_server):
    srv, client, agent = own_server("--blob-grace-s", "2")
    project, (kept_item,) = _project(client, b"a project's item")
    model_file = client.upload_bytes(b"a model's file")
    client.session.post(
        f"{srv.url}/api/v1/models", json={"name": "m", "files": [{"path": "w.bin", "sha256": model_file, "size": 14}]}
    ).raise_for_status()
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    artifact = hashlib.sha256(b"an artifact").hexdigest()
    agent.s.put(f"{srv.url}/agent/v1/blobs/{artifact}", data=b"an artifact").raise_for_status()
    r = agent.post_raw(
        f"/agent/v1/tasks/{t['id']}/results",
        json={"kind": "artifacts", "files": [{"path": "out/a.txt", "sha256": artifact, "size": 11}]},
    )
    assert r.status_code == 200, r.text
    orphan = client.upload_bytes(b"uploaded, never referenced")
    agent_only = hashlib.sha256(b"an agent's upload, never posted").hexdigest()
    agent.s.put(f"{srv.url}/agent/v1/blobs/{agent_only}", data=b"an agent's upload, never posted").raise_for_status()
    partial = srv.data_dir / "blobs" / "tmp" / "abandoned.part"
    partial.write_bytes(b"half an upload")
    old = time.time() - 3600
    os.utime(partial, (old, old))
    poll_for(
        lambda: not _store_path(srv, orphan).exists() and not _store_path(srv, agent_only).exists(),
        timeout=30,
        what="the collector to delete the unreferenced blobs",
    )
    assert not partial.exists()
    for sha in (kept_item, model_file, artifact):
        assert _store_path(srv, sha).exists(), sha
    assert client.download_blob(kept_item) == b"a project's item"
    assert not client.blob_exists(orphan)
    assert _metric(srv, "sly_blobs_collected_total") >= 2
    # A blob uploaded again is young again: the grace starts over.
    again = client.upload_bytes(b"uploaded twice")
    aged = time.time() - 1.0  # within the 2 s grace, so the collector leaves it be
    os.utime(_store_path(srv, again), (aged, aged))
    assert client.session.put(f"{srv.url}/api/v1/blobs/{again}", data=b"uploaded twice").json()["created"] is False
    assert _store_path(srv, again).stat().st_mtime > aged + 0.5


def test_the_blob_quota_refuses_with_507_and_keeps_nothing(own_server):
    srv, client, _agent = own_server("--blob-quota-bytes", "300000")
    first = os.urandom(200_000)
    client.upload_bytes(first)
    second = os.urandom(150_000)
    sha = hashlib.sha256(second).hexdigest()
    r = client.session.put(f"{srv.url}/api/v1/blobs/{sha}", data=second)
    assert r.status_code == 507 and r.json()["error"] == "blob_quota_exceeded", r.text
    assert "quota of 300000" in r.json()["detail"]

    def chunks():  # no content-length: refused while it streams
        for i in range(0, len(second), 16_384):
            yield second[i : i + 16_384]

    r = client.session.put(f"{srv.url}/api/v1/blobs/{sha}", data=chunks())
    assert r.status_code == 507, r.text
    assert not _store_path(srv, sha).exists()
    assert list((srv.data_dir / "blobs" / "tmp").iterdir()) == []
    assert client.upload_bytes(first)  # already there: no new bytes, no 507
    assert client.upload_bytes(b"small enough") and client.blob_exists(hashlib.sha256(b"small enough").hexdigest())
    srv.stop()
    srv.start()  # the usage is measured again at start
    assert client.session.put(f"{srv.url}/api/v1/blobs/{sha}", data=second).status_code == 507


@pytest.mark.slow
@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_an_upgraded_database_gets_blob_references_and_log_bytes(tmp_path):
    from tests.support.server import ServerProcess

    path = tmp_path / "data" / "server.db"
    path.parent.mkdir()
    engine = db.make_engine(f"sqlite:///{path}")
    item, weights, art = (hashlib.sha256(x).hexdigest() for x in (b"i", b"w", b"a"))
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), migrate.INITIAL)
        conn.exec_driver_sql(
            "INSERT INTO projects (id, name, datasets, created_at) VALUES (1, 'p', ?, 0)",
            (json.dumps([{"name": "ds", "items": [{"name": "a", "sha256": item, "size": 1}]}]),),
        )
        conn.exec_driver_sql(
            "INSERT INTO models (id, name, hash, files, created_at) VALUES (1, 'm', 'h', ?, 0)",
            (json.dumps([{"path": "w", "sha256": weights, "size": 1}]),),
        )
        conn.exec_driver_sql(
            "INSERT INTO tasks (id, agent_id, type, config, resources, state, stop_requested, timeline, results, "
            "log_acked, created_at, updated_at) VALUES (7, 1, 'custom', '{}', '{}', 'finished', 0, '[]', ?, 0, 0, 0)",
            (json.dumps({"artifacts": [{"path": "x", "sha256": art, "size": 1}]}),),
        )
        conn.exec_driver_sql("INSERT INTO log_lines (task_id, seq, message, extra) VALUES (7, 0, 'hello', '{\"a\":1}')")
    engine.dispose()
    srv = ServerProcess(tmp_path / "data").start()
    try:
        engine = db.make_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            refs = set(conn.exec_driver_sql("SELECT sha256, kind, owner_id FROM blob_refs").all())
            assert refs == {(item, "project", 1), (weights, "model", 1), (art, "result", 7)}
            assert conn.exec_driver_sql("SELECT log_bytes FROM tasks WHERE id = 7").scalar() == 5 + 7
        engine.dispose()
    finally:
        srv.stop()
