"""Strict input and safe output: each hostile value that once poisoned the database or answered 500.

Every test shows the old failure is gone: the value is refused with a 400 (nothing stored), or,
where it is a metric, stored as null; and a row holding such a value written straight into the
database (as an older server did) never makes a read answer 500.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import stat

import pytest
import requests

from protocol import endpoints
from tests.support.procs import poll_for

BIG = 2**63
JSON = {"content-type": "application/json"}


def _raw(agent_or_session, url: str, body: str) -> requests.Response:
    """POST a body written by hand (NaN and 1e400 are what a lax client's json.dumps sends)."""
    s = agent_or_session.s if hasattr(agent_or_session, "s") else agent_or_session
    return s.post(url, data=body.encode(), headers=JSON, timeout=30)


def _db(server) -> sqlite3.Connection:
    return sqlite3.connect(server.data_dir / "server.db")


def _leased_task(client, agent) -> int:
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    [got] = agent.poll(free_slots=1)["tasks"]
    assert got["id"] == tid
    return tid


# --- NaN telemetry, then the nodes list ---


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_telemetry_is_refused_and_nothing_is_stored(server, client, make_agent, bad):
    agent = make_agent("nan-telemetry")
    r = _raw(agent, server.url + endpoints.TELEMETRY, f'{{"cpu": {{"percent": {bad}}}, "free_slots": 1}}')
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "non_finite_number" and "finite" in r.json()["detail"]
    assert client.get_agent(agent.id)["telemetry"] is None
    r = client.session.get(f"{server.url}/api/v1/agents/{agent.id}/telemetry")
    assert r.status_code == 200 and r.json()["items"] == []


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_a_stored_nan_telemetry_sample_does_not_break_the_nodes_list(own_server):
    srv, client, agent = own_server("--telemetry-min-gap-s", "0")
    sample = {"cpu": {"percent": 1.0}, "disks": [{"path": "/", "used": 1, "total": 2, "percent": 50.0}]}
    assert agent.post_raw(endpoints.TELEMETRY, json=sample).status_code == 200
    assert client.get_agent(agent.id)["telemetry"]["cpu"] == {"percent": 1.0}

    def written():  # the contact batch is written within --contact-flush-s (a read writes nothing)
        with _db(srv) as db:
            return db.execute("SELECT count(*) FROM telemetry_history WHERE agent_id = ?", (agent.id,)).fetchone()[0]

    poll_for(written, timeout=10, what="the contact batch written")
    with _db(srv) as db:  # what an older server could store: SQLAlchemy's JSON writes NaN as NaN
        db.execute(
            "UPDATE telemetry_latest SET disks = ? WHERE agent_id = ?",
            ('[{"path": "/", "used": 1, "total": 2, "percent": NaN}]', agent.id),
        )
        db.execute("UPDATE telemetry_history SET disks = ? WHERE agent_id = ?", ("[Infinity]", agent.id))
    r = client.session.get(srv.url + endpoints.AGENTS)
    assert r.status_code == 200, r.text
    [node] = [a for a in r.json()["items"] if a["id"] == agent.id]
    assert node["telemetry"]["disks"][0]["percent"] is None
    r = client.session.get(f"{srv.url}/api/v1/agents/{agent.id}/telemetry")
    assert r.status_code == 200 and r.json()["items"][0]["disks"] == [None]


# --- a NaN metric, then the task's logs and metrics ---


def test_a_nan_metric_is_stored_as_null_and_the_logs_and_metrics_read_fine(server, client, make_agent):
    agent = make_agent("nan-metric")
    tid = _leased_task(client, agent)
    body = (
        '{"first_seq": 0, "lines": ['
        '{"ts": 1700000000.0, "level": "info", "stream": "stdout", "message": "epoch 1"},'
        '{"ts": 1700000001.0, "level": "info", "stream": "agent", "message": "metrics", "event_type": "metrics",'
        ' "type": "train", "epoch": 1, "metrics": {"loss": NaN, "acc": 0.5, "grad": -Infinity, "big": 1e400}}]}'
    )
    r = _raw(agent, server.url + endpoints.path(endpoints.TASK_LOGS, task_id=tid), body)
    assert r.status_code == 200 and r.json() == {"acked": 1}, r.text

    r = client.session.get(f"{server.url}/api/v1/tasks/{tid}/logs")
    assert r.status_code == 200, r.text
    assert r.json()["lines"][1]["metrics"] == {"loss": None, "acc": 0.5, "grad": None, "big": None}
    r = client.session.get(f"{server.url}/api/v1/tasks/{tid}/metrics")
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [
        {"seq": 1, "type": "train", "epoch": 1, "metrics": {"loss": None, "acc": 0.5, "grad": None, "big": None}}
    ]


def test_a_lone_surrogate_in_a_line_becomes_a_replacement_character_and_the_batch_is_kept(server, client, make_agent):
    # "\ud800" alone is valid JSON but not text: no database column takes it (it was a 500).
    agent = make_agent("surrogate")
    tid = _leased_task(client, agent)
    body = (
        '{"first_seq": 0, "lines": [{"message": "loss \\ud800 0.5", "level": "info\\udfff"},'
        '{"message": "pair \\ud83d\\ude00 kept"}]}'
    )
    r = _raw(agent, server.url + endpoints.path(endpoints.TASK_LOGS, task_id=tid), body)
    assert r.status_code == 200 and r.json() == {"acked": 1}, r.text
    lines = client.session.get(f"{server.url}/api/v1/tasks/{tid}/logs").json()["lines"]
    assert [ln["message"] for ln in lines] == ["loss \ufffd 0.5", "pair \U0001f600 kept"]
    assert lines[0]["level"] == "info\ufffd"


@pytest.mark.parametrize(
    "line",
    [
        '{"ts": NaN, "message": "x"}',
        '{"ts": 1e400, "message": "x"}',
        '{"message": NaN}',
        '{"message": "x", "value": Infinity}',
        '{"message": "x", "event_type": "progress", "metrics": {"loss": NaN}}',
        '{"message": "x", "event_type": "metrics", "epoch": NaN, "metrics": {}}',
    ],
)
def test_a_non_finite_number_outside_the_metric_values_refuses_the_batch(server, client, make_agent, line):
    agent = make_agent("nan-line")
    tid = _leased_task(client, agent)
    r = _raw(
        agent,
        server.url + endpoints.path(endpoints.TASK_LOGS, task_id=tid),
        f'{{"first_seq": 0, "lines": [{{"message": "ok"}}, {line}]}}',
    )
    assert r.status_code == 400 and r.json()["error"] == "non_finite_number", r.text
    assert "lines[1]" in r.json()["detail"]
    assert client.get_task(tid)["log_acked"] == -1  # nothing of the batch was kept


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_stored_non_finite_log_rows_read_as_null_in_pages_stream_and_metrics(own_server):
    srv, client, agent = own_server()
    tid = _leased_task(client, agent)
    assert agent.logs_raw(tid, 0, [{"message": "a"}, {"message": "b"}]).status_code == 200
    with _db(srv) as db:  # rows of an older server: NaN in a line's extra JSON, an infinite ts and epoch
        db.execute(
            "UPDATE log_lines SET extra = ?, ts = 9e999 WHERE task_id = ? AND seq = 1",
            ('{"event_type": "metrics", "metrics": {"loss": NaN}}', tid),
        )
        db.execute(
            "INSERT INTO task_metrics (task_id, seq, type, epoch, metrics) VALUES (?, 1, 'train', 9e999, ?)",
            (tid, '{"loss": NaN, "acc": Infinity}'),
        )
    r = client.session.get(f"{srv.url}/api/v1/tasks/{tid}/logs")
    assert r.status_code == 200, r.text
    assert r.json()["lines"][1]["ts"] is None and r.json()["lines"][1]["metrics"] == {"loss": None}
    r = client.session.get(f"{srv.url}/api/v1/tasks/{tid}/metrics")
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [{"seq": 1, "type": "train", "epoch": None, "metrics": {"loss": None, "acc": None}}]

    assert agent.state_raw(tid, "running").status_code == 200
    assert agent.state_raw(tid, "finished", exit_code=0).status_code == 200
    with client.session.get(f"{srv.url}/api/v1/tasks/{tid}/logs?follow=1", stream=True, timeout=30) as r:
        events = [ln for ln in r.iter_lines(decode_unicode=True) if ln.startswith("data: ")]
    parsed = [json.loads(e[len("data: ") :]) for e in events]  # strict JSON: NaN would not parse in a browser
    assert parsed[1]["metrics"] == {"loss": None} and parsed[-1]["state"] == "finished"


# --- a huge timeout_s ---


@pytest.mark.parametrize("timeout", ["1e400", "NaN", "Infinity", "1e300", "0", "-5"])
def test_a_huge_or_non_finite_timeout_is_refused_and_nothing_is_stored(server, client, make_agent, timeout):
    agent = make_agent("timeout")
    r = _raw(
        client.session,
        server.url + endpoints.TASKS,
        f'{{"agent_id": {agent.id:d}, "type": "custom", "image": "img", "timeout_s": {timeout}}}',
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] in ("non_finite_number", "invalid_request")
    assert "timeout_s" in r.json()["detail"] or r.json()["error"] == "non_finite_number"
    assert client.list_tasks(agent_id=agent.id) == []
    r = client.session.get(server.url + endpoints.TASKS)
    assert r.status_code == 200, r.text
    assert agent.poll(free_slots=1)["tasks"] == []


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_a_stored_infinite_timeout_neither_breaks_the_list_nor_the_nodes_poll(own_server):
    srv, client, agent = own_server()
    tid = client.create_task(agent.id, "custom", image="img", timeout_s=60)["id"]
    with _db(srv) as db:  # what an older server stored for timeout_s: 1e400
        db.execute("UPDATE tasks SET timeout_s = 9e999 WHERE id = ?", (tid,))
    r = client.session.get(srv.url + endpoints.TASKS)
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["timeout_s"] is None
    [got] = agent.poll(free_slots=1)["tasks"]
    assert got["id"] == tid and got["timeout_s"] is None


@pytest.mark.parametrize(
    "resources",
    [
        {"cpus": 1e6},
        {"gpus": 100000},
        {"memory": "0"},
        {"memory": 2**60},
        {"shm_size": "99999999999g"},
        {"memory": "1.5x"},
    ],
)
def test_resources_are_bounded(server, client, make_agent, resources):
    agent = make_agent("resources")
    r = client.session.post(
        server.url + endpoints.TASKS,
        json={"agent_id": agent.id, "type": "custom", "image": "img", "resources": resources},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    assert next(iter(resources)) in r.json()["detail"]


# --- 2^63 in ids and paging ---


def _keepalive(server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)


def _ask(conn, method, path, headers, body=None):
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null"), r.getheader("connection")


def test_integers_outside_int64_get_a_400_on_one_kept_alive_connection(server, client, make_agent):
    agent = make_agent("int64")
    tid = _leased_task(client, agent)
    user = {"authorization": f"Bearer {server.admin_token}", "content-type": "application/json"}
    node = {"x-token": agent.token, "content-type": "application/json"}
    asks = [
        ("GET", f"/api/v1/tasks/{BIG}", user, None),
        ("GET", f"/api/v1/tasks/{-BIG - 1}", user, None),
        ("GET", f"/api/v1/agents/{BIG}", user, None),
        ("GET", f"/api/v1/projects/{BIG}", user, None),
        ("GET", f"/api/v1/projects/{BIG}/stats", user, None),
        ("GET", f"/api/v1/models/{BIG}", user, None),
        ("POST", f"/api/v1/tasks/{BIG}/stop", user, None),
        ("GET", f"/api/v1/tasks?agent_id={BIG}", user, None),
        ("GET", f"/api/v1/tasks?cursor={BIG}", user, None),
        ("GET", "/api/v1/tasks?cursor=%C2%B2", user, None),  # '²': a digit to str.isdigit only
        ("GET", f"/api/v1/projects?cursor={10**30}", user, None),
        ("GET", f"/api/v1/tasks/{tid}/logs?after={BIG}", user, None),
        ("GET", f"/api/v1/tasks/{tid}/logs?limit={BIG}", user, None),
        ("POST", "/api/v1/tasks", user, json.dumps({"agent_id": BIG, "type": "custom", "image": "i"})),
        (
            "POST",
            "/api/v1/tasks",
            user,
            json.dumps({"agent_id": agent.id, "type": "custom", "image": "i", "project_id": -BIG - 1}),
        ),
        ("POST", f"/agent/v1/tasks/{BIG}/state", node, json.dumps({"state": "running"})),
        ("POST", f"/agent/v1/tasks/{tid}/state", node, json.dumps({"state": "running", "exit_code": BIG})),
        ("POST", f"/agent/v1/tasks/{tid}/logs", node, json.dumps({"first_seq": BIG, "lines": [{"message": "x"}]})),
        ("POST", f"/agent/v1/tasks/{tid}/logs", node, json.dumps({"first_seq": BIG - 1, "lines": [{}, {}]})),
        ("POST", f"/agent/v1/tasks/{tid}/logs", node, json.dumps({"first_seq": 0, "lines": [{"ts": 10**400}]})),
        ("POST", "/agent/v1/poll", node, json.dumps({"free_slots": BIG})),
        ("POST", "/agent/v1/telemetry", node, json.dumps({"disk": {"free": BIG}})),
    ]
    conn = _keepalive(server)
    for method, path, headers, body in asks:
        status, answer, connection = _ask(conn, method, path, headers, body)
        assert status == 400, (method, path, body, status, answer)
        assert answer["error"] in ("invalid_request", "integer_out_of_range", "bad_cursor"), (path, answer)
        assert connection != "close", (method, path)
    # The same connection still serves: nothing was dropped, and nothing was stored.
    status, answer, _ = _ask(conn, "GET", f"/api/v1/tasks/{tid}", user)
    assert status == 200 and answer["state"] == "assigned" and answer["log_acked"] == -1 and answer["exit_code"] is None
    status, answer, _ = _ask(conn, "GET", endpoints.TASKS, user)
    assert status == 200
    conn.close()


# --- path-like names ---

BAD_NAMES = ["../../x", "/abs", "a/b", "a\\b", "a\x00b", ".", "..", "", "x" * 256]
# C0, DEL and C1 controls: a terminal escape rewrites the CLI's listing, a newline forges a log line.
CONTROL_NAMES = ["a\x1b[2Jb", "a\nb", "a\rb", "a\tb", "a\x7fb", "a\x85b", "a\x9bb"]


@pytest.mark.parametrize("bad", BAD_NAMES + CONTROL_NAMES)
def test_path_like_project_dataset_and_model_names_are_refused(server, client, bad):
    sha = client.upload_bytes(b"named")
    item = {"name": "a.jpg", "sha256": sha, "size": 5}
    cases = [
        ("projects", {"name": bad, "datasets": [{"name": "ds", "items": [item]}]}, "name"),
        ("projects", {"name": "p", "datasets": [{"name": bad, "items": [item]}]}, "datasets.0.name"),
        ("models", {"name": bad, "files": [{"path": "w.bin", "sha256": sha, "size": 5}]}, "name"),
    ]
    for what, body, field in cases:
        before = len(client.session.get(f"{server.url}/api/v1/{what}").json()["items"])
        r = client.session.post(f"{server.url}/api/v1/{what}", json=body)
        assert r.status_code == 400 and r.json()["error"] in ("bad_name", "invalid_request", "nul_character"), (
            what,
            body,
            r.text,
        )
        if r.json()["error"] != "nul_character":  # refused before the route: a NUL anywhere
            assert r.json()["detail"].startswith(field + ":") or field in r.json()["detail"], r.json()
        assert len(client.session.get(f"{server.url}/api/v1/{what}").json()["items"]) == before


@pytest.mark.parametrize("bad", ["../../x", "/abs", "a/b", "..", "x" * 256])
def test_path_like_result_names_and_item_paths_are_refused(server, client, make_agent, bad):
    agent = make_agent("results")
    tid = _leased_task(client, agent)
    sha = client.upload_bytes(b"result")
    url = endpoints.path(endpoints.TASK_RESULTS, task_id=tid)
    for kind in ("model", "project"):
        r = agent.post_raw(
            url, json={"kind": kind, "name": bad, "files": [{"path": "ds/a.json", "sha256": sha, "size": 6}]}
        )
        assert r.status_code == 400 and r.json()["error"] in ("bad_name", "nul_character"), r.text
    r = client.session.post(
        f"{server.url}/api/v1/projects",
        json={"name": "p", "datasets": [{"name": "ds", "items": [{"name": f"sub/{bad}", "sha256": sha, "size": 6}]}]},
    )
    if bad == "a/b":
        assert r.status_code == 200, r.text  # items may sit in sub-folders, as the agent allows
    else:
        assert r.status_code == 400 and r.json()["error"] in ("bad_name", "nul_character"), r.text
    assert client.get_task(tid)["results"] == {
        "artifacts_count": 0,
        "artifacts_bytes": 0,
        "result_files": 0,
        "result_bytes": 0,
    }


def test_a_project_result_file_whose_dataset_or_item_name_is_bad_is_a_400(client, make_agent):
    """The fuzzer's find: a project result from `files` whose path splits into names the project
    checks refuse (here an empty dataset name) was a 500 (a ValidationError inside the route)."""
    agent = make_agent("results")
    tid = _leased_task(client, agent)
    sha = client.upload_bytes(b"result")
    url = endpoints.path(endpoints.TASK_RESULTS, task_id=tid)
    for path in ("/x.png", "ds/\x00.png", "ds/" + "n" * 300):
        r = agent.post_raw(url, json={"kind": "project", "files": [{"path": path, "sha256": sha, "size": 6}]})
        assert r.status_code == 400 and r.json()["error"] in ("bad_name", "invalid_request", "nul_character"), (
            path,
            r.text,
        )


@pytest.mark.parametrize("bad", CONTROL_NAMES)
def test_names_with_control_characters_are_refused(server, client, make_agent, bad):
    s = client.session
    r = s.post(f"{server.url}/api/v1/agents", json={"name": bad})
    assert r.status_code == 400 and r.json()["error"] == "bad_name" and "control character" in r.json()["detail"], (
        r.text
    )
    agent = make_agent("plain")
    r = s.patch(f"{server.url}/api/v1/agents/{agent.id}", json={"name": bad})
    assert r.status_code == 400 and r.json()["error"] == "bad_name", r.text
    assert client.get_agent(agent.id)["name"] == "plain"
    sha = client.upload_bytes(b"ctl")
    for body in (
        {"name": "p", "datasets": [{"name": "ds", "items": [{"name": bad, "sha256": sha, "size": 3}]}]},
        {"name": "p", "datasets": [{"name": "ds", "items": [{"name": f"sub/{bad}", "sha256": sha, "size": 3}]}]},
    ):
        r = s.post(f"{server.url}/api/v1/projects", json=body)
        assert r.status_code == 400 and r.json()["error"] == "bad_name", r.text
    r = s.post(f"{server.url}/api/v1/models", json={"name": "m", "files": [{"path": bad, "sha256": sha, "size": 3}]})
    assert r.status_code == 400 and r.json()["error"] == "bad_name", r.text
    tid = _leased_task(client, agent)
    for kind in ("model", "artifacts"):
        r = agent.post_raw(
            endpoints.path(endpoints.TASK_RESULTS, task_id=tid), json={"kind": kind, "name": bad, "files": []}
        )
        assert r.status_code == 400 and r.json()["error"] == "bad_name", r.text


def test_names_in_any_script_are_kept(server, client):
    name = "Узел ü 東京 🚀 (gpu-1)"
    assert client.create_agent(name)["name"] == name


# --- /metrics token, /docs, file modes, telemetry pruning ---


def test_metrics_token(own_server):
    srv, _client, _agent = own_server("--metrics-token", "m3tr1cs-t0ken")
    assert requests.get(srv.url + "/metrics", timeout=10).status_code == 401
    r = requests.get(srv.url + "/metrics", headers={"authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = requests.get(srv.url + "/metrics", headers={"authorization": "Bearer m3tr1cs-t0ken"}, timeout=10)
    assert r.status_code == 200 and "sly_agents " in r.text


def test_metrics_is_open_without_a_token_and_docs_are_off_by_default(server):
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 200
    assert requests.get(server.url + "/docs", timeout=10).status_code == 404
    schema = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert "/api/v1/tasks" in schema["paths"]
    assert all("422" not in op["responses"] for ops in schema["paths"].values() for op in ops.values())


def test_docs_on_request(own_server):
    srv, _client, _agent = own_server("--docs")
    assert requests.get(srv.url + "/docs", timeout=10).status_code == 200


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
@pytest.mark.server_process("the server process sets its own umask")
def test_the_data_dir_is_0700_and_the_servers_files_0600(tmp_path, own_server):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    for name in ("left-over.txt", "admin_token"):  # files of an older run, world-readable then
        (data / name).write_text("from an older run\n")
        os.chmod(data / name, 0o644)
    srv, client, _agent = own_server()
    assert srv.data_dir == data
    sha = client.upload_bytes(b"a blob on disk")
    assert _mode(data) == 0o700
    for name in ("server.db", "left-over.txt", "admin_token"):
        assert _mode(data / name) == 0o600, name
    for extra in ("server.db-wal", "server.db-shm"):
        if (data / extra).exists():
            assert _mode(data / extra) & 0o077 == 0, extra
    blob = data / "blobs" / sha[:2] / sha[2:5] / sha
    assert _mode(blob) == 0o600 and _mode(blob.parent) == 0o700
