"""Protocol v1 conformance against the real server subprocess over loopback HTTP."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import time

import pytest
import requests

from protocol.errors import APIError
from tests.support.procs import poll_for
from tests.support.server import dataset_counts


def _upload(agent, data: bytes) -> str:
    """The agent uploads the bytes itself: its results may name only blobs it may read."""
    sha = hashlib.sha256(data).hexdigest()
    r = agent.s.put(f"{agent.url}/agent/v1/blobs/{sha}", data=data, timeout=30)
    assert r.status_code == 200, r.text
    return sha


def _lines(n0, n1, prefix="line"):
    return [
        {"ts": 1700000000.0 + i, "level": "info", "stream": "stdout", "message": f"{prefix} {i}"} for i in range(n0, n1)
    ]


def test_task_flow_end_to_end(client, make_agent):
    agent = make_agent("flow")
    img = client.upload_bytes(b"pixels")
    w = client.upload_bytes(b"weights")
    project = client.create_project("p", [{"name": "ds1", "items": [{"name": "a.jpg", "sha256": img, "size": 6}]}])
    model = client.create_model("m", [{"path": "w.bin", "sha256": w, "size": 7}])
    assert model["hash"] == hashlib.sha256(f"w.bin {w}\n".encode()).hexdigest()
    task = client.create_task(
        agent.id,
        "train",
        image="sly-test/busybox:latest",
        command=["sh", "-c", "echo hi"],
        project_id=project["id"],
        model_id=model["id"],
        config={"epochs": 2},
        resources={"gpus": 0, "memory": "512m", "shm_size": 1048576},
    )
    assert task["state"] == "queued"

    ans = agent.poll(free_slots=2, wait=5)
    [got] = ans["tasks"]
    assert got["id"] == task["id"] and got["command"] == ["sh", "-c", "echo hi"] and got["config"] == {"epochs": 2}
    empty_ann = {
        "description": "",
        "size": {"height": None, "width": None},
        "tags": [],
        "objects": [],
        "customBigData": {},
    }  # b"pixels" is no image: its size stays unknown
    assert got["project"]["meta"] == {"classes": [], "tags": [], "projectType": "images"}
    assert dataset_counts(got["project"]["datasets"]) == [
        {"name": "ds1", "items_count": 1}
    ]  # the items: paged by the agent
    [item] = agent.project_items(task["id"])
    assert {k: v for k, v in item.items() if k != "id"} == {
        "dataset": "ds1",
        "name": "a.jpg",
        "sha256": img,
        "size": 6,
        "ann": empty_ann,
    }
    assert (
        got["model"]["files"] == [{"path": "w.bin", "sha256": w, "size": 7}] and got["model"]["hash"] == model["hash"]
    )
    assert got["resources"] == {"gpus": 0, "cpus": None, "memory": "512m", "shm_size": 1048576}
    assert ans["settings"]["name"] == "flow"
    assert client.get_task(task["id"])["state"] == "assigned"

    tid = task["id"]
    assert agent.state_raw(tid, "preparing").status_code == 200
    assert agent.state_raw(tid, "running").status_code == 200
    r = agent.state_raw(tid, "preparing")  # running -> preparing is not an edge
    assert r.status_code == 409 and r.json()["error"] == "illegal_transition"
    r = agent.state_raw(tid, "running", progress={"current": 5, "total": 10})  # same state: progress update
    assert r.status_code == 200 and client.get_task(tid)["progress"] == {"current": 5, "total": 10}

    # logs: in order, a duplicate resend, an out-of-order batch after a gap, then the gap filled
    assert agent.logs_raw(tid, 0, _lines(0, 5)).json() == {"acked": 4}
    assert agent.logs_raw(tid, 0, _lines(0, 5)).json() == {"acked": 4}
    assert agent.logs_raw(tid, 8, _lines(8, 12)).json() == {"acked": 4}
    assert [ln["seq"] for ln in client.get_logs(tid)["lines"]] == [0, 1, 2, 3, 4]  # never past the gap
    assert agent.logs_raw(tid, 3, _lines(3, 8)).json() == {"acked": 11}
    metrics_line = {
        "message": "m",
        "event_type": "EventType.METRICS",
        "type": "train",
        "epoch": 1,
        "metrics": {"loss": 0.5},
    }
    assert agent.logs_raw(tid, 12, [metrics_line]).json() == {"acked": 12}
    assert agent.logs_raw(tid, 12, [metrics_line]).json() == {"acked": 12}
    lines = list(client.iter_logs(tid, follow=False))
    assert [ln["seq"] for ln in lines] == list(range(13))
    assert [ln["message"] for ln in lines[:12]] == [f"line {i}" for i in range(12)]
    assert lines[12]["event_type"] == "EventType.METRICS" and lines[12]["metrics"] == {"loss": 0.5}
    page = client.get_logs(tid, after=3, limit=4)
    assert [ln["seq"] for ln in page["lines"]] == [4, 5, 6, 7] and page["next"] == 7
    assert client.task_metrics(tid) == [{"seq": 12, "type": "train", "epoch": 1, "metrics": {"loss": 0.5}}]

    # results: a model, then artifacts twice (a checkpoint replaced by a newer one)
    out = _upload(agent, b"trained weights")
    assert agent.state_raw(tid, "uploading").status_code == 200
    r = agent.post_raw(
        f"/agent/v1/tasks/{tid}/results",
        json={"kind": "model", "name": "trained", "files": [{"path": "model/w.bin", "sha256": out, "size": 15}]},
    )
    assert r.status_code == 200, r.text
    ck1, ck2 = _upload(agent, b"ck1"), _upload(agent, b"ck2")
    for ck in (ck1, ck2):
        r = agent.post_raw(
            f"/agent/v1/tasks/{tid}/results",
            json={"kind": "artifacts", "files": [{"path": "ck/best.pt", "sha256": ck, "size": 3}]},
        )
        assert r.status_code == 200
    assert agent.state_raw(tid, "finished", exit_code=0).status_code == 200
    done = client.get_task(tid)
    assert done["state"] == "finished" and done["exit_code"] == 0
    assert [s["state"] for s in done["timeline"]] == [
        "queued",
        "assigned",
        "preparing",
        "running",
        "uploading",
        "finished",
    ]
    ts = [s["ts"] for s in done["timeline"]]
    assert ts == sorted(ts)
    new_model = client.get_model(done["results"]["model_id"])
    assert new_model["name"] == "trained" and new_model["files"] == [{"path": "model/w.bin", "sha256": out, "size": 15}]
    assert list(client.task_artifacts(tid)) == [{"path": "ck/best.pt", "sha256": ck2, "size": 3}]
    assert done["results"] == {
        "model_id": new_model["id"],
        "artifacts_count": 1,
        "artifacts_bytes": 3,
        "result_files": 2,
        "result_bytes": 18,
    }
    r = agent.state_raw(tid, "running")
    assert r.status_code == 409 and r.json()["error"] == "illegal_transition"  # finished -> running


def test_project_results_and_inference_files(client, make_agent):
    agent = make_agent()
    t = client.create_task(agent.id, "inference", image="x:1")
    agent.poll()
    sha = _upload(agent, b"pred")
    agent.state_raw(t["id"], "running")
    r = agent.post_raw(
        f"/agent/v1/tasks/{t['id']}/results",
        json={"kind": "project", "name": "preds", "files": [{"path": "ds/a.json", "sha256": sha, "size": 4}]},
    )
    assert r.status_code == 200, r.text
    pid = r.json()["results"]["project_id"]
    assert dataset_counts(client.get_project(pid)["datasets"]) == [{"name": "ds", "items_count": 1}]
    [item] = client.session.get(f"{client.base}/api/v1/projects/{pid}/items", timeout=10).json()["items"]
    assert (item["dataset"], item["name"], item["sha256"], item["size"]) == ("ds", "a.json", sha, 4)


def test_blobs_hash_check_range_head(server, client, make_agent):
    data = b"0123456789" * 1000
    sha = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"other").hexdigest()
    r = client.session.put(f"{server.url}/api/v1/blobs/{wrong}", data=data)
    assert r.status_code == 400 and r.json()["error"] == "hash_mismatch"
    assert not client.blob_exists(wrong)
    blob_root = server.data_dir / "blobs"
    assert not [p for p in blob_root.rglob("*") if p.is_file() and p.read_bytes() == data]  # nothing kept
    assert client.upload_bytes(data) == sha
    assert (blob_root / sha[:2] / sha[2:5] / sha).read_bytes() == data
    agent = make_agent()
    assert agent.s.head(f"{server.url}/agent/v1/blobs/{sha}").status_code == 404  # not one of its tasks' blobs
    model = client.session.post(
        f"{server.url}/api/v1/models", json={"name": "m", "files": [{"path": "w", "sha256": sha, "size": len(data)}]}
    ).json()
    client.create_task(agent.id, "train", image="x:1", model_id=model["id"])
    agent.poll()
    r = agent.s.get(f"{server.url}/agent/v1/blobs/{sha}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]
    assert agent.s.head(f"{server.url}/agent/v1/blobs/{sha}").status_code == 200
    assert agent.s.head(f"{server.url}/agent/v1/blobs/{wrong}").status_code == 404
    assert client.download_blob(sha) == data
    assert requests.get(f"{server.url}/agent/v1/blobs/{sha}").status_code == 401  # no token
    r = client.session.post(
        f"{server.url}/api/v1/models", json={"name": "m", "files": [{"path": "w", "sha256": wrong, "size": 1}]}
    )
    assert r.status_code == 400 and r.json()["error"] == "missing_blobs" and r.json()["missing"] == [wrong]


def _waiting_poll(agent, result: dict, wait=20.0, **kw):
    t0 = time.monotonic()
    result["answer"] = agent.poll(wait=wait, **kw)
    result["elapsed"] = time.monotonic() - t0
    result["t_end"] = time.monotonic()


def test_long_poll_woken_by_new_task_and_stop(server, client, make_agent):
    agent = make_agent()
    r1: dict = {}
    th = threading.Thread(target=_waiting_poll, args=(agent, r1))
    th.start()
    poll_for(lambda: client.get_agent(agent.id)["polls_open"] == 1, what="poll waiting")
    t_create = time.monotonic()
    task = client.create_task(agent.id, "custom", image="x:1")
    th.join(10)
    assert [t["id"] for t in r1["answer"]["tasks"]] == [task["id"]]
    assert r1["t_end"] - t_create < 1.0  # sanity bound only; bench/bench_server.py measures it

    agent.state_raw(task["id"], "running")
    r2: dict = {}
    th = threading.Thread(target=_waiting_poll, args=(agent, r2), kwargs={"running": [task["id"]]})
    th.start()
    poll_for(lambda: client.get_agent(agent.id)["polls_open"] == 1, what="poll waiting")
    t_stop = time.monotonic()
    client.stop_task(task["id"])
    th.join(10)
    assert r2["answer"]["stop"] == [task["id"]] and r2["answer"]["tasks"] == []
    assert r2["t_end"] - t_stop < 1.0
    # the stop is repeated until the task is final
    assert agent.poll(running=[task["id"]])["stop"] == [task["id"]]
    assert agent.state_raw(task["id"], "stopped").status_code == 200
    assert agent.poll(running=[])["stop"] == []


def test_rename_reaches_waiting_poll(client, make_agent):
    agent = make_agent("before")
    r: dict = {}
    th = threading.Thread(target=_waiting_poll, args=(agent, r), kwargs={"free_slots": 0})
    th.start()
    poll_for(lambda: client.get_agent(agent.id)["polls_open"] == 1, what="poll waiting")
    client.patch_agent(agent.id, name="after")
    th.join(10)
    assert r["answer"]["settings"]["name"] == "after" and r["elapsed"] < 5


def test_stop_queued_and_slots_gpus_rehand(client, make_agent):
    agent = make_agent()
    q = client.create_task(agent.id, "custom", image="x:1")
    assert client.stop_task(q["id"])["state"] == "stopped"
    with pytest.raises(APIError) as e:
        client.stop_task(q["id"])
    assert e.value.status == 409
    big = client.create_task(agent.id, "train", image="x:1", resources={"gpus": 2})
    a = client.create_task(agent.id, "custom", image="x:1")
    b = client.create_task(agent.id, "custom", image="x:1")
    assert [t["id"] for t in agent.poll(free_slots=1, free_gpus=[0])["tasks"]] == [a["id"]]  # big needs 2 GPUs
    # a restarted agent (nothing running) gets `a` back at once, and b fills the other slot
    again = agent.poll(free_slots=2, free_gpus=[0, 1], running=[])
    assert [t["id"] for t in again["tasks"]] == [a["id"], big["id"]]
    agent.state_raw(a["id"], "running")
    third = agent.poll(free_slots=2, running=[a["id"], big["id"]])
    assert [t["id"] for t in third["tasks"]] == [b["id"]]
    # running a, but the agent lost it: handed out again as assigned, and may go straight to running
    agent.poll(free_slots=0, running=[big["id"], b["id"]])
    r = agent.poll(free_slots=1, running=[big["id"], b["id"]])
    assert [t["id"] for t in r["tasks"]] == [a["id"]] and client.get_task(a["id"])["state"] == "assigned"
    assert agent.state_raw(a["id"], "running").status_code == 200


def test_auth_and_ownership_errors(server, client, make_agent):
    a1, a2 = make_agent("one", ["custom"]), make_agent("two")
    r = client.session.post(f"{server.url}/api/v1/tasks", json={"agent_id": a1.id, "type": "train", "image": "x"})
    assert r.status_code == 409 and r.json()["error"] == "type_not_allowed"
    r = client.session.post(f"{server.url}/api/v1/tasks", json={"agent_id": a1.id, "type": "bake", "image": "x"})
    assert r.status_code == 400 and r.json()["error"] == "unknown_type"
    r = client.session.post(f"{server.url}/api/v1/tasks", json={"agent_id": 999999, "type": "custom", "image": "x"})
    assert r.status_code == 404 and r.json()["error"] == "agent_not_found"
    r = client.session.post(
        f"{server.url}/api/v1/tasks",
        json={"agent_id": a1.id, "type": "custom", "image": "x", "resources": {"gpus": "many"}},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    t = client.create_task(a1.id, "custom", image="x:1")
    r = requests.post(f"{server.url}/agent/v1/poll", json={}, headers={"x-token": "A" * 32})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert requests.get(f"{server.url}/api/v1/agents", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert requests.get(f"{server.url}/api/v1/agents").status_code == 401
    r = a2.state_raw(t["id"], "running")
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    assert a2.logs_raw(t["id"], 0, _lines(0, 1)).status_code == 404
    # rotation: the old token stops working at once
    new = client.rotate_token(a2.id)
    assert new["token"] != a2.token and new["token"] in new["run_command"]["run_sh"]
    # ... and only as ACCESS_TOKEN: no path names it (task containers see the storage path)
    assert (
        new["run_command"]["docker"].count(new["token"]) == 1
        and f"ACCESS_TOKEN={new['token']}" in new["run_command"]["docker"]
    )
    assert a2.post_raw("/agent/v1/poll", json={}).status_code == 401


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\\b", "a\x00b", "", "a/../../b", "./a"])
def test_path_like_names_rejected(server, client, make_agent, bad):
    agent = make_agent()
    sha = _upload(agent, b"item")
    r = client.session.post(
        f"{server.url}/api/v1/projects",
        json={"name": "p", "datasets": [{"name": "ds", "items": [{"name": bad, "sha256": sha, "size": 4}]}]},
    )
    assert r.status_code == 400 and r.json()["error"] in ("bad_name", "nul_character")
    r = client.session.post(
        f"{server.url}/api/v1/projects", json={"name": "p", "datasets": [{"name": bad or "..", "items": []}]}
    )
    assert r.status_code == 400 and r.json()["error"] in ("bad_name", "nul_character")
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    r = agent.post_raw(
        f"/agent/v1/tasks/{t['id']}/results",
        json={"kind": "artifacts", "files": [{"path": bad, "sha256": sha, "size": 4}]},
    )
    assert r.status_code == 400 and r.json()["error"] in ("bad_name", "nul_character")
    assert client.get_task(t["id"])["results"]["artifacts_count"] == 0  # nothing half-written
    assert list(client.task_artifacts(t["id"])) == []


def test_bad_bodies_are_json_errors(server, client, make_agent):
    agent = make_agent()
    t = client.create_task(agent.id, "custom", image="x:1")
    r = client.session.post(
        f"{server.url}/api/v1/agents", data=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = agent.post_raw(f"/agent/v1/tasks/{t['id']}/logs", data=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = client.session.post(f"{server.url}/api/v1/agents", json={"name": "x" * 2_000_000})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    # chunked (no content-length) is counted as it streams
    r = client.session.post(
        f"{server.url}/api/v1/agents",
        data=iter([b'{"name": "' + b"x" * 600_000, b"y" * 600_000 + b'"}']),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = client.session.get(f"{server.url}/api/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.session.delete(f"{server.url}/api/v1/tasks")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
    # logs may be large (32 MiB) and gzip-compressed
    big = {"first_seq": 0, "lines": [{"message": "x" * 1000} for _ in range(3000)]}
    r = agent.post_raw(
        f"/agent/v1/tasks/{t['id']}/logs",
        data=gzip.compress(json.dumps(big).encode()),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 200 and r.json() == {"acked": 2999}


@pytest.mark.slow
def test_lease_expiry_makes_task_lost(own_server):
    srv, c, agent = own_server("--lease-s", "1", "--offline-after-s", "1", name="silent")
    t = c.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    assert c.get_agent(agent.id)["status"] == "online"
    lost = c.wait_task(t["id"], {"lost"}, timeout=15)
    poll_for(lambda: c.get_agent(agent.id)["status"] == "offline", what="agent offline")
    assert "silent" in lost["error"] and lost["timeline"][-1]["state"] == "lost"
    # the agent comes back still running it: it is told to stop, and cannot revive it
    assert agent.poll(running=[t["id"]])["stop"] == [t["id"]]
    assert agent.state_raw(t["id"], "running").status_code == 409


def test_sse_follow_delivers_lines_live(client, make_agent):
    agent = make_agent()
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    agent.logs_raw(t["id"], 0, _lines(0, 2))
    got: list = []
    done = threading.Event()

    def follow():
        for line in client.iter_logs(t["id"], follow=True, timeout=30):
            got.append(line)
        done.set()

    th = threading.Thread(target=follow, daemon=True)
    th.start()
    poll_for(lambda: len(got) == 2, what="first lines")
    agent.logs_raw(t["id"], 2, _lines(2, 5))
    poll_for(lambda: len(got) == 5, what="live lines")
    assert not done.is_set()  # the task is still running: the stream stays open
    agent.state_raw(t["id"], "finished", exit_code=0)
    assert done.wait(10)
    assert [ln["seq"] for ln in got] == [0, 1, 2, 3, 4]


def test_telemetry_status_session_and_metrics(server, client, make_agent):
    agent = make_agent("tele")
    r = agent.post_raw("/agent/v1/connect", json={"hostname": "h1", "cpus": 4})
    assert r.status_code == 200 and r.json()["agent"]["id"] == agent.id
    for i in range(3):
        assert agent.post_raw("/agent/v1/telemetry", json={"cpu": i}).status_code == 200
    a = client.get_agent(agent.id)
    assert a["status"] == "online" and a["telemetry"]["cpu"] == {"percent": 2} and a["system_info"]["hostname"] == "h1"
    hist = client.agent_telemetry(agent.id)
    assert [s["cpu"] for s in hist] == [0, 1, 2]
    assert client.agent_telemetry(agent.id, since=hist[1]["ts"])[0]["cpu"] == 2
    # console sign-in: cookie instead of bearer
    s = requests.Session()
    s.headers["Origin"] = server.url  # as the console's own pages send it
    assert s.post(f"{server.url}/api/v1/session", json={"token": "wrong"}).status_code == 401
    r = s.post(f"{server.url}/api/v1/session", json={"token": server.admin_token})
    assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
    assert s.get(f"{server.url}/api/v1/agents").status_code == 200
    s.delete(f"{server.url}/api/v1/session")
    assert s.get(f"{server.url}/api/v1/agents").status_code == 401
    text = requests.get(f"{server.url}/metrics").text
    for name in (
        "sly_agents_online",
        "sly_tasks{state=\"queued\"}",
        "sly_longpolls_open",
        "sly_log_lines_ingested_total",
        "sly_event_loop_lag_seconds_count",
    ):
        assert name in text
    assert requests.get(f"{server.url}/openapi.json").json()["paths"]["/agent/v1/poll"]


@pytest.mark.sqlite_only("reads the server's data dir, where only SQLite keeps the database")
@pytest.mark.server_process("reads the server's log file")
def test_no_agent_token_on_disk(own_server):
    server, client, agent = own_server(name="secret")
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.post_raw("/agent/v1/connect", json={"hostname": "h"})
    agent.poll()
    agent.logs_raw(t["id"], 0, _lines(0, 3))
    rotated = client.rotate_token(agent.id)["token"]
    files = [p for p in server.data_dir.rglob("*") if p.is_file()] + [server.log_path]
    assert any(p.name == "server.db" for p in files)
    for p in files:
        blob = p.read_bytes()
        assert agent.token.encode() not in blob and rotated.encode() not in blob, p


@pytest.mark.slow
def test_restart_gives_agents_a_full_lease_and_keeps_data(own_server):
    # A lease long enough that a slow start on a loaded machine (the suite runs on several
    # workers) still leaves the agent time after the restart's renewal: 2 s flaked under load.
    srv, c, agent = own_server("--lease-s", "6")
    t = c.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    agent.logs_raw(t["id"], 0, _lines(0, 3))
    srv.stop()
    time.sleep(6.5)  # the server is down longer than the lease
    srv.start()
    time.sleep(2.0)  # the reaper has run (every lease/4) but the agent still has time
    assert c.get_task(t["id"])["state"] == "running"
    assert agent.poll(running=[t["id"]])["tasks"] == []
    assert [ln["seq"] for ln in c.get_logs(t["id"])["lines"]] == [0, 1, 2]
    assert agent.logs_raw(t["id"], 2, _lines(2, 4)).json() == {"acked": 3}


def test_results_posted_again_after_an_agent_restart_make_no_second_model_or_project(client, make_agent):
    agent = make_agent()
    t = client.create_task(agent.id, "train", image="x:1")
    agent.poll()
    agent.state_raw(t["id"], "running")
    w1, w2 = _upload(agent, b"weights v1"), _upload(agent, b"weights v2")
    body = {"kind": "model", "name": "m", "files": [{"path": "w.bin", "sha256": w1, "size": 10}]}
    first = agent.post_raw(f"/agent/v1/tasks/{t['id']}/results", json=body).json()["results"]["model_id"]
    again = agent.post_raw(f"/agent/v1/tasks/{t['id']}/results", json=body).json()["results"]["model_id"]
    assert again == first
    models_before = len(client.list_models())
    body["files"][0]["sha256"] = w2  # different files: a new model, which becomes the task's
    other = agent.post_raw(f"/agent/v1/tasks/{t['id']}/results", json=body).json()["results"]["model_id"]
    assert other != first and len(client.list_models()) == models_before + 1
    proj = {"kind": "project", "name": "p", "files": [{"path": "ds/a.json", "sha256": w1, "size": 10}]}
    p1 = agent.post_raw(f"/agent/v1/tasks/{t['id']}/results", json=proj).json()["results"]["project_id"]
    p2 = agent.post_raw(f"/agent/v1/tasks/{t['id']}/results", json=proj).json()["results"]["project_id"]
    assert p1 == p2


def test_console_sessions_and_telemetry_history_survive_a_restart(own_server):
    from sqlalchemy import create_engine, text

    srv, client, agent = own_server("--telemetry-min-gap-s", "0")
    for i in range(5):
        assert agent.post_raw("/agent/v1/telemetry", json={"cpu": i}).status_code == 200
    console = requests.Session()
    console.headers["Origin"] = srv.url
    assert console.post(f"{srv.url}/api/v1/session", json={"token": srv.admin_token}).status_code == 200
    sid = console.cookies.get("sly_session")
    srv.stop()
    srv.start()
    assert console.get(f"{srv.url}/api/v1/agents").status_code == 200, "signed out by a restart"
    assert [s["cpu"] for s in client.agent_telemetry(agent.id)] == [0, 1, 2, 3, 4]
    engine = create_engine(srv.db_url)
    try:
        with engine.connect() as db:
            assert db.execute(text("select count(*) from console_sessions")).scalar() == 1
            assert not db.execute(
                text("select 1 from console_sessions where id_hash = :s"), {"s": sid}
            ).fetchall()  # hashed
    finally:
        engine.dispose()
    console.delete(f"{srv.url}/api/v1/session")
    assert console.get(f"{srv.url}/api/v1/agents").status_code == 401
