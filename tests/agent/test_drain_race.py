"""The drain race with a real agent and server: a task created after SIGTERM, while the long-poll
sent before it (with a slot free) is still open, is handed back and never run here."""

from __future__ import annotations

import signal

import pytest

from node import tasklog
from node.config import load_config
from tests.agent.conftest import assert_counter_log
from tests.support.procs import poll_for


@pytest.mark.slow
def test_a_task_created_after_sigterm_is_handed_back_and_runs_on_the_next_start(server, make_agent):
    a = make_agent(server)

    def node() -> dict:
        r = a.admin.get(f"{server.url}/api/v1/agents/{a.id}")
        r.raise_for_status()
        return r.json()

    # MAX_TASKS=2: with task 1 running the agent polls with one slot free, for up to 60 s
    a.start(MAX_TASKS=2, POLL_WAIT=60)
    t1 = a.create_task(config={"lines": 100, "rate": 10})
    a.wait_state(t1, states=("running",), timeout=20)
    # The poll that handed out task 1 has ended (its row goes before its answer leaves), so an
    # open poll now is the one sent after task 1 was taken: one slot free.
    poll_for(lambda: node()["polls_open"] == 1, timeout=15, what="the long-poll sent after task 1")
    a.signal(signal.SIGTERM)
    poll_for(lambda: "SIGTERM: draining" in a.stderr(), timeout=10, what="the agent draining")
    assert node()["polls_open"] == 1, "the poll sent before the SIGTERM should still be open"
    t2 = a.create_task(config={"lines": 30, "rate": 0})

    # the open poll hands task 2 out; the draining agent hands it back
    poll_for(
        lambda: f"task {t2} (arrived after SIGTERM): draining, so it is handed back" in a.stderr(),
        timeout=15,
        what="task 2 handed back",
    )
    back = a.wait_state(t2, states=("queued",), timeout=15)
    poll_for(lambda: node()["refusing"] == "draining", timeout=15, what="the next poll saying it takes nothing")
    assert a.wait_exit(60) == 0
    assert a.task(t1)["state"] == "finished"
    assert_counter_log(a.logs(t1), 100)

    t = a.task(t2)
    states = [e["state"] for e in t["timeline"]]
    assert t["state"] == "queued" and states == ["queued", "assigned", "queued"], t
    assert back["state"] == "queued" and a.logs(t2) == []
    config = load_config(a.env())
    assert not config.task_dir(t2).exists() and tasklog.find_log_file(config, t2) is None  # never prepared
    assert f"task {t2}: task process" not in a.stderr() and f"task {t2} (" in a.stderr()

    # the next run of the same node takes it and runs it to the end, its log complete
    a.start()
    assert a.wait_state(t2, timeout=60)["state"] == "finished"
    assert_counter_log(a.logs(t2), 30)
    poll_for(lambda: node()["refusing"] == "", timeout=15, what="the refusal cleared by the new run")
    assert a.task(t1)["state"] == "finished"
