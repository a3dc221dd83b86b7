"""A long-poll that nobody woke answers at its end with what its last look found, without a
second look (server/agents/agent_router.py); so everything that changes its answer must wake it."""

from __future__ import annotations

import time

import pytest

from server.agents.agent_router import POLL_JITTER


@pytest.mark.slow
def test_a_task_lost_while_the_poll_waits_wakes_it_with_the_stop(own_server):
    srv, client, agent = own_server("--lease-s", "2")
    tid = client.create_task(agent.id, "custom", image="x:1")["id"]
    assert [t["id"] for t in agent.poll(free_slots=1)["tasks"]] == [tid]
    assert agent.state_raw(tid, "running").status_code == 200
    t0 = time.monotonic()
    # Silent but for this poll: the lease (2 s) runs out while it waits, the reaper makes the task
    # lost, and that must end the wait with the task in `stop` (not the empty answer at 20 s).
    answer = agent.poll(free_slots=0, running=[tid], wait=20)
    took = time.monotonic() - t0
    assert answer["stop"] == [tid], answer
    assert took < 10, f"the poll answered after {took:.1f} s"
    assert client.get_task(tid)["state"] == "lost"


def test_an_idle_poll_answers_at_its_end_with_the_stops_it_found(server, client, make_agent):
    agent = make_agent("idle")
    tid = client.create_task(agent.id, "custom", image="x:1")["id"]
    agent.poll(free_slots=1)
    assert agent.state_raw(tid, "running").status_code == 200
    client.stop_task(tid)
    assert agent.poll(free_slots=0, running=[tid])["stop"] == [tid]  # delivered: answered at once
    t0 = time.monotonic()
    answer = agent.poll(free_slots=0, running=[tid], wait=1.5)  # nothing new: waits it out
    assert time.monotonic() - t0 >= 1.5 * (1 - POLL_JITTER) - 0.05
    assert answer["tasks"] == [] and answer["stop"] == [tid] and answer["settings"]["name"] == "idle"


@pytest.mark.slow
def test_idle_polls_of_nodes_that_started_together_end_at_spread_out_times(server, client, make_agent):
    """A fleet that reconnects at once must not keep polling in step (a burst every `wait`)."""
    import threading

    agents = [make_agent(f"herd-{i}") for i in range(12)]
    ends: list[float] = []
    t0 = time.monotonic()

    def one(a):
        a.poll(free_slots=1, wait=2.0)
        ends.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(ends) == 12
    assert min(ends) >= 2.0 * (1 - POLL_JITTER) - 0.05 and max(ends) <= 2.0 + 1.0, ends
    assert max(ends) - min(ends) >= 0.1, ends  # 12 uniform draws over 0.4 s: never all within 0.1 s
