"""Helpers for the server conformance tests: a UserClient and an agent speaking plain HTTP."""
from __future__ import annotations

import hashlib

import pytest
import requests

from client import UserClient


class FakeAgent:
    """Acts as an agent with plain requests + x-token (no agent code involved)."""

    def __init__(self, url: str, token: str, agent_id: int):
        self.url, self.token, self.id = url, token, agent_id
        self.s = requests.Session()
        self.s.headers["x-token"] = token

    def post(self, path: str, **kw) -> requests.Response:
        return self.s.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def upload(self, data: bytes) -> str:
        """PUT the bytes as this agent (its results may name only blobs it may read); their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        r = self.s.put(f"{self.url}/agent/v1/blobs/{sha}", data=data, timeout=30)
        assert r.status_code == 200, r.text
        return sha

    def poll(self, free_slots=1, free_gpus=(), running=(), wait=0.0) -> dict:
        r = self.post(f"/agent/v1/poll?wait={wait}", json={"free_slots": free_slots, "free_gpus": list(free_gpus),
                                                          "running": list(running)}, timeout=wait + 10)
        assert r.status_code == 200, r.text
        return r.json()

    def state(self, task_id: int, state: str, **kw) -> requests.Response:
        return self.post(f"/agent/v1/tasks/{task_id}/state", json={"state": state, **kw})

    def logs(self, task_id: int, first_seq: int, lines: list[dict]) -> requests.Response:
        return self.post(f"/agent/v1/tasks/{task_id}/logs", json={"first_seq": first_seq, "lines": lines})


@pytest.fixture
def client(server) -> UserClient:
    return UserClient(server.url, server.admin_token)


@pytest.fixture
def make_agent(server, client):
    def make(name="node", types=None) -> FakeAgent:
        a = client.create_agent(name, types)
        return FakeAgent(server.url, a["token"], a["id"])
    return make


@pytest.fixture
def own_server(tmp_path, request):
    """own_server(*server_args, name=) -> (server, client, agent): a server of the test's own (it may stop
    and start it), its user client, and one agent on it; a subprocess where the test is marked
    `server_process`. Stopped at the end."""
    from tests.support.server import fixture_server
    process = request.node.get_closest_marker("server_process") is not None
    started = []

    def start(*args: str, name: str = "own"):
        srv = fixture_server(tmp_path / "data", process=process, extra_args=list(args)).start()
        started.append(srv)
        client = UserClient(srv.url, srv.admin_token)
        a = client.create_agent(name)
        return srv, client, FakeAgent(srv.url, a["token"], a["id"])
    yield start
    for srv in started:
        srv.close()


@pytest.fixture
def engine(tmp_path):
    """A migrated database of this test's own: SQLite in tmp_path, or a fresh one on SLY_TEST_DB_URL."""
    from server import db
    from server.db import migrate
    from tests.support.server import TEST_DB_URL, create_test_database, drop_test_databases
    url = create_test_database() if TEST_DB_URL else f"sqlite:///{tmp_path / 'server.db'}"
    eng = db.make_engine(url)
    migrate.upgrade(eng)
    yield eng
    eng.dispose()
    if TEST_DB_URL:
        from sqlalchemy.engine import make_url
        drop_test_databases([make_url(url).database])
