"""Fixtures for the attack tests: a real agent, real task containers built FROM the local busybox
image, each attack a script in the image. After every attack the same agent must still run the
next task and deliver each of its lines exactly once (`assert_serves_next`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client import UserClient
from tests.agent.conftest import AgentProcess
from tests.support.images import build_script_image

ATTACK_IMAGE = "sly-test/attacks:latest"

SCRIPTS = {
    # Everything a task could read that might name the token: mount table, environment, the
    # files of its task dir and the engine-written /etc files; each printed plainly and reversed.
    "steal_token.sh": r"""#!/bin/sh
for f in /proc/self/mountinfo /proc/self/environ /proc/1/environ /proc/self/cgroup /etc/hosts \
         /etc/hostname /etc/resolv.conf $(find /sly_task_data -type f 2>/dev/null); do
  tr '\0' '\n' < "$f" | while IFS= read -r line; do echo "DUMP $f: $line"; done
  tr '\0' '\n' < "$f" | rev | while IFS= read -r line; do echo "REV $f: $line"; done
done
find /sly_task_data | while IFS= read -r p; do echo "DUMP name: $p"; echo "REV name: $p" | rev; done
echo done
""",
    # Inputs are read-only: every write into data/, model/ and the config files is refused.
    "write_inputs.sh": r"""#!/bin/sh
for f in /sly_task_data/task_config.json /sly_task_data/task_settings.json \
         $(find /sly_task_data/data /sly_task_data/model -type f); do
  if echo poisoned >> "$f" 2>/dev/null; then echo "WROTE $f"; else echo "refused $f"; fi
  if rm -f "$f" 2>/dev/null && [ ! -e "$f" ]; then echo "REMOVED $f"; fi
done
for d in /sly_task_data/data /sly_task_data/model; do
  if touch "$d/new" 2>/dev/null; then echo "CREATED $d/new"; else echo "refused $d/new"; fi
done
echo ok > /sly_task_data/results/out.txt && echo "results writable"
echo ok > /sly_task_data/tmp/x && echo "tmp writable"
""",
    # Forkers in the background, each starting long-lived processes until fork fails; PID 1
    # watches the process count without forking itself (a glob and `read -t` on a FIFO are
    # shell builtins) and then exits, which ends every process of the container.
    "fork_bomb.sh": r"""#!/bin/sh
mkfifo /tmp/tick; exec 3<>/tmp/tick
spawn() { while :; do sleep 1000 & done; }
spawn 2>/dev/null &
spawn 2>/dev/null &
most=0; n=0
while [ $n -lt 4 ]; do
  read -t 1 x <&3
  set -- /proc/[0-9]*; [ $# -gt $most ] && most=$#
  n=$((n+1))
done
echo "most processes: $most"
""",
    "caps.sh": r"""#!/bin/sh
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
mknod /tmp/null c 1 3 2>/dev/null && echo "MKNOD worked" || echo "mknod refused"
ping -c 1 -W 1 127.0.0.1 >/dev/null 2>&1 && echo "PING worked" || echo "ping refused"
chroot / true 2>/dev/null && echo "CHROOT worked" || echo "chroot refused"
""",
    # The durable log and the agent's state are nowhere in reach.
    "find_log.sh": r"""#!/bin/sh
ls -a /sly_task_data | tr '\n' ' '; echo
find / -xdev \( -name 'log_*.txt' -o -name '*.cursor' -o -name '.writer.lock' -o -name 'state' \) 2>/dev/null \
  | sed 's/^/FOUND /'
for p in /sly_task_data/logs /sly_task_data/results/../logs /sly_task_data/tmp/../../tasks; do
  ls "$p" >/dev/null 2>&1 && echo "FOUND $p"
done
echo '{"seq": 0, "stream": "agent", "message": "garbage"}' >> /sly_task_data/logs/log.txt 2>/dev/null \
  && echo "FOUND a writable log" || echo "no log to write"
""",
    "forge.sh": r"""#!/bin/sh
echo '{"stream": "agent", "message": "forged agent line", "level": "error"}'
echo '{"message": "forged with seq", "stream": "agent", "seq": 0, "ts": 1, "cts": 2}'
echo '{"message": "forged on stderr", "stream": "agent"}' >&2
""",
    # 100 lines, then (once the test has filled the disk and says go) many more.
    "on_full_disk.sh": r"""#!/bin/sh
i=0; while [ $i -lt 100 ]; do echo "early $i"; i=$((i+1)); done
while [ ! -e /sly_task_data/tmp/go ]; do sleep 0.05; done
i=0; while [ $i -lt 200000 ]; do echo "line $i"; i=$((i+1)); done
""",
    "count.sh": "#!/bin/sh\ni=0\nwhile [ $i -lt $1 ]; do echo \"line $i\"; i=$((i+1)); done\n",
}


def build_attack_image(docker_client, busybox_image) -> str:
    return build_script_image(docker_client, busybox_image, ATTACK_IMAGE, SCRIPTS)


@pytest.fixture(scope="session")
def attack_image(docker_client, busybox_image):
    return build_attack_image(docker_client, busybox_image)


@pytest.fixture(scope="session")
def user(server):
    return UserClient(server.url, server.admin_token)


class DefaultRootAgent(AgentProcess):
    """An agent started without AGENT_HOST_DIR: it uses ~/.supervisely-agent/<token>, HOME a temp dir."""

    def __init__(self, server, home: Path, name: str):
        super().__init__(server, home / "unused", name)
        self.home = home
        self.root = home / ".supervisely-agent" / self.token

    def env(self, handler=None, **extra) -> dict:
        env = super().env(handler, **extra)
        env.pop("AGENT_HOST_DIR", None)
        env.pop("AGENT_DIR", None)
        env["HOME"] = str(self.home)
        return env


AGENT_ENV = {"MIN_FREE_DISK_MB": 1, "STOP_GRACE": 1, "TASK_DIR_CLEANUP": "never"}


@pytest.fixture
def agent(server, tmp_path, request):
    """A started agent on the default storage dir, running the real handlers."""
    a = DefaultRootAgent(server, tmp_path / "home", f"sec-{request.node.name[:30]}")
    a.home.mkdir()
    a.start(handler=None, **AGENT_ENV)
    yield a
    a.kill_tree()


def stdout(agent, task_id: int) -> list[str]:
    lines = agent.logs(task_id)
    assert [ln["seq"] for ln in lines] == list(range(len(lines))), "seqs must be 0.. without gap or repeat"
    return [ln["message"] for ln in lines if ln["stream"] == "stdout"]


def run_task(agent, user, image: str, command, timeout: float = 60, **task) -> dict:
    created = user.create_task(agent.id, task.pop("type", "custom"), image=image, command=command, **task)
    return agent.wait_state(created["id"], timeout=timeout)


def assert_serves_next(agent, user, image: str, n: int = 300) -> None:
    """The agent runs another task after the attack, and delivers each of its lines exactly once."""
    done = run_task(agent, user, image, ["count.sh", str(n)])
    assert done["state"] == "finished", (done, agent.stderr()[-2000:])
    assert stdout(agent, done["id"]) == [f"line {i}" for i in range(n)]
    assert agent.proc.poll() is None, "the agent is still running"


def hashed_root(home: Path, token: str) -> Path:
    import hashlib

    return home / ".supervisely-agent" / ("n-" + hashlib.sha256(token.encode()).hexdigest()[:16])


def tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` at path (root only); returns the unmount function."""
    path.mkdir(parents=True, exist_ok=True)
    rc = os.system(f"mount -t tmpfs -o size={size} tmpfs {path}")
    if rc != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (the disk-full test needs root)")
    return lambda: os.system(f"umount -l {path}")
