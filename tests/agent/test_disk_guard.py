"""The free-disk guard: short of disk, the agent takes no task and says why on the server."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.support.procs import poll_for


@pytest.mark.slow
def test_short_of_disk_refuses_tasks_with_the_reason_then_takes_them_after_reload(server, make_agent, tmp_path):
    agent = make_agent(server)
    config_file = tmp_path / "agent.json"
    config_file.write_text(json.dumps({"min_free_disk_mb": 10**9}))  # a petabyte: always short
    agent.start(AGENT_CONFIG=str(config_file))

    def refusing():
        a = agent.admin.get(f"{server.url}/api/v1/agents/{agent.id}").json()
        return a.get("refusing")

    reason = poll_for(refusing, timeout=30, what="the agent to report that it refuses tasks")
    assert "not enough disk" in reason and "MIN_FREE_DISK_MB" in reason

    tid = agent.create_task(config={"lines": 3})
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # several polls go by: the task stays queued
        assert agent.task(tid)["state"] == "queued"
        time.sleep(0.3)

    config_file.write_text(json.dumps({"min_free_disk_mb": 1}))
    agent.signal(signal.SIGHUP)  # reload: the guard looks again within seconds
    assert agent.wait_state(tid, timeout=60)["state"] == "finished"
    assert refusing() == ""
