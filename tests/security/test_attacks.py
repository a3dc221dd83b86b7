"""Attacks by a hostile task on a shared node, each through the real agent and real containers.

Each test shows the attack failing and the same agent then running the next task with every
line exactly once. docs/security.md lists the defence each one checks."""

from __future__ import annotations

import errno
import hashlib

import pytest

from tests.security.conftest import AGENT_ENV, assert_serves_next, hashed_root, run_task, stdout, tmpfs
from tests.support.procs import poll_for
from tests.workers.test_data import make_model, make_project

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

# Capability numbers (linux/capability.h) a task must not have.
DROPPED = {"SETPCAP": 8, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31}
CHOWN = 0


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_token_is_nowhere_a_task_can_look(agent, user, attack_image):
    """Mount table, environment, task files, /etc: neither the token nor its reverse."""
    assert agent.root.is_symlink(), "the documented ~/.supervisely-agent/<token> is a link"
    real = hashed_root(agent.home, agent.token)
    assert agent.root.resolve() == real.resolve() and agent.token not in str(real)
    project = make_project(user, "sec-token", {"ds": {"a.png": b"pixels"}})
    done = run_task(agent, user, attack_image, "steal_token.sh", project_id=project["id"], config={"lr": 0.1})
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    out = stdout(agent, done["id"])
    assert out[-1] == "done"
    mountinfo = [m for m in out if m.startswith("DUMP /proc/self/mountinfo:") and "/sly_task_data" in m]
    assert len(mountinfo) == 6 and all(str(real.resolve()) in m for m in mountinfo), mountinfo
    dumps = [m for m in out if m.startswith(("DUMP", "REV"))]
    assert len(dumps) > 50
    reverse = agent.token[::-1]
    for line in agent.logs(done["id"]):
        assert agent.token not in line["message"] and reverse not in line["message"], line
    # Masking would have turned a plain token into ***: the dumps were never masked, so never had it.
    assert not [m for m in dumps if "***" in m]
    assert_serves_next(agent, user, attack_image)


@pytest.mark.slow
def test_inputs_are_read_only(agent, user, attack_image):
    """data/, model/, task_config.json and task_settings.json refuse every write; the cache stays true."""
    blobs = {"a.png": b"original pixels", "b.png": b"more pixels"}
    project = make_project(user, "sec-inputs", {"ds": blobs})
    model = make_model(user, "sec-model", {"config.json": b"{}", "weights.bin": b"weights"})
    done = run_task(
        agent,
        user,
        attack_image,
        "write_inputs.sh",
        project_id=project["id"],
        model_id=model["id"],
        config={"epochs": 1},
    )
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    out = stdout(agent, done["id"])
    assert not [m for m in out if m.startswith(("WROTE", "REMOVED", "CREATED"))], out
    refused = [m for m in out if m.startswith("refused")]
    assert len(refused) >= 2 + len(blobs) + 2 + 2, out  # config files, images, model files, two new files
    assert "results writable" in out and "tmp writable" in out
    task_dir = agent.root / "tasks" / str(done["id"])
    assert '"epochs": 1' in (task_dir / "task_config.json").read_text()
    # Every cached blob still hashes to its name: nothing reached the cache through a hard link.
    cached = [p for p in (agent.root / "storage").rglob("*") if p.is_file()]
    images = [p for p in cached if p.is_relative_to(agent.root / "storage" / "images")]
    assert len(images) == len(blobs)
    for p in images:
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name.split(".")[0], p
    for p in cached:
        assert b"poisoned" not in p.read_bytes(), p
    assert_serves_next(agent, user, attack_image)


@pytest.mark.slow
def test_fork_bomb_is_held_by_the_pid_limit(server, tmp_path, user, attack_image, docker_client):
    from tests.security.conftest import DefaultRootAgent

    agent = DefaultRootAgent(server, tmp_path / "home", "sec-fork-bomb")
    agent.home.mkdir()
    agent.start(handler=None, TASK_PIDS_LIMIT=64, **AGENT_ENV)
    try:
        done = run_task(agent, user, attack_image, "fork_bomb.sh", resources={"cpus": 0.5}, timeout=120)
        assert done["state"] == "finished", (done, agent.stderr()[-2000:])
        most = [int(m.split(": ")[1]) for m in stdout(agent, done["id"]) if m.startswith("most processes")]
        assert most and 40 < most[0] <= 64, most  # the bomb ran, and hit the wall
        assert_serves_next(agent, user, attack_image)
    finally:
        agent.kill_tree()


def test_capabilities_are_dropped(agent, user, attack_image):
    done = run_task(agent, user, attack_image, "caps.sh")
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    out = stdout(agent, done["id"])
    fields = dict(m.split(":\t") for m in out if ":\t" in m)
    eff = int(fields["CapEff"], 16)
    for name, bit in DROPPED.items():
        assert not eff & (1 << bit), f"CAP_{name} is effective in the task"
    assert eff & (1 << CHOWN), "the usual root capabilities stay (Supervisely images expect them)"
    assert int(fields["CapBnd"], 16) == eff and fields["NoNewPrivs"] == "1"
    assert {"mknod refused", "ping refused", "chroot refused"} <= set(out), out
    assert_serves_next(agent, user, attack_image)


@pytest.mark.slow
def test_durable_log_is_out_of_reach(agent, user, attack_image):
    done = run_task(agent, user, attack_image, "find_log.sh")
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    out = stdout(agent, done["id"])
    assert out[0].split() == [".", "..", "data", "model", "results", "task_config.json", "task_settings.json", "tmp"]
    assert not [m for m in out if m.startswith("FOUND")], out
    assert "no log to write" in out
    assert_serves_next(agent, user, attack_image)


def test_forged_agent_lines_land_as_container_output(agent, user, attack_image):
    done = run_task(agent, user, attack_image, "forge.sh")
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    lines = agent.logs(done["id"])
    assert [ln["seq"] for ln in lines] == list(range(len(lines)))
    forged = [ln for ln in lines if ln["message"].startswith("forged")]
    assert {ln["message"]: ln["stream"] for ln in forged} == {
        "forged agent line": "stdout",
        "forged with seq": "stdout",
        "forged on stderr": "stderr",
    }
    assert not [ln for ln in lines if ln["stream"] == "agent" and "forged" in ln["message"]]
    assert_serves_next(agent, user, attack_image)


def fill(path) -> None:
    """Write zeros to `path` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


@pytest.mark.slow
def test_full_disk_fails_the_task_cleanly(server, tmp_path, user, attack_image):
    """The storage dir is an 8 MB tmpfs, filled while the task prints: the task fails saying so,
    no seq is written twice, every line that reached the durable log arrives, and once space is
    freed the same agent runs the next task."""
    from tests.agent.conftest import AgentProcess

    root = tmp_path / "small"
    unmount = tmpfs(root, "8m")
    agent = AgentProcess(server, root / "agent", "sec-disk-full")
    try:
        agent.start(handler=None, **AGENT_ENV)
        task = user.create_task(agent.id, "custom", image=attack_image, command="on_full_disk.sh")
        poll_for(lambda: len(stdout(agent, task["id"])) == 100, timeout=60, what="the first 100 lines on the server")
        fill(root / "fill")
        (root / "agent" / "tasks" / str(task["id"]) / "tmp" / "go").touch()  # an empty file needs no block
        done = agent.wait_state(task["id"], timeout=120)
        assert done["state"] == "failed", (done, agent.stderr()[-3000:])
        assert done["error"].startswith("disk full") and "ENOSPC" in done["error"], done
        lines = agent.logs(done["id"])
        assert [ln["seq"] for ln in lines] == list(range(len(lines))), "no seq twice, none missing"
        out = [ln["message"] for ln in lines if ln["stream"] == "stdout"]
        assert out[:100] == [f"early {i}" for i in range(100)]
        assert out[100:] == [f"line {i}" for i in range(len(out) - 100)], "the lines that got in, in order, once"
        durable = next((root / "agent" / "tasks" / str(done["id"]) / "logs").glob("log_*.txt")).read_text()
        assert len(durable.splitlines()) == len(lines), "every line of the durable log arrived"
        (root / "fill").unlink()
        assert_serves_next(agent, user, attack_image)
    finally:
        agent.kill_tree()
        unmount()
