"""The server speaks protocol/: its routes are the endpoint paths, its states are TaskState values,
its errors decode with protocol.errors, and it keeps no copy of a protocol fact."""

from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path

import pytest
import requests

from protocol import endpoints, errors, states, tasks
from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# Moving to client/ and tools/; they are not the server.
NOT_SERVER = {"cli.py", "client.py"}
NOT_SERVER_DIRS = {"demo", "migrations"}


def _routes(echo: bool, tmp_path) -> set[tuple[str, str]]:
    """(method, path) of every route in the app's schema (the echo endpoint is outside the schema)."""
    app = create_app(Settings(data_dir=tmp_path, admin_token="t" * 32, echo_endpoint=echo))
    return {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}


def _constants(prefix: str) -> set[str]:
    return {v for k, v in vars(endpoints).items() if k.isupper() and isinstance(v, str) and v.startswith(prefix + "/")}


def test_agent_routes_are_exactly_the_protocol_agent_endpoints(tmp_path):
    served = {p for _m, p in _routes(False, tmp_path) if p.startswith(endpoints.AGENT_PREFIX + "/")}
    assert served == _constants(endpoints.AGENT_PREFIX)
    assert endpoints.TASK_RELEASE in served


def test_user_routes_are_protocol_endpoints(tmp_path):
    served = {p for _m, p in _routes(False, tmp_path) if p.startswith(endpoints.USER_PREFIX + "/")}
    assert served == _constants(endpoints.USER_PREFIX) - {endpoints.ECHO}


def test_echo_endpoint_only_when_enabled(server, own_server):
    r = server.admin().post(server.url + endpoints.ECHO, data=b"x" * 100, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    srv, _client, _agent = own_server("--echo-endpoint")
    r = srv.admin().post(srv.url + endpoints.ECHO, data=b"x" * 100, timeout=10)
    assert r.status_code == 200 and r.json() == {"bytes": 100}
    assert requests.post(srv.url + endpoints.ECHO, data=b"x", timeout=10).status_code == 401


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_every_stored_and_shown_state_is_a_protocol_state(server, client, make_agent):
    agent = make_agent("states")
    done = client.create_task(agent.id, "custom", image="img")["id"]
    client.stop_task(client.create_task(agent.id, "custom", image="img")["id"])
    agent.poll(free_slots=1)
    for st in ("preparing", "running", "uploading", "finished"):
        assert agent.state_raw(done, st).status_code == 200
    values = {s.value for s in states.TaskState}
    shown = client.list_tasks(agent_id=agent.id)
    assert {t["state"] for t in shown} == {"finished", "stopped"}
    for t in shown:
        assert {e["state"] for e in t["timeline"]} <= values
    with sqlite3.connect(server.data_dir / "server.db") as db:
        stored = {s for (s,) in db.execute("SELECT DISTINCT state FROM tasks")}
        timelines = [json.loads(tl) for (tl,) in db.execute("SELECT timeline FROM tasks")]
    assert stored <= values
    assert {e["state"] for tl in timelines for e in tl} <= values


def test_server_errors_decode_with_protocol_errors(server, make_agent):
    agent = make_agent("errors")
    path = endpoints.path(endpoints.TASK_STATE, task_id=999999)
    r = agent.post_raw(path, json={"state": "running"})
    e = errors.decode_error(r.status_code, r.content, method="POST", path=path)
    assert (e.status, e.code) == (404, "task_not_found") and "999999" in e.detail
    r = requests.post(server.url + endpoints.POLL, json={}, timeout=10)
    assert isinstance(errors.decode_error(r.status_code, r.content), errors.AuthError)
    r = requests.post(
        server.url + endpoints.POLL, json={}, headers={endpoints.AGENT_TOKEN_HEADER: agent.token}, timeout=10
    )
    assert r.status_code == 200


def _server_modules():
    for py in sorted((ROOT / "server").rglob("*.py")):
        rel = py.relative_to(ROOT / "server")
        if rel.name in NOT_SERVER and len(rel.parts) == 1 or rel.parts[0] in NOT_SERVER_DIRS:
            continue
        yield py


def test_the_server_keeps_no_copy_of_a_protocol_fact():
    assert not (ROOT / "server" / "states.py").exists()
    # Names a copy would have; a value derived from protocol (console's TASK_STATES) is fine.
    copies = {"TASK_TYPES", "TaskState", "APIError", "IllegalTransition", "EDGES", "ALLOWED_SOURCES", "FINAL", "LEASED"}
    spelled = set(tasks.TASK_TYPES) | {s.value for s in states.TaskState}
    for py in _server_modules():
        tree = ast.parse(py.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for name in names:
                assert name not in copies, f"server/{py.relative_to(ROOT / 'server')} defines its own {name}"
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)):
                literal = {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
                assert not (len(literal) > 2 and literal <= spelled), (
                    f"server/{py.relative_to(ROOT / 'server')} spells out task types or states"
                )


@pytest.mark.parametrize(
    "src,dst",
    [
        ("queued", "assigned"),
        ("assigned", "preparing"),
        ("preparing", "running"),
        ("running", "uploading"),
        ("uploading", "finished"),
        ("assigned", "running"),
        ("queued", "stopped"),
        ("running", "lost"),
        ("preparing", "failed"),
        ("assigned", "queued"),
    ],
)
def test_edges_the_server_relies_on(src, dst):
    states.check_transition(states.TaskState(src), states.TaskState(dst))


@pytest.mark.parametrize(
    "src,dst",
    [
        ("finished", "running"),
        ("running", "preparing"),
        ("queued", "running"),
        ("lost", "running"),
        ("queued", "lost"),
        ("stopped", "queued"),
        ("running", "queued"),
    ],
)
def test_edges_the_server_refuses(src, dst):
    with pytest.raises(states.IllegalTransition):
        states.check_transition(states.TaskState(src), states.TaskState(dst))
