"""A task no node can run is refused at creation (409, saying why); a queued one says why it waits.

The reasons come from what the server holds about the node (its row, latest telemetry, open polls,
its leased tasks' GPUs), read with the task: `GET /api/v1/tasks/{id}` -> `waiting`.
"""

from __future__ import annotations

import time

import pytest

from server.tasks.waiting import Node, why_waiting

GPU = {"index": 0, "name": "Fake A100", "memory_total": 40 << 30, "memory_used": 0, "utilization": 0}


def gpus(n: int) -> list[dict]:
    return [dict(GPU, index=i) for i in range(n)]


def telemetry(agent, gpu_list=(), free_slots=2) -> None:
    """A sample as the agent sends it: its GPUs and free slots (a contact: the node is online)."""
    agent.post("/agent/v1/telemetry", {"cpu": 5, "gpus": list(gpu_list), "free_slots": free_slots})


def create(server, client, agent_id: int, gpu_count: int | None = None, task_type: str = "train"):
    body = {"agent_id": agent_id, "type": task_type, "image": "x:1"}
    if gpu_count is not None:
        body["resources"] = {"gpus": gpu_count}
    return client.session.post(f"{server.url}/api/v1/tasks", json=body, timeout=10)


def waiting(client, task_id: int) -> dict | None:
    return client.get_task(task_id)["waiting"]


# --- refused at creation ---


def test_a_gpu_task_for_a_node_that_reported_no_gpu_is_refused(server, client, make_agent):
    agent = make_agent("cpu-box")
    telemetry(agent, [])
    r = create(server, client, agent.id, 1)
    assert r.status_code == 409, r.text
    err = r.json()
    assert err["error"] == "node_has_no_gpu"
    assert "cpu-box" in err["detail"] and "--gpus all" in err["detail"] and "doctor" in err["detail"]
    assert create(server, client, agent.id, 0).status_code == 200  # no GPU asked: fine
    assert create(server, client, agent.id).status_code == 200  # no count named: fine


def test_more_gpus_than_the_node_has_is_refused(server, client, make_agent):
    agent = make_agent("two-gpus")
    telemetry(agent, gpus(2))
    r = create(server, client, agent.id, 4)
    assert r.status_code == 409 and r.json()["error"] == "too_few_gpus"
    assert "4 GPUs" in r.json()["detail"] and "has 2" in r.json()["detail"]
    assert create(server, client, agent.id, 2).status_code == 200


def test_a_node_that_told_nothing_yet_gets_the_gpu_task(server, client, make_agent):
    """No telemetry yet: the node may be a GPU box whose agent is not started; the task waits."""
    agent = make_agent("not-started")
    r = create(server, client, agent.id, 1)
    assert r.status_code == 200, r.text
    assert r.json()["waiting"]["reason"] == "node_offline"


def test_a_deleted_node_is_409_and_an_unknown_one_404(server, client, make_agent):
    agent = make_agent("gone")
    create(server, client, agent.id, task_type="custom")
    client.delete_agent(agent.id)
    r = create(server, client, agent.id, task_type="custom")
    assert r.status_code == 409 and r.json()["error"] == "node_deleted"
    assert f"node {agent.id} was deleted" in r.json()["detail"]
    r = create(server, client, 999_999, task_type="custom")
    assert r.status_code == 404 and r.json()["error"] == "agent_not_found"


def test_a_type_the_node_does_not_run_is_409(server, client, make_agent):
    agent = make_agent("only-custom", ["custom"])
    r = create(server, client, agent.id, task_type="train")
    assert r.status_code == 409 and r.json()["error"] == "type_not_allowed"


# --- why a queued task waits ---


def test_never_connected_node(server, client, make_agent):
    agent = make_agent("fresh")
    t = client.create_task(agent.id, "custom", image="x:1")
    w = waiting(client, t["id"])
    assert w["reason"] == "node_offline" and "never connected" in w["detail"]
    assert w["since"] == t["timeline"][-1]["ts"] == t["created_at"]
    assert t["waiting"] == w  # the creation's answer says it too


def test_a_node_refusing_says_its_reason(server, client, make_agent):
    agent = make_agent("short-of-disk")
    agent.connect()
    why = "not enough disk: 120 MB free under /data, 2048 MB required (MIN_FREE_DISK_MB)"
    agent.poll(free_slots=0, refusing=why)
    t = client.create_task(agent.id, "custom", image="x:1")
    w = waiting(client, t["id"])
    assert w["reason"] == "node_refusing" and why in w["detail"]


def test_gpus_busy(server, client, make_agent):
    agent = make_agent("busy-gpus")
    telemetry(agent, gpus(2))
    big = client.create_task(agent.id, "train", image="x:1", resources={"gpus": 2})
    assert [t["id"] for t in agent.poll(free_slots=2, free_gpus=[0, 1])["tasks"]] == [big["id"]]
    t = client.create_task(agent.id, "train", image="x:1", resources={"gpus": 1})
    w = waiting(client, t["id"])
    assert w["reason"] == "gpus_busy" and "2 of the node's 2" in w["detail"]
    assert waiting(client, big["id"]) is None  # leased: it does not wait


def test_a_node_that_lost_its_gpus(server, client, make_agent):
    agent = make_agent("lost-gpus")
    t = client.create_task(agent.id, "train", image="x:1", resources={"gpus": 2})  # nothing reported yet
    telemetry(agent, gpus(1))
    w = waiting(client, t["id"])
    assert w["reason"] == "too_few_gpus" and "reports 1" in w["detail"]


def test_slots_full(server, client, make_agent):
    agent = make_agent("full")
    telemetry(agent, free_slots=0)
    t = client.create_task(agent.id, "custom", image="x:1")
    w = waiting(client, t["id"])
    assert w["reason"] == "slots_full" and "MAX_TASKS" in w["detail"]


def test_earlier_queued_tasks_take_the_free_slots(server, client, make_agent):
    agent = make_agent("one-slot")
    telemetry(agent, free_slots=1)
    first = client.create_task(agent.id, "custom", image="x:1")
    second = client.create_task(agent.id, "custom", image="x:1")
    assert waiting(client, first["id"])["reason"] == "waiting_for_poll"
    w = waiting(client, second["id"])
    assert w["reason"] == "slots_full" and "1 earlier queued" in w["detail"]


def test_waiting_for_the_poll_and_none_once_handed_out(server, client, make_agent):
    agent = make_agent("ready")
    telemetry(agent)
    t = client.create_task(agent.id, "custom", image="x:1")
    w = waiting(client, t["id"])
    assert w["reason"] == "waiting_for_poll" and "next poll" in w["detail"]
    agent.poll()
    assert waiting(client, t["id"]) is None


def test_a_released_task_waits_since_it_was_queued_again(server, client, make_agent):
    agent = make_agent("drainer")
    telemetry(agent)
    t = client.create_task(agent.id, "custom", image="x:1")
    agent.poll()
    agent.post(f"/agent/v1/tasks/{t['id']}/release")
    task = client.get_task(t["id"])
    assert task["state"] == "queued" and task["waiting"]["since"] == task["timeline"][-1]["ts"] > t["created_at"]


def test_a_task_of_a_deleted_node_is_failed_not_waiting(server, client, make_agent):
    agent = make_agent("removed")
    t = client.create_task(agent.id, "custom", image="x:1")
    client.delete_agent(agent.id)
    task = client.get_task(t["id"])
    assert task["state"] == "failed" and task["waiting"] is None


# --- the rules alone (no server) ---


def node(**kw) -> Node:
    base = dict(id=1, name="n", online=True, last_seen=time.time(), refusing="", gpus=0, free_slots=2, gpus_held=0)
    return Node(**{**base, **kw})


def queued(gpu_count: int = 0) -> dict:
    return {
        "id": 5,
        "agent_id": 1,
        "state": "queued",
        "resources": {"gpus": gpu_count},
        "timeline": [{"state": "queued", "ts": 100.0}],
        "created_at": 100.0,
    }


@pytest.mark.parametrize(
    ("n", "reason", "words"),
    [
        (None, "node_deleted", "was deleted"),
        (node(online=False, last_seen=1000.0 - 300), "node_offline", "last seen 5 min ago"),
        (node(online=False, last_seen=None), "node_offline", "never connected"),
        (node(refusing="draining"), "node_refusing", "takes no task now: draining"),
        (node(gpus=1), "too_few_gpus", "reports 1"),
        (node(gpus=4, gpus_held=3), "gpus_busy", "3 of the node's 4"),
    ],
)
def test_the_first_reason_that_holds(n, reason, words):
    # conn=None: none of these needs the queue behind the task
    w = why_waiting(None, queued(gpu_count=2), n, now=1000.0)
    assert w is not None and w["reason"] == reason and words in w["detail"] and w["since"] == 100.0


def test_offline_wins_over_refusing_and_gpus():
    w = why_waiting(None, queued(2), node(online=False, last_seen=990.0, refusing="x", gpus=0), now=1000.0)
    assert w is not None and w["reason"] == "node_offline" and "10 s ago" in w["detail"]


def test_only_a_queued_task_waits():
    assert why_waiting(None, dict(queued(), state="running"), node(), now=1000.0) is None


def test_the_task_list_says_why_each_queued_task_waits(server, client, make_agent):
    offline = make_agent("list-never-connected")
    polling = make_agent("list-polling")
    telemetry(polling, free_slots=0)
    a = create(server, client, offline.id).json()["id"]
    b = create(server, client, polling.id).json()["id"]
    listed = {t["id"]: t for t in client.list_tasks() if t["id"] in (a, b)}
    assert listed[a]["waiting"]["reason"] == "node_offline" and "never connected" in listed[a]["waiting"]["detail"]
    assert listed[b]["waiting"]["reason"] == "slots_full"
    assert listed[a]["waiting"] == waiting(client, a) and listed[b]["waiting"] == waiting(client, b)
    # a task that runs waits for nothing
    polling.poll_until("tasks", free_slots=1)
    polling.state(b, "running")
    assert next(t for t in client.list_tasks() if t["id"] == b)["waiting"] is None
