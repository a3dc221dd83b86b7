"""The supervisor's slot/GPU accounting and poll handling, without forking (a fake spawner)."""

from __future__ import annotations

import pytest

from agent.states import SlotState
from agent.supervisor import Supervisor
from node.config import load_config
from node.storage import ensure_layout
from tests.agent.fakes import FakeSpawner


class DrySupervisor(Supervisor):
    """The real supervisor on a fake spawner; `spawned` lists (task id, GPUs, adopt) in spawn order."""

    @property
    def spawned(self) -> list[tuple[int, list[int], bool]]:
        return [
            (int(c.name.split("-")[1]), c.role.gpus, c.role.adopt)
            for c in self.spawner.children
            if c.name.startswith("task-")
        ]

    def handle_answer(self, answer, now=None):
        super().handle_answer(answer, self.spawner.now() if now is None else now)

    def admit_pending(self, now=None):
        super().admit_pending(self.spawner.now() if now is None else now)


@pytest.fixture
def sup(tmp_path):
    c = load_config(
        {
            "SERVER_ADDRESS": "http://127.0.0.1:1",
            "ACCESS_TOKEN": "B" * 32,
            "AGENT_HOST_DIR": str(tmp_path / "root"),
            "MAX_TASKS": "3",
        }
    )
    ensure_layout(c)
    s = DrySupervisor(c, api=None, spawner=FakeSpawner())
    s.gpu_pool = [0, 1, 2]
    return s


def task(tid: int, gpus: int = 0) -> dict:
    return {"id": tid, "type": "custom", "image": "x", "config": {}, "resources": {"gpus": gpus}}


def test_admits_by_slots_and_gpus(sup):
    sup.handle_answer({"tasks": [task(1, 2), task(2, 2), task(3, 1), task(4, 0)], "stop": []})
    sup.admit_pending()
    # task 2 wants 2 GPUs while only 1 is free: it waits; 3 and then the slot limit (3) stop the rest
    assert sup.spawned == [(1, [0, 1], False), (3, [2], False), (4, [], False)]
    assert sup.slots[2].state is SlotState.PENDING
    sup.update_snapshot()
    free_slots, free_gpus, running, refusing = sup.poller.snapshot
    assert (free_slots, free_gpus, running) == (0, [], [1, 2, 3, 4])
    sup.release(sup.slots[1], SlotState.DONE)  # task 1 ends: its GPUs come back
    sup.admit_pending()
    assert sup.spawned[-1] == (2, [0, 1], False)


def test_impossible_gpu_request_and_stop_before_start(sup):
    sup.handle_answer({"tasks": [task(5, 4), task(6), task(7), task(8), task(9)], "stop": []})
    sup.admit_pending()
    assert sup.slots[5].state is SlotState.FINALIZING and "needs 4 GPU(s)" in sup.slots[5].final[1]
    assert sup.slots[9].state is SlotState.PENDING
    sup.handle_answer({"tasks": [], "stop": [9]})
    assert sup.slots[9].state is SlotState.FINALIZING and sup.slots[9].final[0] == "stopped"


def test_draining_reports_no_free_slot_and_dedups_tasks(sup):
    sup.handle_answer({"tasks": [task(10)], "stop": []})
    sup.handle_answer({"tasks": [task(10)], "stop": []})  # handed out again: still one slot
    sup.admit_pending()
    assert [s[0] for s in sup.spawned] == [10]
    sup.handle_sigterm(sup.spawner.now())
    sup.update_snapshot()
    assert sup.poller.snapshot.free_slots == 0


def test_adopts_a_task_with_a_durable_log(sup):
    from node import tasklog
    from node.masking import Masker

    w = tasklog.TaskLogWriter(sup.config, 11, Masker("B" * 32))
    w.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "before the restart"}])
    w.close()
    sup.handle_answer({"tasks": [task(11), task(12)], "stop": []})
    sup.admit_pending()
    assert sup.spawned == [(11, [], True), (12, [], False)]


def test_disk_guard_refuses_while_short_and_says_why(sup):
    import dataclasses

    short = dataclasses.replace(sup.config, min_free_disk_mb=10**9)
    sup._apply_disk(sup.disk.check(short, evict=True))
    assert sup.free_slots() == 0 and "not enough disk" in sup.disk_refusal
    sup.update_snapshot()
    assert sup.poller.snapshot.free_slots == 0 and sup.poller.snapshot.refusing == sup.disk_refusal
    sup._apply_disk(sup.disk.check(dataclasses.replace(sup.config, min_free_disk_mb=1), evict=True))
    assert sup.disk_refusal == "" and sup.free_slots() == 3
