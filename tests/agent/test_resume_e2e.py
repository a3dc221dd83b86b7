"""Preemption end to end: two real agents (`python -m agent`, the real train handler, the real
Docker engine) and a legacy-style training image that continues from `/sly_task_data/model` and
the `resume` of its task_config.json.

- a node's agent and its container are killed (SIGKILL) mid-training: after the lease the server
  continues the task on the other node from the last checkpoint, which trains only the remaining
  epochs; the final model's lineage names both runs;
- the agent is back within the lease: it re-adopts its container and the task finishes there,
  with no continuation;
- the agent is back after the lease, its container still running: the task is lost (and
  continued elsewhere), and the agent removes that container.
"""

from __future__ import annotations

import json
import types

import pytest

from client import UserClient
from node.config import load_config
from tests.agent.conftest import AgentProcess
from tests.support.images import build_script_image
from tests.support.procs import poll_for
from tests.support.server import fixture_server
from workers.container import find_container
from workers.docker_task import write_task_config

EPOCHS = 5
# A legacy plugin's way, in sh: the model's weights from /sly_task_data/model, the epoch to go on
# from in the config's `resume` (absent: from the start), a checkpoint folder per epoch announced
# with an SDK CHECKPOINT line, metrics per epoch.
TRAIN = r"""#!/bin/sh
set -e
D=/sly_task_data
cmp -s $D/task_config.json $D/task_settings.json
start=$(grep -o '"epoch": *[0-9]*' $D/task_config.json | grep -o '[0-9]*$' || true)
[ -n "$start" ] || start=0
echo "weights_init_type $(grep -o '"weights_init_type": *"[a-z_]*"' $D/task_config.json | cut -d'"' -f4)"
if [ -f $D/model/weights.bin ]; then echo "starting from: $(cat $D/model/weights.bin)"; fi
echo "training epochs $((start+1))..EPOCHS"
i=$((start+1))
while [ $i -le EPOCHS ]; do
  sleep EPOCH_S
  c=$(printf '%08d' $i)
  mkdir -p $D/results/$c
  echo "weights of epoch $i" > $D/results/$c/weights.bin
  echo "{\"message\": \"metrics\", \"event_type\": \"EventType.METRICS\", \"type\": \"train\", \"epoch\": $i," \
    "\"metrics\": {\"loss\": 0.$i}}"
  echo "{\"message\": \"checkpoint\", \"event_type\": \"EventType.CHECKPOINT\", \"subdir\": \"$c\"," \
    "\"id\": $i, \"sizeb\": 18, \"best_now\": true, \"optional\": {\"epoch\": $i}}"
  i=$((i+1))
done
echo "training done"
"""
IMAGE = "sly-test/resume-train:latest"
# The lease is long enough for an agent to restart within it on a busy machine, short enough to
# make a loss in seconds.
LEASE_S = 8
AGENT_ENV = {"MIN_FREE_DISK_MB": 1, "STOP_GRACE": 1, "TASK_DIR_CLEANUP": "on-success", "POLL_WAIT": 2}


def e2e(test):
    """A test with real agents and containers: needs Docker, takes tens of seconds."""
    return pytest.mark.docker(pytest.mark.slow(pytest.mark.timeout(300)(test)))


@pytest.fixture(scope="module")
def train_image(docker_client, busybox_image):
    script = TRAIN.replace("EPOCHS", str(EPOCHS)).replace("EPOCH_S", "1.5")
    return build_script_image(docker_client, busybox_image, IMAGE, {"resume_train.sh": script})


@pytest.fixture
def cluster(tmp_path):
    """(server, user client, make_node) with LEASE_S leases; nodes are real agents, killed at the end."""
    srv = fixture_server(
        tmp_path / "server",
        extra_args=["--lease-s", str(LEASE_S), "--offline-after-s", "3", "--contact-flush-s", "0.2"],
    ).start()
    nodes: list[AgentProcess] = []

    def node(name: str) -> AgentProcess:
        a = AgentProcess(srv, tmp_path / name, f"resume-{name}")
        nodes.append(a)
        return a.start(handler=None, **AGENT_ENV)

    yield srv, UserClient(srv.url, srv.admin_token), node
    for a in nodes:
        a.kill_tree()
    srv.close()


def _stdout(user: UserClient, task_id: int) -> list[str]:
    return [ln["message"] for ln in user.iter_logs(task_id, follow=False) if ln["stream"] == "stdout"]


def _checkpoints(user: UserClient, task_id: int, n: int) -> list[int]:
    """Wait until the task has posted n checkpoint models; their ids."""
    return poll_for(
        lambda: len(ck := user.get_task(task_id)["results"].get("checkpoints") or []) >= n and ck,
        timeout=60,
        interval=0.2,
        what=f"{n} checkpoints of task {task_id}",
    )


def _container(docker_client, node: AgentProcess, task_id: int):
    """The node's container of the task, or None. Found by its labels: another test's agent on
    this engine may hold the name sly_task_<id>, and then ours has the agent's identity appended."""
    return find_container(docker_client, task_id, node.identity)


@e2e
def test_a_killed_node_s_training_continues_on_the_other_node_from_the_last_checkpoint(
    cluster, train_image, docker_client
):
    _, user, node = cluster
    a, b = node("a"), node("b")
    t = user.create_task(
        a.id, "train", image=train_image, command="resume_train.sh", retry={"max": 1, "agent_ids": [a.id, b.id]}
    )
    _checkpoints(user, t["id"], 2)
    # the metrics lines go out through the log shipper, apart from the checkpoints' uploads: wait
    # for the first two epochs' to be on the server too (what the dead node had not shipped yet
    # stays on its disk)
    poll_for(lambda: len(user.task_metrics(t["id"])) >= 2, timeout=30, interval=0.2, what="2 epochs' metrics")
    a.kill_tree()  # kill -9: the node is gone, and its container with it
    dead = _container(docker_client, a, t["id"])
    dead.kill()
    dead.remove()  # as the node would on its return: no container left for the tests after this one
    lost = user.wait_task(t["id"], {"lost"}, timeout=LEASE_S + 20)
    shipped = {m["epoch"] for m in user.task_metrics(t["id"])}
    assert {1, 2} <= shipped
    cont_id = lost["continued_by"]
    assert cont_id is not None, lost
    done = user.wait_task(cont_id, {"finished", "failed", "lost"}, timeout=90)
    assert done["state"] == "finished", (done, b.stderr()[-2000:])
    # from the lost run's last checkpoint
    ck = max(lost["results"]["checkpoints"])
    epoch = int(user.get_model(ck)["checkpoint"]["epoch"])  # a checkpoint's epoch is a number: 2.0
    assert epoch >= 2 and done["agent_id"] == b.id and done["model_id"] == ck and done["resumed_from"] == t["id"]
    assert done["config"] == {
        "weights_init_type": "continue_training",
        "resume": {"task_id": t["id"], "model_id": ck, "epoch": epoch},
    }
    assert lost["error"].endswith(f"continued as task {cont_id} on node {b.id} from checkpoint epoch {epoch}")
    # it trains only the remaining epochs, from the checkpoint's weights
    out = _stdout(user, cont_id)
    assert out[:3] == [
        "weights_init_type continue_training",
        f"starting from: weights of epoch {epoch}",
        f"training epochs {epoch + 1}..{EPOCHS}",
    ], out
    assert [m["epoch"] for m in user.task_metrics(cont_id)] == list(range(epoch + 1, EPOCHS + 1))
    chain = user.task_metrics(cont_id, chain=True)
    assert {m["task_id"] for m in chain} == {t["id"], cont_id}
    assert {m["epoch"] for m in chain} == shipped | set(range(epoch + 1, EPOCHS + 1))
    # its final model is the last epoch's, and its lineage names both runs
    final = user.get_model(done["results"]["model_id"])
    assert final["checkpoint"]["epoch"] == EPOCHS
    assert user.download_blob(final["files"][0]["sha256"]) == f"weights of epoch {EPOCHS}\n".encode()
    assert [(r["task_id"], r["agent_id"]) for r in final["lineage"]] == [(t["id"], a.id), (cont_id, b.id)]
    assert [x["id"] for x in user.list_tasks()] == [cont_id, t["id"]]


@e2e
def test_an_agent_back_within_the_lease_keeps_its_task(cluster, train_image, docker_client):
    _, user, node = cluster
    a, b = node("a"), node("b")
    t = user.create_task(
        a.id, "train", image=train_image, command="resume_train.sh", retry={"max": 1, "agent_ids": [b.id]}
    )
    _checkpoints(user, t["id"], 1)
    a.kill_tree()  # the agent dies; its container runs on
    assert _container(docker_client, a, t["id"]).status == "running"
    a.start(handler=None, **AGENT_ENV)  # back within the lease: it re-adopts the container
    done = user.wait_task(t["id"], {"finished", "failed", "lost"}, timeout=90)
    assert done["state"] == "finished", (done, a.stderr()[-2000:])
    assert done["continued_by"] is None and done["agent_id"] == a.id
    assert [m["epoch"] for m in user.task_metrics(t["id"])] == list(range(1, EPOCHS + 1))
    assert [x["id"] for x in user.list_tasks()] == [t["id"]]  # no continuation


@e2e
def test_an_agent_back_after_the_lease_removes_the_lost_task_s_container(cluster, train_image, docker_client):
    _, user, node = cluster
    a, b = node("a"), node("b")
    t = user.create_task(
        a.id, "train", image=train_image, command="resume_train.sh", retry={"max": 1, "agent_ids": [b.id]}
    )
    _checkpoints(user, t["id"], 1)
    a.kill_tree()  # the agent dies; its container runs on past the lease
    lost = user.wait_task(t["id"], {"lost"}, timeout=LEASE_S + 20)
    assert lost["continued_by"] is not None
    a.start(handler=None, **AGENT_ENV)
    poll_for(
        lambda: _container(docker_client, a, t["id"]) is None,
        timeout=30,
        what="the lost task's container removed by its returning agent",
    )
    assert user.get_task(t["id"])["state"] == "lost"
    done = user.wait_task(lost["continued_by"], {"finished", "failed", "lost"}, timeout=90)
    assert done["state"] == "finished" and done["agent_id"] == b.id


def test_a_continuation_s_resume_reaches_task_config_json_and_task_settings_json(tmp_path):
    """The agent writes the config as the server gives it: `resume` and `weights_init_type` arrive
    in both files (GPU indices renumbered as for any task)."""
    cfg = load_config(
        {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": "t" * 32, "AGENT_HOST_DIR": str(tmp_path)}
    )
    config = {
        "epochs": 5,
        "weights_init_type": "continue_training",
        "resume": {"task_id": 7, "model_id": 3, "epoch": 2},
    }
    task = {"id": 9, "type": "train", "image": "x", "config": config}
    ctx = types.SimpleNamespace(task=task, config=cfg, gpus=[], task_id=9, task_dir=cfg.task_dir(9))
    ctx.task_dir.mkdir(parents=True)
    write_task_config(ctx)
    for name in ("task_config.json", "task_settings.json"):
        assert json.loads((ctx.task_dir / name).read_text()) == config
