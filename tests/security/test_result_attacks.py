"""Attacks through a task's results/, each through the real agent and real containers: many
folders against the host's inotify watches, more files or bytes than a task may upload, a sparse
file that would grow on the server. Each fails, and the same agent then runs the next task.
docs/security.md lists the defence each one checks."""

from __future__ import annotations

import psutil
import pytest

from tests.security.conftest import AGENT_ENV, assert_serves_next, run_task
from tests.support.procs import poll_for
from tests.workers.test_results_bounds import artifacts, inotify_watches
from workers.results_watch import WATCH_DIRS

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


def agent_watches(agent) -> int:
    """inotify watches held by the agent and every process below it."""
    n = 0
    for p in [psutil.Process(agent.proc.pid), *psutil.Process(agent.proc.pid).children(recursive=True)]:
        try:
            n += inotify_watches(p.pid)
        except (OSError, psutil.Error):
            continue
    return n


@pytest.mark.slow
def test_many_folders_do_not_exhaust_the_hosts_inotify_watches(agent, user, attack_image):
    """2,000 folders with a file each: the agent holds at most WATCH_DIRS watches meanwhile (it
    held one per folder), and every file still arrives while the task runs (by scanning)."""
    task = user.create_task(
        agent.id,
        "custom",
        image=attack_image,
        command=[
            "sh",
            "-c",
            """
        cd /sly_task_data/results; i=0
        while [ $i -lt 2000 ]; do mkdir d$i; echo $i > d$i/f; i=$((i+1)); done
        echo made $i; while [ ! -e /sly_task_data/tmp/go ]; do sleep 0.1; done""",
        ],
    )
    most = 0

    def all_arrived() -> bool:
        nonlocal most
        most = max(most, agent_watches(agent))
        return len(artifacts(user, task["id"])) == 2000

    poll_for(all_arrived, timeout=120, interval=0.2, what="2000 files uploaded while the task runs")
    assert most <= WATCH_DIRS, most
    (agent.root / "tasks" / str(task["id"]) / "tmp" / "go").touch()
    done = agent.wait_state(task["id"], timeout=60)
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    assert {a["path"] for a in artifacts(user, task["id"])} == {f"d{i}/f" for i in range(2000)}
    said = [ln["message"] for ln in agent.logs(task["id"]) if ln["stream"] == "agent"]
    assert any(m.startswith(f"results: more than {WATCH_DIRS} folders under results/ (at most") for m in said)
    assert_serves_next(agent, user, attack_image)


@pytest.fixture
def limited_agent(server, tmp_path):
    from tests.agent.conftest import AgentProcess

    a = AgentProcess(server, tmp_path / "agent", "sec-results-limit")
    a.start(handler=None, TASK_RESULTS_MAX_FILES=100, TASK_RESULTS_MAX_MB=5, **AGENT_ENV)
    yield a
    a.kill_tree()


@pytest.mark.slow
def test_results_past_the_limits_fail_the_task_cleanly(limited_agent, user, attack_image):
    """300 files with TASK_RESULTS_MAX_FILES=100, then 20 MB with TASK_RESULTS_MAX_MB=5: each task
    fails saying which limit, and the agent runs the next task."""
    many = run_task(
        limited_agent,
        user,
        attack_image,
        ["sh", "-c", "cd /sly_task_data/results; i=0; while [ $i -lt 300 ]; do echo $i > f$i; i=$((i+1)); done"],
    )
    assert many["state"] == "failed", many
    assert many["error"] == "results: more than 100 files (TASK_RESULTS_MAX_FILES); upload refused"
    assert len(artifacts(user, many["id"])) <= 100
    big = run_task(
        limited_agent, user, attack_image, ["sh", "-c", "head -c 20000000 /dev/urandom > /sly_task_data/results/big"]
    )
    assert big["state"] == "failed", big
    assert big["error"] == "results: more than 5 MB read from results/ (TASK_RESULTS_MAX_MB); upload refused"
    assert not artifacts(user, big["id"])
    assert_serves_next(limited_agent, user, attack_image)


@pytest.mark.slow
def test_a_sparse_file_is_not_amplified(agent, user, attack_image):
    """A 2 GiB file of holes (no byte on the node's disk) is skipped, not read and uploaded as 2 GiB."""
    done = run_task(
        agent,
        user,
        attack_image,
        [
            "sh",
            "-c",
            "cd /sly_task_data/results; "
            "dd if=/dev/zero of=holes bs=1 count=0 seek=2147483648 2>/dev/null; echo ok > small",
        ],
    )
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    assert [(a["path"], a["size"]) for a in artifacts(user, done["id"])] == [("small", 3)]
    said = [ln["message"] for ln in agent.logs(done["id"]) if ln["stream"] == "agent"]
    assert any(m.startswith(f"results: holes is sparse ({2 << 30} bytes") for m in said), said
    assert_serves_next(agent, user, attack_image)
