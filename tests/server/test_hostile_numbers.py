"""Hostile numbers from a node: every number stored fits its column, and one node's bad row never
holds back the contact batch (last_seen, lease renewals, telemetry) of the others.

Once, `{"memory": {"used": 1e300, "total": 1e300}}` (finite JSON) became a 301-digit integer that no
column holds; the batch of every node failed at each flush, and within the lease every running
task of every healthy node was declared lost. On PostgreSQL `{"free_slots": 3000000000}` (int8,
but an int4 column) did the same.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import threading
import time

import pytest
import requests
from prometheus_client import CollectorRegistry
from sqlalchemy import event, select

from client import UserClient
from protocol import endpoints
from server import db
from server.agents.contact import Contacts
from server.http.strict import INT64_MAX, INT64_MIN
from server.settings import Settings
from server.telemetry import service as telemetry
from tests.server.test_contact import add_agents, sample
from tests.support.fake_agent import FakeAgent

EXTREMES = [1e300, -1e300, 2**31, 2**63, 1e-308]
INT4 = (-(1 << 31), (1 << 31) - 1)


def hostile_samples() -> list[dict]:
    """Samples whose every number is one extreme value, in each shape the server reads."""
    out = [
        {"memory": {"used": 1e300, "total": 1e300}},
        {"free_slots": 3_000_000_000},
        {"disks": [{"path": "/", "used": 1e308, "total": 1e-308}]},  # the ratio overflows to inf
        {"disks": {"/": {"used": -1e308, "total": 1e-308}}, "gpus": [{"memory_used": 1e308, "memory_total": 1e-308}]},
    ]
    for x in EXTREMES:
        if x == 2**63:
            continue  # refused at the door (server.http.strict): not JSON the server takes
        out.append(
            {
                "cpu": {"percent": x},
                "memory": {"used": x, "total": x, "percent": x},
                "containers": x,
                "free_slots": x,
                "disks": [{"path": "/", "used": x, "total": x, "percent": x}, {"used": x, "total": 1}],
                "gpus": [
                    x,
                    {"index": x, "utilization": x, "memory_used": x, "memory_total": x, "memory_percent": x},
                    {"util": x, "memory": {"used": x, "total": x}},
                ],
            }
        )
    return out


def _json_ok(v) -> bool:
    """A JSON column's value: every number finite and every integer within int64."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return True
    if isinstance(v, int):
        return INT64_MIN <= v <= INT64_MAX
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_json_ok(x) for x in v.values())
    return all(_json_ok(x) for x in v)


def fits(table, row: dict) -> list[str]:
    """The columns of `row` whose value the column's type on PostgreSQL cannot hold."""
    bad = []
    for col in table.c:
        v = row.get(col.name)
        if v is None:
            continue
        kind = type(col.type).__name__
        if kind == "Integer":
            ok = isinstance(v, int) and INT4[0] <= v <= INT4[1]
        elif kind == "BigInteger":
            ok = isinstance(v, int) and INT64_MIN <= v <= INT64_MAX
        elif kind == "Float":
            ok = isinstance(v, (int, float)) and math.isfinite(v)
        else:
            ok = _json_ok(v)
        if not ok:
            bad.append(f"{col.name}={v!r}")
    return bad


@pytest.mark.parametrize("hostile", hostile_samples(), ids=lambda s: str(s)[:60])
def test_every_value_taken_from_a_sample_fits_its_column(hostile):
    latest = telemetry.latest_values(hostile)
    assert fits(db.telemetry_latest, dict(latest, agent_id=1, ts=1.0)) == []
    point = telemetry.history_point(Settings(), 1, None, 1000.0, latest)
    assert fits(db.telemetry_history, point) == []


def test_values_within_range_are_kept_and_only_the_bad_one_is_dropped():
    latest = telemetry.latest_values(
        {
            "cpu": 12.5,
            "memory": {"used": INT64_MAX, "total": 1e300, "percent": 40.0},
            "free_slots": 2**31,
            "containers": 3,
        }
    )
    assert (latest["cpu"], latest["mem"], latest["mem_used"], latest["mem_total"]) == (12.5, 40.0, INT64_MAX, None)
    assert (latest["free_slots"], latest["containers"]) == (None, 3)


def _stored(engine, aid: int) -> tuple:
    with engine.connect() as conn:
        last_seen = conn.execute(select(db.agents.c.last_seen).where(db.agents.c.id == aid)).scalar()
        lease = conn.execute(select(db.tasks.c.lease_until).where(db.tasks.c.agent_id == aid)).scalar()
        cpu = conn.execute(select(db.telemetry_latest.c.cpu).where(db.telemetry_latest.c.agent_id == aid)).scalar()
    return last_seen, lease, cpu


def _running_task(engine, aid: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            db.tasks.insert().values(
                agent_id=aid,
                type="custom",
                config={},
                resources={},
                state="running",
                timeline=[],
                results={},
                lease_until=0.0,
                created_at=0.0,
                updated_at=0.0,
            )
        )


@pytest.mark.parametrize("hostile", hostile_samples()[:4], ids=lambda s: str(s)[:60])
def test_a_hostile_sample_leaves_the_other_nodes_batch_written(engine, hostile):
    healthy, bad = add_agents(engine, 2)
    for aid in (healthy, bad):
        _running_task(engine, aid)
    c = Contacts(engine, Settings(lease_s=100.0))
    c.telemetry({"id": healthy, "telemetry_ts": None}, 1000.0, sample(5.0))
    c.telemetry({"id": bad, "telemetry_ts": None}, 1000.0, dict(hostile, cpu=7.0))
    c.flush()
    assert _stored(engine, healthy) == (1000.0, 1100.0, 5.0)
    assert _stored(engine, bad) == (1000.0, 1100.0, 7.0)  # the sample is kept, less its bad values
    assert dropped(c) == 0


def dropped(c: Contacts) -> float:
    """`sly_contact_rows_dropped_total` as /metrics shows it."""
    registry = CollectorRegistry()
    registry.register(c.m_rows_dropped)
    return registry.get_sample_value("sly_contact_rows_dropped_total")


def _bad_rows(c: Contacts, aid: int) -> None:
    """A row no column holds, put where server/telemetry/service.py would never put it: the batch's defence."""
    c._latest[aid]["mem_used"] = 1 << 70


def test_rows_the_database_refuses_are_dropped_per_agent_and_the_rest_written(engine, caplog):
    ids = add_agents(engine, 64)
    for aid in ids:
        _running_task(engine, aid)
    c = Contacts(engine, Settings(lease_s=100.0))
    for aid in ids:
        c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0, sample(float(aid % 50)))
        c.poll_open(f"p{aid}", aid, "r1", 2000.0)
    bad = ids[17]
    _bad_rows(c, bad)
    begins = []
    event.listen(engine, "begin", lambda conn: begins.append(1))
    with caplog.at_level(logging.WARNING, logger="sly-server"):
        c.flush()
    # Halving: two transactions per level (a good half written, a bad half split again), not one per agent.
    assert len(begins) <= 2 * math.ceil(math.log2(len(ids))) + 1, len(begins)
    for aid in ids:
        if aid != bad:
            assert _stored(engine, aid) == (1000.0, 1100.0, float(aid % 50)), aid
    assert _stored(engine, bad) == (None, 0.0, None)  # all of its rows dropped, nothing half-written
    with engine.connect() as conn:
        assert set(conn.execute(select(db.polls.c.agent_id)).scalars()) == set(ids) - {bad}
    assert dropped(c) == 5  # contact, lease, latest row, history point, poll row
    [warning] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert f"agent {bad}" in warning.getMessage() and warning.levelno == logging.WARNING
    assert not c.pending and c.flush() == 0  # dropped, not kept to fail again


def test_an_outage_while_isolating_keeps_what_is_not_written(engine, monkeypatch):
    from sqlalchemy.exc import OperationalError

    ids = add_agents(engine, 4)
    c = Contacts(engine, Settings(lease_s=100.0))
    for aid in ids:
        c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0, sample(1.0))
    _bad_rows(c, ids[0])
    real, calls = c._write, []

    def flaky(*batch):
        calls.append(1)
        if len(calls) == 2:  # the database goes away after the first, refused, write
            raise OperationalError("stmt", {}, Exception("server closed the connection unexpectedly"))
        return real(*batch)

    monkeypatch.setattr(c, "_write", flaky)
    with pytest.raises(OperationalError):
        c.flush()
    monkeypatch.setattr(c, "_write", real)
    c.flush()  # back: the kept rows are written, the refused ones dropped
    for aid in ids[1:]:
        assert _stored(engine, aid)[0] == 1000.0 and _stored(engine, aid)[2] == 1.0
    assert _stored(engine, ids[0])[2] is None and dropped(c) > 0


def test_a_disk_ratio_that_overflows_is_not_a_500(server, make_agent, client):
    agent = make_agent("overflowing-disk")
    r = agent.post_raw(endpoints.TELEMETRY, json={"cpu": 3.0, "disks": [{"path": "/", "used": 1e308, "total": 1e-308}]})
    assert r.status_code == 200, r.text
    t = client.get_agent(agent.id)["telemetry"]
    assert t["cpu"] == {"percent": 3.0} and t["disks"] == [{"path": "/", "total": 0}]  # no used, no percent
    assert (
        requests.get(
            f"{server.url}/api/v1/agents/{agent.id}/telemetry", headers=client.session.headers, timeout=10
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "body,field",
    [
        ({"state": "running", "exit_code": 2**31}, "exit_code"),
        ({"state": "running", "exit_code": -(2**31) - 1}, "exit_code"),
        ({"state": "running", "exit_code": 1e300}, "exit_code"),
        ({"state": "running", "progress": {"current": -1e300}}, "progress.current"),
    ],
)
def test_state_numbers_out_of_their_column_are_refused(server, client, make_agent, body, field):
    agent = make_agent("state-numbers")
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    agent.poll(free_slots=1)
    r = agent.state_raw(tid, **body)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request" and field in r.json()["detail"], r.text
    assert client.get_task(tid)["exit_code"] is None


@pytest.mark.parametrize("body", [{"running": [2**31]}, {"free_gpus": [-1]}, {"free_gpus": [2**40]}])
def test_poll_numbers_out_of_range_are_refused(make_agent, body):
    agent = make_agent("poll-numbers")
    r = agent.post_raw("/agent/v1/poll?wait=0", json=body)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text


# --- every agent-API operation with extreme numbers, then the fleet still works ---


def _examples(ids: dict, k: int) -> dict:
    """Valid bodies of each agent-API operation that takes JSON (k: a fresh log seq each time)."""
    return {
        ("POST", endpoints.CONNECT): {
            "hostname": "h",
            "cpu_count": 64,
            "memory_total": 1 << 40,
            "gpus": [{"index": 0, "memory_total": 80 << 30}],
            "docker": {"containers": 2},
        },
        ("POST", endpoints.POLL): {"free_slots": 0, "free_gpus": [0], "running": [ids["task_id"]]},
        ("POST", endpoints.TASK_STATE): {
            "state": "running",
            "progress": {"current": 1.0, "total": 10.0},
            "exit_code": 0,
        },
        ("POST", endpoints.TASK_LOGS): {
            "first_seq": 10 * k,
            "lines": [
                {"ts": 1.0, "message": "m", "cts": 5},
                {"ts": 2.0, "message": "epoch", "event_type": "metrics", "epoch": 1, "metrics": {"loss": 0.5}},
            ],
        },
        ("POST", endpoints.TASK_RESULTS): [
            {
                "kind": "model",
                "name": "m",
                "files": [{"path": "w.bin", "sha256": ids["sha256"], "size": 4}],
                "checkpoint": {"epoch": 1.0, "metrics": {"acc": 0.9}},
            },
            {
                "kind": "project",
                "name": "p",
                "datasets": [{"name": "ds", "items": [{"name": "a.jpg", "sha256": ids["sha256"], "size": 4}]}],
            },
            # a further page of a result project (any project id: one not the task's is a 404)
            {"kind": "project", "project_id": 1, "files": [{"path": "ds/b.jpg", "sha256": ids["sha256"], "size": 4}]},
        ],
        # The bulk blob lists hold no number: one in a field a newer agent might add (ignored, still strict JSON).
        ("POST", endpoints.AGENT_BLOBS_CHECK): {"sha256": [ids["sha256"]], "newer_field": 1},
        ("POST", endpoints.AGENT_BLOBS_DOWNLOAD): {"sha256": [ids["sha256"]], "newer_field": 1},
        ("POST", endpoints.TELEMETRY): {
            "cpu": {"percent": 37.5, "per_core": [1.5, 2.5], "count": 2},
            "memory_percent": 3.0,
            "memory": {"total": 1 << 40, "used": 1 << 39, "percent": 50.0, "available": 1 << 39},
            "disks": [{"path": "/", "total": 1 << 42, "used": 1 << 41, "percent": 50.0}],
            "gpus": [
                {
                    "index": 0,
                    "utilization": 10,
                    "memory_used": 1 << 30,
                    "memory_total": 1 << 34,
                    "memory_percent": 6.0,
                    "memory": {"used": 1, "total": 2},
                },
                55.0,
            ],
            "containers": 2,
            "free_slots": 1,
            "ts": 1.0,
        },
    }


def _numeric_leaves(v, path=()):
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        yield path
    elif isinstance(v, dict):
        for key, x in v.items():
            yield from _numeric_leaves(x, path + (key,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _numeric_leaves(x, path + (i,))


def _schema_numbers(schema: dict, spec: dict, path=()):
    """Paths ('*' for an array's items) of the numeric properties a request schema declares."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    for alt in schema.get("anyOf", []):
        yield from _schema_numbers(alt, spec, path)
    kind = schema.get("type")
    if kind in ("integer", "number"):
        yield path
    elif kind == "array" and "items" in schema:
        yield from _schema_numbers(schema["items"], spec, path + ("*",))
    for key, sub in schema.get("properties", {}).items():
        yield from _schema_numbers(sub, spec, path + (key,))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _schema_numbers(schema["additionalProperties"], spec, path + ("*",))


def _matches(pattern: tuple, path: tuple) -> bool:
    return len(pattern) == len(path) and all(a == "*" or a == b for a, b in zip(pattern, path, strict=True))


def _put(body, path, value):
    body = copy.deepcopy(body)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_extreme_numbers_in_every_agent_operation_hurt_no_other_node(tmp_path):
    from tests.support.server import ServerProcess

    lease_s = 4.0
    srv = ServerProcess(tmp_path / "data", extra_args=["--lease-s", str(lease_s), "--telemetry-min-gap-s", "0"]).start()
    stop = threading.Event()
    try:
        client = UserClient(srv.url, srv.admin_token)
        nodes = {}
        for name in ("healthy", "hostile"):
            a = client.create_agent(name)
            node = FakeAgent(srv.url, a["token"], a["id"])
            tid = client.create_task(node.id, "custom", image="img")["id"]
            assert [t["id"] for t in node.poll(free_slots=1)["tasks"]] == [tid]
            assert node.state_raw(tid, "running").status_code == 200
            nodes[name] = (node, tid)
        healthy, healthy_task = nodes["healthy"]
        hostile, hostile_task = nodes["hostile"]

        def keep_alive():  # sessions of its own: the walk below uses the hostile node's
            h, x = (FakeAgent(srv.url, n.token, n.id) for n in (healthy, hostile))
            while not stop.is_set():
                h.poll(free_slots=0, running=[healthy_task])
                h.post_raw(endpoints.TELEMETRY, json=sample(1.0))
                x.poll(free_slots=0, running=[hostile_task])  # contact, but no newer sample
                stop.wait(0.3)

        alive = threading.Thread(target=keep_alive, daemon=True)
        alive.start()

        sha = hashlib.sha256(b"fuzz").hexdigest()  # the node's own upload: its results may name it
        hostile.s.put(
            srv.url + endpoints.path(endpoints.AGENT_BLOB, sha256=sha), data=b"fuzz", timeout=10
        ).raise_for_status()
        ids = {"task_id": hostile_task, "sha256": sha}
        spec = requests.get(srv.url + "/openapi.json", timeout=10).json()
        ops = {
            (m.upper(), p): op
            for p, item in spec["paths"].items()
            if p.startswith("/agent/")
            for m, op in item.items()
            if "application/json" in op.get("requestBody", {}).get("content", {})
        }
        examples = {key: v if isinstance(v, list) else [v] for key, v in _examples(ids, 0).items()}
        assert set(ops) == set(examples), "an agent operation without an example here: add one"
        sent, accepted = 0, {}
        for (method, template), op in sorted(ops.items()):
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            leaves = [
                (i, leaf) for i, body in enumerate(examples[(method, template)]) for leaf in _numeric_leaves(body)
            ]
            missing = [
                p for p in set(_schema_numbers(schema, spec)) if not any(_matches(p, leaf) for _, leaf in leaves)
            ]
            assert not missing, f"{template}: numeric fields the examples lack: {missing}"
            url = template.replace("{task_id}", str(hostile_task))
            for i, leaf in leaves:
                for x in EXTREMES:
                    sent += 1
                    fresh = _examples(ids, sent)[(method, template)]
                    body = _put(fresh[i] if isinstance(fresh, list) else fresh, leaf, x)
                    r = hostile.s.request(
                        method, srv.url + url + ("?wait=0" if template == endpoints.POLL else ""), json=body, timeout=30
                    )
                    assert r.status_code < 500, (template, leaf, x, r.status_code, r.text)
                    accepted[template] = accepted.get(template, 0) + (r.status_code == 200)
                    if r.status_code >= 400:
                        assert r.json()["error"] and r.json()["detail"], (template, leaf, x, r.text)
        assert sent >= 150
        # The bodies reached the routes' logic (a poll's numbers are all ints of int4: every extreme is refused).
        assert set(accepted) == {t for _, t in ops} and all(n for t, n in accepted.items() if t != endpoints.POLL), (
            accepted
        )
        # The hostile node's newest word is the worst one, and it says nothing after it.
        assert (
            hostile.post_raw(
                endpoints.TELEMETRY, json={"memory": {"used": 1e300, "total": 1e300}, "free_slots": 3_000_000_000}
            ).status_code
            == 200
        )
        time.sleep(2.5 * lease_s)  # past the lease: a failing batch would have lost the task by now
        assert client.get_task(healthy_task)["state"] == "running"
        assert client.get_task(hostile_task)["state"] == "running"  # it hurt not even itself
        r = client.session.get(srv.url + "/api/v1/agents", timeout=10)
        assert r.status_code == 200 and {a["status"] for a in r.json()["items"]} == {"online"}
    finally:
        stop.set()
        srv.close()
