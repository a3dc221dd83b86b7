"""Forking 300 task processes while every process logs heavily never hangs (a stress test).

The supervisor forks from its main thread while its poller and jobs threads run HTTP calls and
multiprocessing-logging's receiver thread writes records from every child; each task process
writes its durable log and sends agent-log records through the shared queue.
"""

from __future__ import annotations

import time

import pytest

from tests.support.procs import poll_for

N_TASKS = 300


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fork_300_task_processes_while_all_log(server, make_agent):
    a = make_agent(server).start(MAX_TASKS=30, POLL_WAIT=2)
    t0 = time.monotonic()
    ids = [a.create_task(config={"lines": 200, "batch": 50, "rate": 0, "pylog": 10}) for _ in range(N_TASKS)]

    def all_final():
        r = a.admin.get(f"{server.url}/api/v1/tasks", params={"agent_id": a.id, "limit": 1000})
        items = r.json()["items"]
        return len(items) == N_TASKS and all(t["state"] in ("finished", "failed", "stopped") for t in items) and items

    items = poll_for(all_final, timeout=150, interval=0.5, what=f"{N_TASKS} tasks final")
    elapsed = time.monotonic() - t0
    assert {t["state"] for t in items} == {"finished"}
    for tid in ids[:: N_TASKS // 10]:
        lines = a.logs(tid)
        assert [line["message"] for line in lines if line["stream"] == "stdout"] == [f"line {i}" for i in range(200)]
    log = next((a.root / "logs").glob("log_*.txt")).read_text()
    assert log.count("chatty placeholder") == N_TASKS * 4 * 10  # every child's records arrived
    assert a.proc.poll() is None
    print(f"{N_TASKS} task processes in {elapsed:.1f}s")
