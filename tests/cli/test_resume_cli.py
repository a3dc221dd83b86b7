"""The CLI and the retry policy: `tasks submit --retry N --retry-nodes ...`, and `tasks logs
--follow` going on through a lost task's continuation (docs/resume.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from client import UserClient
from tests.cli.test_cli import cli, cli_env, cli_json
from tests.server.test_resume import LEASE, Poller, _checkpoint
from tests.support.fake_agent import FakeAgent
from tests.support.server import REPO, fixture_server

pytestmark = pytest.mark.slow


@pytest.fixture
def short_lease_server(tmp_path):
    srv = fixture_server(tmp_path / "data", extra_args=list(LEASE)).start()
    yield srv
    srv.close()


def test_submit_with_retry_and_follow_the_chain(short_lease_server):
    srv = short_lease_server
    c = UserClient(srv.url, srv.admin_token)
    a, b = (FakeAgent(srv.url, (x := c.create_agent(n))["token"], x["id"]) for n in ("a", "b"))
    p = cli(srv, "tasks", "submit", "--node", str(a.id), "--type", "train", "--retry-nodes", "1", ok=False)
    assert p.returncode != 0 and "--retry-nodes needs --retry N" in p.stderr
    t = cli_json(
        srv, "tasks", "submit", "--node", str(a.id), "--type", "train", "--image", "x:1", "--retry", "1",
        "--retry-nodes", f"{a.id},{b.id}",
    )  # fmt: skip
    assert t["retry"] == {"max": 1, "agent_ids": [a.id, b.id], "attempt": 0}
    node_b = Poller(b)
    try:
        assert [x["id"] for x in a.poll_until("tasks")] == [t["id"]]
        a.state(t["id"], "running")
        a.log(t["id"], "first run, epoch 1", "first run, epoch 2")
        _checkpoint(a, t["id"], 2, b"e2")
        follower = subprocess.Popen(
            [sys.executable, "-m", "client", "tasks", "logs", str(t["id"]), "--follow"],
            cwd=REPO,
            env=cli_env(srv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            cont = node_b.task()  # a went silent: its task is lost and continued on b
            b.log(cont["id"], "second run, epoch 3")
            b.state(cont["id"], "finished")
            out, err = follower.communicate(timeout=60)
        finally:
            if follower.poll() is None:
                follower.kill()
    finally:
        node_b.halt()
    assert follower.returncode == 0, err
    assert [ln.split(" ", 1)[1] for ln in out.splitlines()] == [
        "first run, epoch 1",
        "first run, epoch 2",
        "second run, epoch 3",
    ]
    assert f"task {t['id']} lost; continued as task {cont['id']} on node {b.id} from checkpoint epoch 2" in err
    assert err.rstrip().endswith(f"task {cont['id']} finished")
