"""A task's artifacts are rows: a post costs its own entries, the task stays small, the list is
paged; per-task results limits; the blob store's default quota."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time

import pytest
import requests
import uvicorn
from sqlalchemy import event

from server.app import create_app
from server.settings import Settings
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import TEST_DB_URL, create_test_database, drop_test_databases, free_port

ARTIFACTS = "/api/v1/tasks/{}/artifacts"


def _upload(agent: FakeAgent, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    r = agent.s.put(f"{agent.url}/agent/v1/blobs/{sha}", data=data, timeout=30)
    assert r.status_code == 200, r.text
    return sha


def _running_task(client, agent: FakeAgent, ttype="custom") -> int:
    tid = client.create_task(agent.id, ttype, image="x:1")["id"]
    agent.poll()
    assert agent.state_raw(tid, "running").status_code == 200
    return tid


def _post(agent: FakeAgent, tid: int, kind: str, files: list[dict], **kw) -> requests.Response:
    return agent.post_raw(f"/agent/v1/tasks/{tid}/results", json={"kind": kind, "files": files, **kw}, timeout=120)


def _arts(paths, sha: str, size: int) -> list[dict]:
    return [{"path": p, "sha256": sha, "size": size} for p in paths]


@pytest.fixture
def inproc(tmp_path):
    """(base url, admin token, state): the app served by uvicorn in a thread of this process."""
    db_url = create_test_database() if TEST_DB_URL else None
    token = "a" * 32
    app = create_app(Settings(data_dir=tmp_path / "data", admin_token=token, db_url=db_url))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    poll_for(lambda: server.started or not thread.is_alive(), timeout=30, what="the in-process server to start")
    assert server.started
    try:
        yield f"http://127.0.0.1:{server.config.port}", token, app.state.server
    finally:
        server.should_exit = True
        thread.join(30)
        if db_url:
            from sqlalchemy.engine import make_url

            drop_test_databases([make_url(db_url).database])


def test_a_post_costs_its_entries_not_the_artifacts_the_task_holds(inproc):
    from client import UserClient

    url, token, state = inproc
    client = UserClient(url, token)
    a = client.create_agent("many-artifacts")
    agent = FakeAgent(url, a["token"], a["id"])
    tid = _running_task(client, agent)
    sha = _upload(agent, b"x")
    sent = {"statements": 0, "bytes": 0}

    @event.listens_for(state.db.engine, "before_cursor_execute")
    def _count(_conn, _cursor, statement, params, _context, _many):
        sent["statements"] += 1
        sent["bytes"] += len(statement) + len(repr(params))

    def cost_of_one_post(i: int) -> dict:
        sent.update(statements=0, bytes=0)
        r = _post(agent, tid, "artifacts", _arts([f"live/{i:03d}.txt"], sha, 1))
        assert r.status_code == 200, r.text
        return dict(sent)

    first = cost_of_one_post(0)
    for start in range(0, 20_000, 5_000):  # the task now holds 20,000 artifacts
        r = _post(agent, tid, "artifacts", _arts((f"bulk/{i:05d}.txt" for i in range(start, start + 5_000)), sha, 1))
        assert r.status_code == 200, r.text
    later = cost_of_one_post(1)
    # Before, every post rewrote the task's results JSON with every artifact: 2.2 MB of SQL here.
    # (The margin is for the server's own background writes, which may fall in either post.)
    assert later["bytes"] < first["bytes"] + 2_000, (first, later)
    task = client.get_task(tid)
    assert task["results"]["artifacts_count"] == 20_002 and task["results"]["artifacts_bytes"] == 20_002
    assert len(requests.get(f"{url}/api/v1/tasks", headers={"Authorization": f"Bearer {token}"}).content) < 2_000


def test_artifacts_are_paged_by_path_and_a_path_posted_again_replaces_its_entry(server, client, make_agent):
    agent = make_agent("pager")
    tid = _running_task(client, agent)
    small, big = _upload(agent, b"v1"), _upload(agent, b"version 2")
    paths = [f"out/{i:02d}.txt" for i in range(25)]
    assert _post(agent, tid, "artifacts", _arts(paths[::-1], small, 2)).status_code == 200  # in any order
    r = _post(agent, tid, "artifacts", _arts(["out/07.txt"], big, 9))
    assert r.status_code == 200 and r.json()["results"]["artifacts_count"] == 25
    assert r.json()["results"]["artifacts_bytes"] == 24 * 2 + 9 == r.json()["results"]["result_bytes"]
    assert "artifacts" not in r.json()["results"]
    admin = server.admin()
    got, after = [], None
    while True:
        page = admin.get(server.url + ARTIFACTS.format(tid), params={"limit": 10, "after": after}, timeout=10).json()
        assert len(page["items"]) <= 10
        got += page["items"]
        after = page["next"]
        if after is None:
            break
    assert [g["path"] for g in got] == paths
    assert got[7] == {"path": "out/07.txt", "sha256": big, "size": 9} and got[8]["sha256"] == small
    assert list(client.task_artifacts(tid, page_size=7)) == got
    r = admin.get(server.url + ARTIFACTS.format(10**6), timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    for bad in ({"limit": 0}, {"limit": 10_001}, {"after": "a\x00b"}, {"after": "x" * 1025}):
        r = admin.get(server.url + ARTIFACTS.format(tid), params=bad, timeout=10)
        assert 400 <= r.status_code < 500 and "error" in r.json(), (bad, r.text)
    assert "/api/v1/tasks/{task_id}/artifacts" in admin.get(server.url + "/openapi.json", timeout=10).json()["paths"]


def test_results_are_limited_per_task_in_files_and_bytes(own_server):
    srv, client, agent = own_server("--results-max-files", "5", "--results-max-bytes", "100")
    tid = _running_task(client, agent, "train")
    ten, forty = _upload(agent, b"0123456789"), _upload(agent, b"x" * 40)
    assert _post(agent, tid, "artifacts", _arts(["a", "b", "c"], ten, 10)).status_code == 200
    r = _post(agent, tid, "artifacts", _arts(["d", "e", "f"], ten, 10))
    assert r.status_code == 413 and r.json()["error"] == "results_limit" and "5 files" in r.json()["detail"]
    assert _post(agent, tid, "artifacts", _arts(["a"], ten, 10)).status_code == 200  # a replaced path adds none
    assert _post(agent, tid, "model", _arts(["w1", "w2"], ten, 10)).status_code == 200  # 5 files, 50 bytes
    r = _post(agent, tid, "project", _arts(["ds/one.jpg"], ten, 10))
    assert r.status_code == 413 and r.json()["error"] == "results_limit"
    r = _post(agent, tid, "artifacts", _arts(["a"], forty, 40))  # 5 files, 80 bytes: fits
    assert r.status_code == 200, r.text
    r = _post(agent, tid, "artifacts", _arts(["b"], forty, 40))
    assert r.status_code == 413 and r.json()["error"] == "results_limit" and "100 bytes" in r.json()["detail"]
    results = client.get_task(tid)["results"]
    assert (results["result_files"], results["result_bytes"], results["artifacts_count"]) == (5, 80, 3)
    assert "project_id" not in results and len(list(client.task_artifacts(tid))) == 3  # nothing of the refused posts


@pytest.mark.slow
def test_replaced_and_deleted_artifacts_let_their_blobs_go(own_server):
    srv, client, agent = own_server("--blob-grace-s", "2")
    tid = _running_task(client, agent)
    old, new, kept = _upload(agent, b"old version"), _upload(agent, b"new version"), _upload(agent, b"kept")
    assert _post(agent, tid, "artifacts", _arts(["log.txt"], old, 11) + _arts(["k.txt"], kept, 4)).status_code == 200
    assert _post(agent, tid, "artifacts", _arts(["log.txt"], new, 11)).status_code == 200
    store = srv.data_dir / "blobs"

    def stored(h: str) -> bool:
        return (store / h[:2] / h[2:5] / h).exists()

    # Re-posting one path with ever new blobs keeps only the newest: the others are collected.
    poll_for(lambda: not stored(old), timeout=30, what="the replaced artifact's blob to be collected")
    time.sleep(3)  # past the grace: a referenced blob stays however old it gets
    assert stored(new) and stored(kept)
    assert agent.state_raw(tid, "finished", exit_code=0).status_code == 200
    answer = client.delete_task(tid)
    assert answer["deleted"]["artifacts"] == 2
    poll_for(
        lambda: not stored(new) and not stored(kept), timeout=30, what="a deleted task's artifacts to be collected"
    )
    r = requests.get(
        srv.url + ARTIFACTS.format(tid), headers={"Authorization": f"Bearer {srv.admin_token}"}, timeout=10
    )
    assert r.status_code == 404


def test_the_blob_store_has_a_quota_by_default(tmp_path):
    from server.__main__ import parse_args
    from server.blobs.store import BlobStore

    assert parse_args([]).blob_quota_bytes is None and Settings().blob_quota_bytes is None
    store = BlobStore(tmp_path / "blobs", quota=Settings().blob_quota_bytes)
    assert store.quota == int(shutil.disk_usage(tmp_path).total * 0.8) > 0
    assert BlobStore(tmp_path / "other", quota=0).quota == 0  # 0 still turns it off
