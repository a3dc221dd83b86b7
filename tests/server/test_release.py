"""POST /agent/v1/tasks/{id}/release: a draining agent hands back a task it was given but will not run."""

from __future__ import annotations

import sqlite3

import pytest

from protocol import endpoints


def _release(agent, task_id: int):
    return agent.post_raw(endpoints.path(endpoints.TASK_RELEASE, task_id=task_id))


def _lease_until(server, task_id: int):
    with sqlite3.connect(server.data_dir / "server.db") as db:
        return db.execute("SELECT lease_until FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_release_requeues_clears_the_lease_and_hands_out_again(server, client, make_agent):
    agent = make_agent("drainer")
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    [got] = agent.poll(free_slots=1)["tasks"]
    assert got["id"] == tid and client.get_task(tid)["state"] == "assigned"
    assert _lease_until(server, tid) is not None

    r = _release(agent, tid)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "queued"
    task = client.get_task(tid)
    assert task["state"] == "queued"
    assert [s["state"] for s in task["timeline"]] == ["queued", "assigned", "queued"]
    assert _lease_until(server, tid) is None

    r = _release(agent, tid)  # a retried release (its answer was lost): no change
    assert r.status_code == 200 and r.json()["state"] == "queued"
    assert len(client.get_task(tid)["timeline"]) == 3

    assert agent.poll(free_slots=0)["tasks"] == []  # still draining: nothing is handed out
    assert client.get_task(tid)["state"] == "queued"
    [again] = agent.poll(free_slots=1)["tasks"]  # back in service: the same task again
    assert again["id"] == tid and client.get_task(tid)["state"] == "assigned"


def test_only_the_leasing_agent_may_release_and_only_while_assigned(client, make_agent):
    owner, other = make_agent("owner"), make_agent("other")
    tid = client.create_task(owner.id, "custom", image="img")["id"]
    owner.poll(free_slots=1)
    r = _release(other, tid)
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    assert client.get_task(tid)["state"] == "assigned"

    assert owner.state_raw(tid, "preparing").status_code == 200
    r = _release(owner, tid)
    assert r.status_code == 409 and r.json()["error"] == "illegal_transition"
    assert client.get_task(tid)["state"] == "preparing"

    assert owner.state_raw(tid, "failed", error="boom").status_code == 200
    r = _release(owner, tid)
    assert r.status_code == 409 and r.json()["error"] == "task_final"


def test_release_of_a_task_whose_stop_was_requested_stops_it(client, make_agent):
    agent = make_agent("stopper")
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    agent.poll(free_slots=1)
    assert client.stop_task(tid)["stop_requested"] is True
    r = _release(agent, tid)
    assert r.status_code == 200 and r.json()["state"] == "stopped"
    assert client.get_task(tid)["state"] == "stopped"
    assert agent.poll(free_slots=1)["tasks"] == []


def test_release_needs_the_agent_token(server, client, make_agent):
    import requests

    agent = make_agent("tokenless")
    tid = client.create_task(agent.id, "custom", image="img")["id"]
    r = requests.post(server.url + endpoints.path(endpoints.TASK_RELEASE, task_id=tid), timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
