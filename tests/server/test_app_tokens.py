"""An App task's API token (server/public/tokens.py): minted at hand-out, valid while the task is
leased, dead in every end state, scoped to the public API.

A method the server does not know answers 404 to a valid token and 401 to any other: the probe
below needs no data method.
"""

from __future__ import annotations

import time

import pytest
import requests

from tests.support.apps import PUBLIC, start_app
from tests.support.fake_agent import FakeAgent

PROBE = "no.such.method"  # 404 with a live token, 401 without one


def _alive(app, token: str | None = None) -> bool:
    r = app.call(PROBE, {}, token=token)
    assert r.status_code in (401, 404), (r.status_code, r.text)
    return r.status_code == 404


def test_the_token_is_128_letters_and_digits_and_new_for_every_task(server, client, make_agent):
    a = start_app(server, client, make_agent, name="tok-a")
    b = start_app(server, client, make_agent, name="tok-b")
    for app in (a, b):
        assert len(app.token) == 128 and app.token.isascii() and app.token.isalnum()
        assert _alive(app)
    assert a.token != b.token
    assert a.task["team_id"] == 1 and a.task["workspace_id"] == 1
    # a task of another type gets none
    agent = make_agent("tok-train", ["train"])
    t = client.create_task(agent.id, "train", image="img:1")
    [got] = agent.poll_until("tasks")
    assert got["id"] == t["id"] and "api_token" not in got


def test_unknown_methods_are_named_in_the_sdk_error_shape(server, client, make_agent):
    app = start_app(server, client, make_agent, name="tok-unknown")
    r = app.call("images.teleport", {"id": 1})
    assert r.status_code == 404
    body = r.json()
    assert "images.teleport" in body["error"] and body["code"] == "method_not_supported"
    assert body["details"]["method"] == "images.teleport"


@pytest.mark.parametrize("end", ["finished", "failed", "stopped"])
def test_the_token_dies_when_its_task_ends(server, client, make_agent, end):
    app = start_app(server, client, make_agent, name=f"tok-{end}")
    assert _alive(app)
    if end == "stopped":
        client.stop_task(app.task_id)
        app.agent.state(app.task_id, "stopped")
    else:
        app.agent.state(app.task_id, end, exit_code=0 if end == "finished" else 1)
    assert not _alive(app)


def test_the_token_dies_when_its_task_is_lost(own_server):
    srv, client, agent = own_server("--lease-s", "1.5", "--offline-after-s", "1", "--contact-flush-s", "0.1")
    t = client.create_task(agent.id, "app", image="sly-test/app:1")
    [task] = agent.poll_until("tasks")
    agent.state(t["id"], "running")
    token = task["api_token"]

    def alive() -> bool:
        return (
            requests.post(srv.url + PUBLIC + PROBE, json={}, headers={"x-api-key": token}, timeout=10).status_code
            == 404
        )

    assert alive()
    deadline = time.monotonic() + 20  # the node goes silent: the lease runs out, the task is lost
    while client.get_task(t["id"])["state"] != "lost" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_task(t["id"])["state"] == "lost"
    assert not alive()


def test_a_task_handed_out_again_gets_a_new_token_and_the_old_one_dies(server, client, make_agent):
    app = start_app(server, client, make_agent, name="tok-again")
    # the node restarted and does not run it: the next poll hands it out again
    [again] = app.agent.poll_until("tasks", running=[])
    assert again["id"] == app.task_id and again["api_token"] != app.token
    assert not _alive(app)
    assert _alive(app, again["api_token"])


def test_node_and_app_tokens_are_never_taken_for_each_other(server, client, make_agent):
    app = start_app(server, client, make_agent, name="tok-scope")
    # a node token on the public API
    assert app.call(PROBE, {}, token=app.agent.token).status_code == 401
    # the App token as a node token, and as the admin's
    as_node = FakeAgent(server.url, app.token)
    assert as_node.post_raw("/agent/v1/poll?wait=0", json={"free_slots": 1}).status_code == 401
    r = requests.get(server.url + "/api/v1/tasks", headers={"Authorization": f"Bearer {app.token}"}, timeout=10)
    assert r.status_code == 401
    assert requests.get(server.url + "/api/v1/agents", headers={"x-api-key": app.token}, timeout=10).status_code == 401


@pytest.mark.parametrize(
    "key",
    ["", "x", "a" * 127, "a" * 128, "a" * 129, "é" * 128, "a" * 8000, "A1" * 64],
    ids=["empty", "short", "127", "128-unknown", "129", "non-ascii", "huge", "well-formed-unknown"],
)
def test_malformed_or_unknown_keys_are_401(server, client, make_agent, key):
    app = start_app(server, client, make_agent, name="tok-bad")
    r = requests.post(server.url + PUBLIC + PROBE, json={}, headers={"x-api-key": key.encode("utf-8")}, timeout=10)
    assert r.status_code in (401, 431), (r.status_code, r.text[:300])
    assert _alive(app)


@pytest.mark.sqlite_only("it reads the SQLite file in the data dir directly")
def test_only_the_token_hash_is_stored(own_server):
    srv, client, agent = own_server()
    client.create_task(agent.id, "app", image="sly-test/app:1")
    [task] = agent.poll_until("tasks")
    token = task["api_token"].encode()
    time.sleep(0.3)
    stored = b"".join(p.read_bytes() for p in srv.data_dir.glob("server.db*"))
    assert token not in stored
