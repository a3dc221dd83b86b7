"""The telemetry fast path (server/http/fastpath.py): the ordinary sample never reaches FastAPI, and
everything else does, and gets the route's documented answer."""

from __future__ import annotations

import asyncio
import gzip
import json
from concurrent.futures import ThreadPoolExecutor

from protocol import endpoints
from server.auth.service import hash_token
from server.http.fastpath import TelemetryFastPath


class FakeContacts:
    def __init__(self):
        self.samples, self.seen_ids = [], []

    def telemetry(self, agent, now, sample):
        self.samples.append((agent["id"], sample))

    def seen(self, aid, now=None):
        self.seen_ids.append(aid)


class FakeAgentRows:
    def __init__(self, tokens: dict[str, int]):
        self.by_hash = {hash_token(t): {"id": i} for t, i in tokens.items()}
        self.loaded = 0

    async def get(self, h):
        self.loaded += 1
        return self.by_hash.get(h)


class FakeState:
    def __init__(self, tokens: dict[str, int]):
        self.agent_rows = FakeAgentRows(tokens)
        self.contacts = FakeContacts()


def call(state, headers: dict, scope_json=..., path=endpoints.TELEMETRY, method="POST"):
    inner = []

    async def app(scope, receive, send):
        inner.append(scope["path"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    if scope_json is not ...:
        scope["sly.json"] = scope_json
    # A loop of its own in a thread of its own: the suite's browser tests leave one running in this thread.
    with ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, TelemetryFastPath(app, state)(scope, receive, send)).result()
    return inner, sent


def test_an_ordinary_sample_is_answered_without_fastapi():
    state = FakeState({"t" * 32: 7})
    inner, sent = call(state, {"x-token": "t" * 32}, {"cpu": 5})
    assert inner == []
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"ok": True}
    assert state.contacts.samples == [(7, {"cpu": 5})] and state.contacts.seen_ids == [7]


def test_everything_else_goes_on_to_the_route():
    state = FakeState({"t" * 32: 7})
    cases = [
        ({}, {"cpu": 5}),  # no token
        ({"x-token": "u" * 32}, {"cpu": 5}),  # a token of no node
        ({"x-token": "t" * 32}, [1, 2]),  # not an object
        ({"x-token": "t" * 32}, ...),
    ]  # not JSON (the body check left nothing)
    for headers, body in cases:
        inner, sent = call(state, headers, body)
        assert inner == [endpoints.TELEMETRY] and sent[0]["status"] == 299, (headers, body)
    inner, _ = call(state, {"x-token": "t" * 32}, {"cpu": 5}, path=endpoints.POLL)
    assert inner == [endpoints.POLL]
    assert state.contacts.samples == []


def test_the_routes_answers_through_the_server(server, make_agent):
    agent = make_agent("fast")
    assert agent.post_raw(endpoints.TELEMETRY, json={"cpu": 1}).json() == {"ok": True}
    r = agent.post_raw(
        endpoints.TELEMETRY,
        data=gzip.compress(b'{"cpu": 2}'),
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = agent.post_raw(endpoints.TELEMETRY, json=[1])
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = agent.post_raw(endpoints.TELEMETRY, data=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    agent.s.headers["x-token"] = "z" * 32
    r = agent.post_raw(endpoints.TELEMETRY, json={"cpu": 3})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    del agent.s.headers["x-token"]
    r = agent.post_raw(endpoints.TELEMETRY, json={"cpu": 3})
    assert r.status_code == 401 and "missing" in r.json()["detail"]
