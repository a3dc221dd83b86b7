"""The agent's process tree with real processes, real signals and the real server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.agent.conftest import assert_counter_log
from tests.support.procs import free_port, poll_for
from tests.support.server import REPO


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


@pytest.mark.slow
def test_tree_titles_and_sigterm_drain(server, make_agent):
    """ps shows the tree while two tasks run; SIGTERM: no new task, both finish, exit 0."""
    a = make_agent(server).start()
    t1 = a.create_task(config={"lines": 40, "rate": 10})
    t2 = a.create_task(config={"lines": 30, "rate": 10})
    want = [
        "sly-agent: log-shipper",
        f"sly-agent: task {t1} custom [running]",
        f"sly-agent: task {t2} custom [running]",
        "sly-agent: telemetry",
    ]
    # a task process is titled [preparing] before [running]: wait for both to run
    titles = lambda: sorted(t.strip() for t in a.titles().values())  # noqa: E731
    poll_for(lambda: titles() == want, timeout=15, what="both task processes titled [running]")
    assert cmdline(a.proc.pid) == "sly-agent: supervisor"
    # children live in their own process groups
    assert all(os.getpgid(pid) == pid for pid in a.titles())
    # system info at connect, telemetry samples every TELEMETRY_INTERVAL (1 s here)
    info = a.admin.get(f"{server.url}/api/v1/agents/{a.id}").json()
    assert info["system_info"]["hostname"] and isinstance(info["system_info"]["gpus"], list)  # a GPU node too
    assert info["system_info"]["cpus"]["logical"] >= 1 and "docker" in info["system_info"]
    sample = poll_for(
        lambda: a.admin.get(f"{server.url}/api/v1/agents/{a.id}").json().get("telemetry"),
        timeout=10,
        what="a telemetry sample",
    )
    # the server keeps the compact sample (docs/protocol.md, telemetry)
    assert 0 <= sample["cpu"]["percent"] <= 100 and sample["memory"]["total"] == psutil.virtual_memory().total
    assert sample["disks"][0]["path"] == str(a.root) and len(sample["gpus"]) == len(info["system_info"]["gpus"])

    a.signal(signal.SIGTERM)
    t3 = a.create_task(config={"lines": 5, "rate": 0})
    assert a.wait_exit(60) == 0
    assert a.task(t1)["state"] == "finished" and a.task(t2)["state"] == "finished"
    assert a.task(t3)["state"] == "queued"  # no new task taken while draining
    assert_counter_log(a.logs(t1), 40)
    assert_counter_log(a.logs(t2), 30)
    log_files = list((a.root / "logs").glob("log_*.txt"))
    assert len(log_files) == 1 and "SIGTERM: draining" in log_files[0].read_text()


@pytest.mark.slow
def test_kill_helpers_repeatedly_mid_task(server, make_agent):
    """kill -9 of telemetry and log-shipper, 10 times each: back within seconds; logs complete."""
    a = make_agent(server).start(CHILD_RESTART_WINDOW=2, CHILD_RESTART_MAX=100)
    sup = a.proc.pid
    t1 = a.create_task(config={"lines": 200, "rate": 25, "batch": 5})
    t2 = a.create_task(config={"lines": 150, "rate": 20})
    poll_for(lambda: a.task_pid(t1) and a.task_pid(t2), timeout=15, what="two task processes")
    for _ in range(10):
        old = {role: a.child(role) for role in ("telemetry", "log-shipper")}
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        for role, pid in old.items():
            poll_for(lambda role=role, pid=pid: a.child(role) not in (None, pid), timeout=10, what=f"{role} restarted")
    assert a.proc.poll() is None and a.proc.pid == sup
    assert a.wait_state(t1)["state"] == "finished"
    assert a.wait_state(t2)["state"] == "finished"
    assert_counter_log(a.logs(t1), 200)
    assert_counter_log(a.logs(t2), 150)
    log = next((a.root / "logs").glob("log_*.txt")).read_text()
    assert log.count("log-shipper died (killed by SIGKILL)") == 10
    assert log.count("telemetry died (killed by SIGKILL)") == 10


def test_kill_task_process(server, make_agent):
    """kill -9 of a task process: the agent lives and the task ends failed, naming the signal."""
    a = make_agent(server).start()
    sup = a.proc.pid
    tid = a.create_task(config={"lines": 1000, "rate": 20})
    poll_for(lambda: a.task_pid(tid) and a.task(tid)["state"] == "running", timeout=15, what="task running")
    os.kill(a.task_pid(tid), signal.SIGKILL)
    t = a.wait_state(tid)
    assert t["state"] == "failed" and t["error"] == "task process killed by SIGKILL", t
    # its log up to the kill is on the server, contiguous
    lines = a.logs(tid)
    assert [line["seq"] for line in lines] == list(range(len(lines)))
    assert a.proc.poll() is None and a.proc.pid == sup
    ok = a.create_task(config={"lines": 5, "rate": 0})
    assert a.wait_state(ok)["state"] == "finished"


@pytest.mark.parametrize(
    "handler, reason", [("segfault", "killed by SIGSEGV"), ("raiser", "handler raised RuntimeError")]
)
@pytest.mark.slow  # over 2 s: outside the fast lane
def test_crashing_handlers(server, make_agent, handler, reason):
    a = make_agent(server).start(handler=handler)
    tid = a.create_task()
    t = a.wait_state(tid)
    assert t["state"] == "failed" and reason in t["error"], t
    assert a.proc.poll() is None
    if handler == "raiser":
        assert any(
            "handler raised RuntimeError" in line["message"] and line["stream"] == "agent" for line in a.logs(tid)
        )
        assert "password=***" in t["error"] and "hunter2" not in t["error"]  # the error is masked too
        assert not any("hunter2" in line["message"] for line in a.logs(tid))


@pytest.mark.slow
def test_kill_supervisor_and_restart_loses_nothing(server, make_agent):
    """kill -9 of the supervisor mid-task; the restarted agent adopts the task; no line lost or doubled."""
    a = make_agent(server).start()
    tid = a.create_task(config={"lines": 80, "rate": 20})
    poll_for(lambda: len(a.logs(tid)) >= 15, timeout=20, what="some lines shipped")
    children = list(a.titles())
    a.proc.kill()
    a.proc.wait(10)
    psutil.wait_procs([psutil.Process(p) for p in children if psutil.pid_exists(p)], timeout=10)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in children)
    a.start()
    t = a.wait_state(tid, timeout=60)
    assert t["state"] == "finished", t
    assert_counter_log(a.logs(tid), 80)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_server_outage_loses_no_line(fresh_server, make_agent):
    """The server stops for 12 s while a task logs 10 lines/s: every line arrives, once, in order.

    12 s is past the log shipper's backoff reaching its cap (0.25 s doubling to 5 s, about 7.75 s
    of failed sends, 11.6 s with the most jitter), and the task logs on for about 10 s after it."""
    import time

    a = make_agent(fresh_server).start()
    tid = a.create_task(config={"lines": 240, "rate": 10})
    poll_for(lambda: len(a.logs(tid)) >= 20, timeout=20, what="lines before the outage")
    fresh_server.stop()
    time.sleep(12)  # the outage itself (not synchronisation)
    fresh_server.start()
    poll_for(lambda: len(a.logs(tid)) >= 140, timeout=30, what="the lines written during the outage")
    t = a.wait_state(tid, timeout=90)
    assert t["state"] == "finished", t
    assert_counter_log(a.logs(tid), 240)


def test_stop_request_from_the_server(server, make_agent):
    a = make_agent(server).start(handler="sleeper")
    tid = a.create_task()
    a.wait_state(tid, states=("running",), timeout=15)
    a.admin.post(f"{server.url}/api/v1/tasks/{tid}/stop").raise_for_status()
    t = a.wait_state(tid, timeout=30)
    assert t["state"] == "stopped", t


def test_second_sigterm_stops_tasks(server, make_agent):
    a = make_agent(server).start(handler="sleeper")
    t1, t2 = a.create_task(), a.create_task()
    poll_for(lambda: all(a.task(t)["state"] == "running" for t in (t1, t2)), timeout=15, what="running")
    a.signal(signal.SIGTERM)
    # the same signal twice before the handler runs is one signal (POSIX): wait for the first
    poll_for(lambda: "SIGTERM: draining" in a.stderr(), timeout=10, what="drain")
    a.signal(signal.SIGTERM)
    assert a.wait_exit(30) == 0
    assert a.task(t1)["state"] == "stopped" and a.task(t2)["state"] == "stopped"


def test_secrets_never_reach_disk_or_server(server, make_agent):
    a = make_agent(server).start(handler="secret_logger")
    tid = a.create_task()
    assert a.wait_state(tid)["state"] == "finished"
    messages = [line["message"] for line in a.logs(tid)]
    assert "db password=*** connected" in messages and not any(a.token in m for m in messages)
    a.signal(signal.SIGTERM)
    assert a.wait_exit(30) == 0
    for p in a.root.rglob("*"):
        if p.is_file():
            assert a.token.encode() not in p.read_bytes(), p
    assert a.token not in a.stderr()


@pytest.mark.slow
def test_helper_fatal_is_logged_and_reported(server, make_agent):
    a = make_agent(server).start(CHILD_RESTART_MAX=3, CHILD_RESTART_WINDOW=60)
    for _ in range(3):
        pid = poll_for(lambda: a.child("telemetry"), timeout=10, what="telemetry")
        os.kill(pid, signal.SIGKILL)
        poll_for(lambda pid=pid: a.child("telemetry") != pid, timeout=10, what="telemetry gone")
    log_file = next((a.root / "logs").glob("log_*.txt"))
    poll_for(lambda: "telemetry died 3 times" in log_file.read_text(), timeout=10, what="FATAL in the log")

    def reported():
        r = a.admin.get(f"{server.url}/api/v1/agents/{a.id}")
        return "fatal" in (r.json().get("telemetry") or {})

    poll_for(reported, timeout=10, what="FATAL reported to the server")
    assert a.child("telemetry") is None and a.proc.poll() is None
    tid = a.create_task(config={"lines": 5, "rate": 0})
    assert a.wait_state(tid)["state"] == "finished"  # the agent still works without telemetry


# --- start-up errors: one line on stderr, a distinct exit code ---
def run_agent(env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("SERVER_ADDRESS", "ACCESS_TOKEN", "AGENT_HOST_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "agent"], cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_exit_codes(server, tmp_path):
    root = str(tmp_path / "root")
    cases = [
        ({"ACCESS_TOKEN": "x" * 32, "AGENT_HOST_DIR": root}, 2, "SERVER_ADDRESS"),
        ({"SERVER_ADDRESS": server.url, "ACCESS_TOKEN": "short", "AGENT_HOST_DIR": root}, 2, "ACCESS_TOKEN"),
        (
            {"SERVER_ADDRESS": server.url, "ACCESS_TOKEN": "A" * 32, "AGENT_HOST_DIR": root, "MAX_TASKS": "zero"},
            2,
            "MAX_TASKS",
        ),
        ({"SERVER_ADDRESS": server.url, "ACCESS_TOKEN": "A" * 32, "AGENT_HOST_DIR": root}, 3, "refused"),
        (
            {"SERVER_ADDRESS": f"http://127.0.0.1:{free_port()}", "ACCESS_TOKEN": "A" * 32, "AGENT_HOST_DIR": root},
            4,
            "unreachable",
        ),
    ]
    for env, code, word in cases:
        r = run_agent(env)
        assert r.returncode == code, (env, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr, r.stderr
        assert "A" * 32 not in r.stderr


def test_sighup_reloads_config(server, make_agent, tmp_path):
    """SIGHUP re-reads the settings: a raised MAX_TASKS admits the waiting task; helpers restart cleanly."""
    cfg = tmp_path / "agent.json"
    cfg.write_text('{"max_tasks": 1}')
    a = make_agent(server).start(handler="sleeper", AGENT_CONFIG=str(cfg))
    t1, t2 = a.create_task(), a.create_task()
    a.wait_state(t1, states=("running",), timeout=15)
    assert a.task(t2)["state"] == "queued"
    old = {a.child("telemetry"), a.child("log-shipper")}
    cfg.write_text('{"max_tasks": 2}')
    a.signal(signal.SIGHUP)
    a.wait_state(t2, states=("running",), timeout=15)
    poll_for(
        lambda: (
            a.child("telemetry") and a.child("log-shipper") and not old & {a.child("telemetry"), a.child("log-shipper")}
        ),
        timeout=10,
        what="helpers restarted",
    )
    assert "config reloaded (max_tasks=2" in a.stderr() and " died " not in a.stderr()


@pytest.mark.slow
def test_hung_helper_is_killed_and_restarted(server, make_agent):
    """Dead and hung are different: a stopped (SIGSTOP) log-shipper sends no heartbeat and is replaced."""
    a = make_agent(server).start(HELPER_HUNG_AFTER=2)
    pid = a.child("log-shipper")
    os.kill(pid, signal.SIGSTOP)
    poll_for(lambda: a.child("log-shipper") not in (None, pid), timeout=15, what="log-shipper replaced")
    assert f"log-shipper (pid {pid}) sent no heartbeat" in a.stderr()
    tid = a.create_task(config={"lines": 10, "rate": 0})
    assert a.wait_state(tid)["state"] == "finished"
    assert_counter_log(a.logs(tid), 10)


@pytest.mark.slow
def test_log_shipper_fatal_exits_5_and_a_restart_finishes_the_task(server, make_agent):
    """The log-shipper going FATAL ends the agent with code 5; restarted, it ships the log and finishes."""
    a = make_agent(server).start(CHILD_RESTART_MAX=2, CHILD_RESTART_WINDOW=60)
    tid = a.create_task(config={"lines": 60, "rate": 20})
    poll_for(lambda: a.task_pid(tid), timeout=15, what="task process")
    survivors = [psutil.Process(a.task_pid(tid)), psutil.Process(a.child("telemetry"))]
    for _ in range(2):
        pid = poll_for(lambda: a.child("log-shipper"), timeout=10, what="log-shipper")
        os.kill(pid, signal.SIGKILL)
        poll_for(lambda pid=pid: a.child("log-shipper") != pid, timeout=10, what="log-shipper gone")
    assert a.wait_exit(20) == 5
    assert "log-shipper died 2 times" in a.stderr()
    _, alive = psutil.wait_procs(survivors, timeout=10)  # orphaned children leave by themselves
    assert not alive
    a.start()
    assert a.wait_state(tid, timeout=60)["state"] == "finished"
    assert_counter_log(a.logs(tid), 60)
