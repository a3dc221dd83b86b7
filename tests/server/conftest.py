"""Fixtures for the server conformance tests: a UserClient and agents speaking plain HTTP (tests.support.fake_agent)."""

from __future__ import annotations

import pytest

from client import UserClient
from tests.support.fake_agent import FakeAgent


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
