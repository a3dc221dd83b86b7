"""The user API refuses fields it does not know (400 unknown_field, naming them); the agent
protocol ignores them, so agents and servers of neighbouring versions still talk.

Once, `{"agent_id": 1, "type": "custom", "projcet_id": 7}` made a task without its project: the
typo was dropped in silence."""

from __future__ import annotations

import hashlib
import re

import pytest
import requests

from protocol import endpoints


def _resolve(schema: dict, spec: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _objects(schema: dict, spec: dict, seen=None):
    """Every object schema with declared properties reachable from `schema`."""
    seen = set() if seen is None else seen
    schema = _resolve(schema, spec)
    if id(schema) in seen:
        return
    seen.add(id(schema))
    if schema.get("properties"):
        yield schema
    for sub in [*schema.get("properties", {}).values(), *schema.get("anyOf", []), *filter(None, [schema.get("items")])]:
        yield from _objects(sub, spec, seen)


def _json_ops(spec: dict, prefix: str):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            content = op.get("requestBody", {}).get("content", {})
            if path.startswith(prefix) and "application/json" in content:
                yield method.upper(), path, content["application/json"]["schema"]


def test_the_schema_says_user_bodies_are_closed_and_agent_bodies_open(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    user = list(_json_ops(spec, "/api/"))
    assert len(user) >= 5, user
    for method, path, schema in user:
        for obj in _objects(schema, spec):
            assert obj.get("additionalProperties") is False, (method, path, obj.get("title"))
    for method, path, schema in _json_ops(spec, "/agent/"):
        for obj in _objects(schema, spec):
            assert obj.get("additionalProperties") is not False, (method, path, obj.get("title"))


def test_every_user_operation_refuses_an_unknown_field_with_its_name(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    s = server.admin()
    for method, path, _schema in _json_ops(spec, "/api/"):
        url = server.url + re.sub(r"\{\w+\}", "1", path)
        r = s.request(method, url, json={"zz_unknown": 1}, timeout=10)
        assert r.status_code == 400, (method, path, r.status_code, r.text)
        body = r.json()
        assert body["error"] == "unknown_field" and "zz_unknown" in body["detail"], (method, path, body)
        assert body["fields"] == ["zz_unknown"]


def test_a_typo_in_a_task_field_is_refused_and_no_task_made(server, client, make_agent):
    agent = make_agent("typo")
    before = len(client.list_tasks(agent_id=agent.id))
    r = client.session.post(
        f"{server.url}{endpoints.TASKS}",
        json={"agent_id": agent.id, "type": "custom", "image": "img", "projcet_id": 7},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "unknown_field" and r.json()["fields"] == ["projcet_id"]
    assert "projcet_id" in r.json()["detail"]
    assert len(client.list_tasks(agent_id=agent.id)) == before


@pytest.mark.parametrize(
    "path,body,field",
    [
        (endpoints.TASKS, {"agent_id": 1, "type": "custom", "image": "i", "resources": {"gpu": 1}}, "resources.gpu"),
        (
            endpoints.PROJECTS,
            {
                "name": "p",
                "datasets": [
                    {"name": "d", "items": [{"nmae": "a.jpg", "name": "a.jpg", "sha256": "0" * 64, "size": 1}]}
                ],
            },
            "datasets.0.items.0.nmae",
        ),
        (endpoints.PROJECTS, {"name": "p", "datasets": [{"name": "d", "itmes": []}]}, "datasets.0.itmes"),
        (
            endpoints.MODELS,
            {"name": "m", "files": [{"path": "w", "sha256": "0" * 64, "size": 1, "sha": "x"}]},
            "files.0.sha",
        ),
        (endpoints.AGENTS, {"name": "n", "allowed_types": ["train"]}, "allowed_types"),
    ],
)
def test_a_nested_unknown_field_is_named_by_its_place(server, path, body, field):
    r = server.admin().post(server.url + path, json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "unknown_field" and r.json()["fields"] == [field], r.text


def test_the_agent_protocol_ignores_fields_it_does_not_know(server, client, make_agent):
    agent = make_agent("newer-agent")
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    r = agent.post_raw("/agent/v1/poll?wait=0", json={"free_slots": 1, "from_the_future": {"x": 1}})
    assert r.status_code == 200 and [t["id"] for t in r.json()["tasks"]] == [tid], r.text
    r = agent.state_raw(tid, "running", progress={"current": 1, "total": 2, "eta_s": 5}, new_field=True)
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    sha = hashlib.sha256(b"newer").hexdigest()
    agent.s.put(
        server.url + endpoints.path(endpoints.AGENT_BLOB, sha256=sha), data=b"newer", timeout=10
    ).raise_for_status()
    r = agent.post_raw(
        endpoints.path(endpoints.TASK_RESULTS, task_id=tid),
        json={
            "kind": "project",
            "name": "p",
            "later": 1,
            "datasets": [
                {"name": "ds", "later": 2, "items": [{"name": "a.jpg", "sha256": sha, "size": 5, "later": 3}]}
            ],
        },
    )
    assert r.status_code == 200, r.text
    r = agent.post_raw(
        endpoints.path(endpoints.TASK_RESULTS, task_id=tid),
        json={
            "kind": "model",
            "files": [{"path": "w.bin", "sha256": sha, "size": 5, "later": 4}],
            "checkpoint": {"epoch": 1, "later": 5},
        },
    )
    assert r.status_code == 200, r.text
