"""The supervisor's real loop on a fake clock and spawner: restarts, backoff, FATAL, hangs,
stop escalation and admission, without forking (tests/agent/fakes.py)."""

from __future__ import annotations

import signal

import pytest

from agent import admission
from agent.escalation import HUNG_KILL_AFTER_S
from agent.exitcodes import CHILD_CONFIG, EXIT_FATAL, EXIT_OK
from agent.restarts import HELPER_STOP_KILL_AFTER_S, START_GRACE_S
from agent.states import ChildState, SlotState
from agent.supervisor import FATAL_REPORT_WAIT_S, STOP_KILL_AFTER_S, Supervisor
from node.config import load_config
from node.storage import ensure_layout
from tests.agent.fakes import FakeAPI, FakeEngine, FakeSpawner

HUNG_S = 10.0


def make_sup(tmp_path, **env) -> Supervisor:
    c = load_config(
        {
            "SERVER_ADDRESS": "http://127.0.0.1:1",
            "ACCESS_TOKEN": "B" * 32,
            "AGENT_HOST_DIR": str(tmp_path / "root"),
            "MAX_TASKS": "2",
            "STOP_GRACE": "10",
            "HELPER_HUNG_AFTER": str(HUNG_S),
            "CHILD_RESTART_MAX": "5",
            "CHILD_RESTART_WINDOW": "60",
            **{k: str(v) for k, v in env.items()},
        }
    )
    ensure_layout(c)
    sup = Supervisor(c, api=FakeAPI(), spawner=FakeSpawner(), engine=FakeEngine())
    sup.gpu_pool = [0, 1]
    sup.start_helpers(sup.spawner.now())
    return sup


@pytest.fixture
def sup(tmp_path):
    return make_sup(tmp_path)


def tick(sup: Supervisor, dt: float = 0.0, silent: tuple[str, ...] = ()) -> float:
    """Advance the fake clock by dt and run one loop iteration then. Live children beat all the
    while, as real ones do, except those named in `silent` (hung)."""
    now = sup.spawner.advance(dt)
    for c in sup.spawner.children:
        if not c.reaped and c.code is None and c.name not in silent:
            c.beat = now
    sup.loop_once(now)
    return now


def task(tid: int, gpus: int = 0) -> dict:
    return {"id": tid, "type": "custom", "image": "x", "config": {}, "resources": {"gpus": gpus}}


def run_task(sup: Supervisor, tid: int, gpus: int = 0):
    sup.handle_answer({"tasks": [task(tid, gpus)], "stop": []}, sup.spawner.now())
    tick(sup)
    assert sup.slots[tid].state is SlotState.RUNNING
    return sup.spawner.live(f"task-{tid}")


def kill_and_restart(sup: Supervisor, name: str, lived: float = 0.0) -> float:
    """The helper dies after `lived` seconds; returns the backoff delay the loop chose."""
    child = sup.spawner.live(name)
    if lived:
        tick(sup, lived)
    child.code = -signal.SIGKILL
    now = tick(sup)
    h = sup.helpers[name]
    assert h.state is ChildState.BACKOFF and h.child is None
    delay = h.start_at - now
    assert sup.next_timeout(now) <= delay + 1e-9  # the wait wakes up in time
    tick(sup, delay - 0.001)
    assert h.state is ChildState.BACKOFF  # not a moment early
    tick(sup, 0.001)
    assert h.state is ChildState.STARTING and sup.spawner.live(name) is not child
    return delay


# --- helper restarts: backoff, FATAL, the start grace -------------------------------------------
def test_helper_restart_backs_off_exponentially_with_jitter(sup):
    h = sup.helpers["log-shipper"]
    h.policy.rng = lambda lo, hi: hi  # the top of the jitter range
    assert [kill_and_restart(sup, "log-shipper") for _ in range(3)] == pytest.approx([0.15, 0.3, 0.6])
    h.policy.rng = lambda lo, hi: lo  # its bottom
    assert kill_and_restart(sup, "log-shipper") == pytest.approx(0.4)
    h.policy.rng = __import__("random").uniform  # the real jitter: inside the band, not fixed
    h.policy.max_deaths = 100
    delays = [kill_and_restart(sup, "log-shipper") for _ in range(6)]
    bands = [min(10.0, 0.1 * 2**n) for n in range(4, 10)]
    assert all(0.5 * b <= d <= 1.5 * b for d, b in zip(delays, bands, strict=True)), (delays, bands)
    assert len({round(d / b, 6) for d, b in zip(delays, bands, strict=True)}) > 1, "no jitter"
    assert h.restarts == 10 and len(sup.spawner.spawned("log-shipper")) == 11
    assert sup.helpers["telemetry"].restarts == 0  # the other helper is untouched


def test_living_past_the_start_grace_resets_the_backoff(sup):
    h = sup.helpers["telemetry"]
    h.policy.rng = lambda lo, hi: 1.0
    assert kill_and_restart(sup, "telemetry") == pytest.approx(0.1)
    assert kill_and_restart(sup, "telemetry", lived=START_GRACE_S / 2) == pytest.approx(0.2)
    assert h.state is ChildState.STARTING
    assert kill_and_restart(sup, "telemetry", lived=START_GRACE_S / 2) == pytest.approx(0.4)
    tick(sup, START_GRACE_S)
    assert h.state is ChildState.RUNNING
    assert kill_and_restart(sup, "telemetry", lived=5.0) == pytest.approx(0.1)  # from the base again


def test_fatal_after_n_deaths_in_the_window_reported_once_without_blocking(tmp_path):
    sup = make_sup(tmp_path, CHILD_RESTART_MAX=3)
    for _ in range(2):
        kill_and_restart(sup, "telemetry")
    sup.spawner.live("telemetry").code = 1
    tick(sup)
    h = sup.helpers["telemetry"]
    assert h.state is ChildState.FATAL and h.child is None
    # the report is queued for the jobs thread; the loop went on at once
    assert sup.jobs.pending() >= 1 and sup.api.telemetry_posts == []
    for _ in range(5):
        tick(sup, 30)
    assert len(sup.spawner.spawned("telemetry")) == 3 and h.state is ChildState.FATAL  # never restarted
    sup.jobs.run_pending()
    (post,) = sup.api.telemetry_posts
    assert post["fatal"]["process"] == "telemetry"
    assert post["fatal"]["reason"].startswith("telemetry died 3 times within 60s (last: exited with code 1)")
    assert "cpu" in post  # a full sample came with it
    assert sup.exit_code is None and sup.free_slots() == 2  # the agent works on without telemetry
    tick(sup, 30)
    sup.jobs.run_pending()
    assert len(sup.api.telemetry_posts) == 1  # reported once


def test_deaths_spread_wider_than_the_window_never_go_fatal(tmp_path):
    sup = make_sup(tmp_path, CHILD_RESTART_MAX=3, CHILD_RESTART_WINDOW=10)
    for _ in range(6):
        kill_and_restart(sup, "telemetry", lived=6.0)
    assert sup.helpers["telemetry"].state is ChildState.STARTING


def test_only_deaths_within_the_window_grow_the_backoff(tmp_path):
    sup = make_sup(tmp_path, CHILD_RESTART_MAX=100, CHILD_RESTART_WINDOW=0.25)
    sup.helpers["telemetry"].policy.rng = lambda lo, hi: 1.0
    delays = [kill_and_restart(sup, "telemetry") for _ in range(8)]  # each killed at once
    assert delays == pytest.approx([0.1] + [0.2] * 7)  # never more than two deaths in 0.25 s


def test_log_shipper_fatal_exits_5_after_the_report(tmp_path):
    sup = make_sup(tmp_path, CHILD_RESTART_MAX=2)
    kill_and_restart(sup, "log-shipper")
    sup.spawner.live("log-shipper").code = -signal.SIGKILL
    now = tick(sup)
    assert sup.helpers["log-shipper"].state is ChildState.FATAL
    assert sup.exit_code is None and sup.api.telemetry_posts == []  # not blocked on the report
    assert sup.free_slots() == 0  # no new task while it exits
    sup.handle_answer({"tasks": [task(1)], "stop": []}, now)
    tick(sup, 1)
    assert sup.slots[1].state is SlotState.PENDING and sup.spawner.spawned("task-1") == []
    sup.jobs.run_pending()
    assert sup.exit_code is None  # the callback runs in the main thread
    tick(sup)
    assert sup.exit_code == EXIT_FATAL and len(sup.api.telemetry_posts) == 1


def test_log_shipper_fatal_exits_5_when_the_report_hangs(tmp_path):
    sup = make_sup(tmp_path, CHILD_RESTART_MAX=1)
    sup.spawner.live("log-shipper").code = 3
    now = tick(sup)
    assert sup.next_timeout(now) <= 1.0
    tick(sup, FATAL_REPORT_WAIT_S - 0.01)
    assert sup.exit_code is None
    tick(sup, 0.01)
    assert sup.exit_code == EXIT_FATAL and sup.api.telemetry_posts == []


def test_a_helper_with_unusable_settings_is_fatal_at_once(sup):
    sup.spawner.live("telemetry").code = CHILD_CONFIG
    tick(sup)
    assert sup.helpers["telemetry"].state is ChildState.FATAL and sup.helpers["telemetry"].restarts == 0
    sup.jobs.run_pending()
    assert "its settings are unusable" in sup.api.telemetry_posts[0]["fatal"]["reason"]


# --- hangs ----------------------------------------------------------------------------------------
def test_a_hung_helper_gets_term_then_kill_and_restarts(sup):
    shipper = sup.spawner.live("log-shipper")
    tick(sup, HUNG_S - 1)
    tick(sup, HUNG_S, silent=("log-shipper",))
    assert sup.spawner.signals_sent() == []  # silent exactly HUNG_S: not yet
    tick(sup, 0.5, silent=("log-shipper",))
    assert sup.spawner.signals_sent() == [("terminate", "log-shipper")]
    assert sup.next_timeout(sup.spawner.now()) <= 1.0
    tick(sup, HUNG_KILL_AFTER_S - 0.1, silent=("log-shipper",))
    assert sup.spawner.signals_sent() == [("terminate", "log-shipper")]  # TERM once, no KILL yet
    tick(sup, 0.1, silent=("log-shipper",))
    assert sup.spawner.signals_sent() == [("terminate", "log-shipper"), ("kill", "log-shipper")]
    assert shipper.code == -signal.SIGKILL
    tick(sup)
    h = sup.helpers["log-shipper"]
    assert h.state is ChildState.BACKOFF and h.restarts == 1  # a hang counts as a death
    assert sup.helpers["telemetry"].state is ChildState.RUNNING  # it kept beating


def test_a_hung_helper_that_obeys_term_is_not_killed(sup):
    tick(sup, HUNG_S + 1, silent=("log-shipper", "telemetry"))
    assert {c for c in sup.spawner.signals_sent()} == {("terminate", "log-shipper"), ("terminate", "telemetry")}
    for name in ("log-shipper", "telemetry"):
        sup.spawner.live(name).code = 0
    tick(sup, 1)
    tick(sup, HUNG_KILL_AFTER_S)
    assert not any(call[0] == "kill" for call in sup.spawner.calls)


def test_a_hung_task_process_is_killed_and_replaced_to_reattach_to_its_container(sup):
    first = run_task(sup, 7, gpus=1)
    sup.engine.running_containers.add(7)
    for _ in range(5):  # beating: left alone however long it runs
        tick(sup, HUNG_S * 2)
    assert sup.spawner.signals_sent() == []
    tick(sup, HUNG_S, silent=("task-7",))
    assert sup.spawner.signals_sent() == []
    tick(sup, 0.5, silent=("task-7",))
    assert sup.spawner.signals_sent() == [("terminate", "task-7")]  # ignored by a task process
    tick(sup, HUNG_KILL_AFTER_S, silent=("task-7",))
    assert ("kill", "task-7") in sup.spawner.calls and first.code == -signal.SIGKILL
    tick(sup)
    second = sup.spawner.live("task-7")
    slot = sup.slots[7]
    assert second is not first and second.role.adopt and slot.state is SlotState.RUNNING
    assert slot.gpus == [0] and second.role.gpus == [0] and slot.spawns == 2
    assert second.stop_bytes() == b""  # re-attaches; it is not asked to stop
    tick(sup, HUNG_S * 2)
    assert sup.spawner.signals_sent() == [("terminate", "task-7"), ("kill", "task-7")]


def test_a_task_process_that_beats_again_within_the_grace_is_spared(sup):
    run_task(sup, 9)
    tick(sup, HUNG_S + 1, silent=("task-9",))  # e.g. the whole agent was paused
    assert sup.spawner.signals_sent() == [("terminate", "task-9")]
    tick(sup, 1)  # it beats again
    tick(sup, HUNG_KILL_AFTER_S * 2)
    assert sup.spawner.signals_sent() == [("terminate", "task-9")] and sup.slots[9].state is SlotState.RUNNING
    tick(sup, HUNG_S + 1, silent=("task-9",))  # silent again: the watch starts over
    tick(sup, HUNG_KILL_AFTER_S, silent=("task-9",))
    assert sup.spawner.signals_sent()[-1] == ("kill", "task-9")


def test_a_hung_task_process_without_a_container_fails_the_task_saying_why(sup):
    run_task(sup, 8)
    tick(sup, HUNG_S + 1, silent=("task-8",))
    tick(sup, HUNG_KILL_AFTER_S, silent=("task-8",))
    tick(sup)
    slot = sup.slots[8]
    assert slot.state is SlotState.FINALIZING and slot.final[0] == "failed"
    assert slot.final[1].startswith("task process killed by SIGKILL (hung: no heartbeat for 1")
    sup.jobs.run_pending()
    tick(sup)
    assert sup.api.states == [(8, "failed", slot.final[1])] and 8 not in sup.slots


# --- stop escalation ------------------------------------------------------------------------------
@pytest.mark.parametrize("signals", [[signal.SIGTERM, signal.SIGTERM], [signal.SIGINT]])
def test_agent_stop_asks_tasks_then_kills_after_the_grace_then_stops_helpers(sup, signals):
    one, two = run_task(sup, 1), run_task(sup, 2)
    sup._signals.append(signals[0])
    tick(sup)
    if len(signals) == 2:
        assert sup.draining and not sup.stopping and one.stop_bytes() == b""  # the first one drains
        sup._signals.append(signals[1])
        tick(sup)
    assert sup.stopping and one.stop_bytes() == b"s" and two.stop_bytes() == b"s"
    assert {sup.slots[1].state, sup.slots[2].state} == {SlotState.STOPPING}
    two.code = 0  # task 2 stops in time and reports itself
    limit = sup.config.stop_grace_s + STOP_KILL_AFTER_S
    tick(sup, limit - 0.1)
    assert 2 not in sup.slots and sup.spawner.signals_sent() == []
    tick(sup, 0.1)
    assert sup.spawner.signals_sent() == [("kill", "task-1")]  # its stop pipe was the soft ask
    tick(sup)
    assert sup.slots[1].final == ("stopped", "task process killed by SIGKILL")
    sup.jobs.run_pending()
    tick(sup)
    assert sup.api.states == [(1, "stopped", "task process killed by SIGKILL")] and not sup.slots
    # then the helpers, in order: telemetry, then the log-shipper (it drains), each TERM -> KILL
    assert sup.spawner.signals_sent()[-1] == ("terminate", "telemetry")
    sup.spawner.live("telemetry").code = 0
    tick(sup, 0.1)
    assert sup.spawner.signals_sent()[-1] == ("terminate", "log-shipper")
    tick(sup, HELPER_STOP_KILL_AFTER_S)
    assert sup.spawner.signals_sent()[-1] == ("kill", "log-shipper") and sup.exit_code is None
    tick(sup)
    assert sup.exit_code == EXIT_OK
    assert all(c.reaped for c in sup.spawner.children)


def test_a_server_stop_is_not_escalated_while_the_agent_runs_on(sup):
    child = run_task(sup, 3)
    sup.handle_answer({"tasks": [], "stop": [3]}, sup.spawner.now())
    assert child.stop_bytes() == b"s" and sup.slots[3].state is SlotState.STOPPING
    for _ in range(5):
        tick(sup, 9)
    assert sup.spawner.signals_sent() == []
    sup._signals.append(signal.SIGINT)  # the agent stops: the old ask now escalates
    tick(sup)
    assert sup.spawner.signals_sent() == [("kill", "task-3")]


def test_a_task_replaced_while_stopping_is_asked_again(sup):
    child = run_task(sup, 4)
    sup.engine.running_containers.add(4)
    sup.handle_answer({"tasks": [], "stop": [4]}, sup.spawner.now())
    assert child.stop_bytes() == b"s"
    child.code = -signal.SIGSEGV
    tick(sup)
    new = sup.spawner.live("task-4")
    assert new.role.adopt and new.stop_bytes() == b"s"  # the new one sees the stop at once


# --- admission ------------------------------------------------------------------------------------
def test_admit_is_pure_and_keeps_id_order():
    a = admission.admit([(4, 0), (2, 2), (1, 1), (3, 1)], busy=0, max_tasks=3, pool=[0, 1, 2], used=[])
    # 1 takes GPU 0; 2 takes 1 and 2; 3 waits for a GPU; 4 needs none and takes the last slot
    assert a.start == [(1, [0]), (2, [1, 2]), (4, [])] and a.refuse == []
    assert admission.admit([(5, 1)], busy=3, max_tasks=3, pool=[0], used=[]).start == []
    a = admission.admit([(6, 3), (7, 1)], busy=0, max_tasks=2, pool=[0, 1], used=[1])
    assert a.refuse == [(6, "the task needs 3 GPU(s); this agent has 2")] and a.start == [(7, [0])]
    a = admission.admit([(8, 0), (9, 0)], busy=0, max_tasks=1, pool=[], used=[])
    assert a.start == [(8, [])]
    assert admission.free_slots(3, 1, refusing=False) == 2 and admission.free_slots(3, 1, refusing=True) == 0
    assert admission.free_slots(3, 5, refusing=False) == 0
    assert admission.free_gpus([0, 1, 2, 3], {1, 3}) == [0, 2]


def test_the_loop_admits_by_slots_and_gpus_and_frees_them(tmp_path):
    sup = make_sup(tmp_path, MAX_TASKS=3)
    now = sup.spawner.now()
    sup.handle_answer({"tasks": [task(1, 2), task(2, 1), task(3, 0), task(4, 3)], "stop": []}, now)
    tick(sup)
    assert [(c.name, c.role.gpus) for c in sup.spawner.children[2:]] == [("task-1", [0, 1]), ("task-3", [])]
    assert sup.slots[4].state is SlotState.FINALIZING  # more GPUs than the agent has
    assert sup.slots[2].state is SlotState.PENDING
    snap = sup.poller.snapshot
    assert (snap.free_slots, snap.free_gpus, snap.running) == (0, [], [1, 2, 3, 4])
    sup.spawner.live("task-1").code = 0  # 1 ends: its GPUs come back
    tick(sup)
    sup.jobs.run_pending()  # 4's final state goes out
    tick(sup)
    assert 1 not in sup.slots and 4 not in sup.slots
    assert sup.spawner.live("task-2").role.gpus == [0]
    assert sup.api.states == [(4, "failed", "the task needs 3 GPU(s); this agent has 2")]
    assert sup.engine.reaped == [[1, 2, 3, 4]]  # the first answer reaps orphans


# --- draining: tasks that arrive after SIGTERM are handed back ------------------------------------
def finish_helpers(sup: Supervisor) -> None:
    """The helpers obey their TERM in order (telemetry, then the log-shipper); the agent exits."""
    for name in ("telemetry", "log-shipper"):
        assert sup.spawner.signals_sent()[-1] == ("terminate", name)
        sup.spawner.live(name).code = 0
        tick(sup, 0.1)


@pytest.mark.parametrize("answer", ["queued", "409"])
def test_a_task_arriving_after_sigterm_is_handed_back_never_run(sup, answer):
    from protocol.errors import APIError

    if answer == "409":  # the task moved on meanwhile (a user stopped it): fine, nothing to retry
        sup.api.release_errors = [APIError(409, "task_final", "task 2 is already stopped")]
    one = run_task(sup, 1)
    sup._signals.append(signal.SIGTERM)
    tick(sup)
    assert sup.draining and not sup.stopping
    snap = sup.poller.snapshot
    assert (snap.free_slots, snap.running, snap.refusing) == (0, [1], "draining")
    # the poll sent before the SIGTERM (one slot free) answers now, with a new task
    sup.handle_answer({"tasks": [task(1), task(2)], "stop": []}, sup.spawner.now())
    tick(sup)
    assert 2 not in sup.slots and sup.spawner.spawned("task-2") == []
    snap = sup.poller.snapshot
    assert (snap.free_slots, snap.running, snap.refusing) == (0, [1], "draining")  # not counted
    assert sup.api.releases == [] and sup.handing_back == {2}  # the release waits for the jobs thread
    one.code = 0  # task 1 ends
    tick(sup)
    assert not sup.slots and sup.spawner.signals_sent() == []  # no exit before the hand-back is through
    sup.jobs.run_pending()
    tick(sup)
    assert sup.api.releases == [2] and not sup.handing_back
    finish_helpers(sup)
    assert sup.exit_code == EXIT_OK
    assert [c.name for c in sup.spawner.children if c.name.startswith("task-")] == ["task-1"]
    assert sup.api.states == []  # no final state invented for task 2


def test_tasks_leased_but_not_started_at_sigterm_are_handed_back(sup):
    from node import tasklog
    from node.masking import Masker

    w = tasklog.TaskLogWriter(sup.config, 3, Masker("B" * 32))  # task 3 was begun here before a restart
    w.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "before the restart"}])
    w.close()
    sup.handle_answer({"tasks": [task(1, 2), task(2, 1), task(3, 1)], "stop": []}, sup.spawner.now())
    tick(sup)
    one = sup.spawner.live("task-1")  # both GPUs: 2 and 3 wait for one
    assert sup.slots[2].state is SlotState.PENDING and sup.slots[3].state is SlotState.PENDING
    sup._signals.append(signal.SIGTERM)
    tick(sup)
    assert 2 not in sup.slots and sup.slots[3].state is SlotState.PENDING  # 3 re-attaches, 2 goes back
    sup.jobs.run_pending()
    assert sup.api.releases == [2]
    one.code = 0
    tick(sup)
    assert sup.spawner.spawned("task-2") == [] and sup.spawner.live("task-3").role.adopt
    sup.spawner.live("task-3").code = 0
    tick(sup)
    finish_helpers(sup)
    assert sup.exit_code == EXIT_OK


def test_hand_back_retries_outages_and_takes_a_refusal_as_final(monkeypatch):
    import threading

    from agent import reports
    from protocol.errors import APIError
    from tests.agent.fakes import FakeAPI

    monkeypatch.setattr(reports, "FINAL_BACKOFF_BASE_S", 0.001)
    monkeypatch.setattr(reports, "FINAL_BACKOFF_CAP_S", 0.002)
    api, stop = FakeAPI(), threading.Event()
    api.release_errors = [APIError(503, "http_error", "busy"), APIError(None, "no_answer", "ConnectionError")]
    assert reports.hand_back(api, 5, stop) is True and api.releases == [5, 5, 5]
    api.releases, api.release_errors = [], [APIError(409, "illegal_transition", "task 6 is running")]
    assert reports.hand_back(api, 6, stop) is False and api.releases == [6]  # no retry of a 409
    api.releases, api.release_errors = [], [APIError(503, "http_error", "busy")] * 1000
    assert reports.hand_back(api, 7, stop, give_up_s=0.05) is False and 1 < len(api.releases) < 1000
