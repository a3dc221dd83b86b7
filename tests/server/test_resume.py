"""Retry policy and resume (server/tasks/lost.py): a lost task with a policy is continued once, on
another node, from its last checkpoint; nothing else is continued.

The nodes are FakeAgents: a node "dies" by going silent (no poll, no report) until its lease runs
out; a node is online while a Poller thread keeps long-polling for it. Short leases (2 s) make a
loss take two or three seconds.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from client import UserClient
from protocol.errors import APIError
from tests.server.test_replicas import needs_pg, pg_db  # noqa: F401 - pg_db: the replicas' database fixture
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.slow

# Leases renew through the batched contact writes: flushed every 0.1 s, the lease of a node that
# keeps polling never runs out between two flushes.
LEASE = ("--lease-s", "2", "--offline-after-s", "1", "--contact-flush-s", "0.1")


class Poller:
    """A node that stays online: long-polls on a thread, keeping the tasks it gets in `running`
    (their leases renew with every contact) and reporting them `running`."""

    def __init__(self, agent: FakeAgent, wait: float = 0.3):
        self.agent, self.wait = agent, wait
        self.running: list[int] = []
        self.got: list[dict] = []
        self.stops: set[int] = set()
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                answer = self.agent.poll(running=self.running, wait=self.wait)
            except Exception:  # noqa: BLE001 - the server may be stopping at the end of a test
                continue
            for t in answer["tasks"]:
                self.got.append(t)
                self.running.append(t["id"])
                self.agent.state(t["id"], "running")
            self.stops.update(answer["stop"])

    def task(self, timeout: float = 15) -> dict:
        """The first task this node was given."""
        return poll_for(lambda: self.got and self.got[0], timeout=timeout, what="a task for the online node")

    def halt(self) -> None:
        """Go silent: no more polls (the node "dies")."""
        self._halt.set()
        self._thread.join(10)


def _run_once(agent: FakeAgent, task_id: int) -> dict:
    """Take the task in one poll, report it running, and go silent: its lease runs out."""
    got = agent.poll_until("tasks")
    assert [t["id"] for t in got] == [task_id]
    agent.state(task_id, "running")
    return got[0]


def _checkpoint(agent: FakeAgent, task_id: int, epoch, data: bytes) -> int:
    """Post a checkpoint model (as the agent's results watch does); its model id."""
    ref = {"path": "weights.bin", "sha256": agent.upload(data), "size": len(data)}
    body = {"kind": "model", "name": f"ckpt {epoch}", "files": [ref], "checkpoint": {"epoch": epoch}}
    return agent.post(f"/agent/v1/tasks/{task_id}/results", body).json()["id"]


def _metrics(epoch: int, loss: float) -> dict:
    """A `metrics` log line as the agent ships it."""
    return {"message": "m", "event_type": "metrics", "type": "train", "epoch": epoch, "metrics": {"loss": loss}}


@pytest.fixture
def two_nodes(own_server):
    """(client, node a, node b) on a server of the test's own with 2 s leases."""
    srv, c, a = own_server(*LEASE, name="a")
    info = c.create_agent("b")
    return c, a, FakeAgent(srv.url, info["token"], info["id"])


def test_a_lost_task_is_continued_once_on_the_other_node_from_its_last_checkpoint(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)  # online from the start: the continuation goes to it
    try:
        model = c.create_model("base", [])
        config = {"epochs": 5, "lr": 0.01, "weights_init_type": "transfer_learning"}
        t = c.create_task(
            a.id,
            "train",
            image="trainer:1",
            command=["python", "train.py"],
            config=config,
            model_id=model["id"],
            resources={"cpus": 2},
            timeout_s=3600,
            retry={"max": 2, "agent_ids": [a.id, b.id]},
        )
        assert t["retry"] == {"max": 2, "agent_ids": [a.id, b.id], "attempt": 0}
        assert t["resumed_from"] is None and t["continued_by"] is None
        _run_once(a, t["id"])
        _checkpoint(a, t["id"], 1, b"epoch 1")
        ck2 = _checkpoint(a, t["id"], 2.0, b"epoch 2")
        # a dies
        got = node_b.task()
        lost = c.get_task(t["id"])
        assert lost["state"] == "lost"
        cont = c.get_task(got["id"])
        assert lost["continued_by"] == cont["id"]
        assert lost["error"].endswith(f"; continued as task {cont['id']} on node {b.id} from checkpoint epoch 2")
        assert cont["resumed_from"] == t["id"] and cont["agent_id"] == b.id and cont["model_id"] == ck2
        assert cont["retry"] == {"max": 2, "agent_ids": [a.id, b.id], "attempt": 1}
        resume = {"task_id": t["id"], "model_id": ck2, "epoch": 2}
        assert cont["config"] == dict(config, weights_init_type="continue_training", resume=resume)
        for k in ("type", "image", "command", "project_id", "resources", "timeout_s"):
            assert cont[k] == t[k], k
        # the poll answer: the checkpoint's files and the resume config
        assert got["model"]["id"] == ck2 and [f["path"] for f in got["model"]["files"]] == ["weights.bin"]
        assert got["config"]["resume"] == resume
        # b may read the checkpoint's blob: it is its leased task's model
        blob = b.request("GET", f"/agent/v1/blobs/{got['model']['files'][0]['sha256']}")
        assert blob.status_code == 200 and blob.content == b"epoch 2"
        # node a comes back still running the lost task: told to stop it; the task stays lost
        assert t["id"] in a.poll(running=[t["id"]])["stop"]
        assert a.state_raw(t["id"], "running").status_code == 409
        # the continuation finishes; its model's lineage names both runs
        final = _checkpoint(b, cont["id"], 5, b"epoch 5")
        b.state(cont["id"], "finished")
        lineage = c.get_model(final)["lineage"]
        assert [(r["task_id"], r["agent_id"], r["epoch"]) for r in lineage] == [
            (t["id"], a.id, None),
            (cont["id"], b.id, 2),
        ]
        assert [r["model_id"] for r in lineage] == [model["id"], ck2]
        assert [x["id"] for x in c.list_tasks()] == [cont["id"], t["id"]]
        assert c.get_model(ck2)["lineage"] == [
            {"task_id": t["id"], "agent_id": a.id, "state": "lost", "model_id": model["id"], "epoch": None}
        ]
    finally:
        node_b.halt()


def test_without_a_checkpoint_the_continuation_starts_from_the_original_model(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)
    try:
        model = c.create_model("base", [])
        config = {"weights_init_type": "transfer_learning"}
        retry = {"max": 1, "agent_ids": [b.id]}
        t = c.create_task(a.id, "train", image="trainer:1", config=config, model_id=model["id"], retry=retry)
        _run_once(a, t["id"])
        cont = c.get_task(node_b.task()["id"])
    finally:
        node_b.halt()
    assert cont["model_id"] == model["id"] and cont["resumed_from"] == t["id"]
    # from the start: the original weights_init_type is kept (continue_training is for a checkpoint)
    resume = {"task_id": t["id"], "model_id": model["id"]}
    assert cont["config"] == {"weights_init_type": "transfer_learning", "resume": resume}
    assert c.get_task(t["id"])["error"].endswith(f"continued as task {cont['id']} on node {b.id} from the start")


def test_without_a_policy_a_lost_task_stays_lost(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)
    try:
        t = c.create_task(a.id, "custom", image="x:1")
        assert t["retry"] is None
        _run_once(a, t["id"])
        lost = c.wait_task(t["id"], {"lost"}, timeout=15)
    finally:
        node_b.halt()
    assert lost["continued_by"] is None and "continued" not in lost["error"]
    assert not node_b.got and [x["id"] for x in c.list_tasks()] == [t["id"]]


def test_failed_stopped_and_timed_out_tasks_are_never_continued(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)
    try:
        policy = {"max": 3, "agent_ids": [a.id, b.id]}
        failed, stopped, timed_out, stop_then_lost = (
            c.create_task(a.id, "custom", image="x:1", retry=policy)["id"] for _ in range(4)
        )
        got = {t["id"] for t in a.poll(free_slots=4)["tasks"]}
        assert got == {failed, stopped, timed_out, stop_then_lost}
        for tid in got:
            a.state(tid, "running")
        a.state(failed, "failed", exit_code=3, error="something broke")
        a.state(timed_out, "failed", exit_code=137, error="deadline exceeded (10 s)")  # how a timeout ends
        c.stop_task(stopped)
        a.state(stopped, "stopped")
        c.stop_task(stop_then_lost)  # a person asked it to stop, then its node died
        lost = c.wait_task(stop_then_lost, {"lost"}, timeout=15)
        time.sleep(1.0)  # more reaper rounds: none continues anything
    finally:
        node_b.halt()
    assert lost["error"].endswith("not continued: a stop was requested") and lost["continued_by"] is None
    assert [c.get_task(t)["state"] for t in (failed, stopped, timed_out)] == ["failed", "stopped", "failed"]
    assert all(c.get_task(t)["continued_by"] is None for t in got)
    assert not node_b.got and len(c.list_tasks()) == 4


def test_a_chain_of_losses_respects_max_and_its_metrics_join_on_one_axis(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)
    try:
        t0 = c.create_task(a.id, "train", image="trainer:1", retry={"max": 2, "agent_ids": [a.id, b.id]})
        _run_once(a, t0["id"])
        a.log(t0["id"], _metrics(1, 0.9))
        _checkpoint(a, t0["id"], 1, b"e1")
        # a dies; b takes the continuation and trains one epoch
        c1 = node_b.task()
        b.log(c1["id"], _metrics(2, 0.5))
        ck2 = _checkpoint(b, c1["id"], 2, b"e2")
        node_a = Poller(a)  # a is back
    finally:
        node_b.halt()  # and b dies in turn: a gets the second continuation, a node other than b
    try:
        c2 = poll_for(lambda: next((x for x in node_a.got if x["id"] != t0["id"]), None), timeout=15, what="c2")
        assert c2["model"]["id"] == ck2
        assert c2["config"]["resume"] == {"task_id": c1["id"], "model_id": ck2, "epoch": 2}
        a.log(c2["id"], _metrics(3, 0.2))
        node_b = Poller(b)  # b is back
    finally:
        node_a.halt()  # and a dies again: max 2 is reached, c2 stays lost and says why
    try:
        last = c.wait_task(c2["id"], {"lost"}, timeout=15)
    finally:
        node_b.halt()
    assert last["retry"]["attempt"] == 2 and last["continued_by"] is None
    assert last["error"].endswith("not continued: retry max 2 reached")
    assert [c.get_task(x)["continued_by"] for x in (t0["id"], c1["id"])] == [c1["id"], c2["id"]]
    assert [x["id"] for x in c.list_tasks()] == [c2["id"], c1["id"], t0["id"]]
    # one epoch axis: the chain's metrics, oldest run first, each with its task
    assert [(m["task_id"], m["epoch"], m["metrics"]["loss"]) for m in c.task_metrics(c2["id"], chain=True)] == [
        (t0["id"], 1, 0.9),
        (c1["id"], 2, 0.5),
        (c2["id"], 3, 0.2),
    ]
    assert [m["epoch"] for m in c.task_metrics(c2["id"])] == [3]  # without chain: its own only


def test_no_listed_node_online_that_allows_the_type(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)  # online, but it does not run train tasks
    try:
        c.patch_agent(b.id, allowed_task_types=["inference"])
        on_b = c.create_task(a.id, "train", image="t:1", retry={"max": 1, "agent_ids": [b.id]})["id"]
        own = c.create_task(a.id, "train", image="t:1", retry={"max": 1})  # the default: its own node
        assert own["retry"]["agent_ids"] == [a.id]
        got = {x["id"] for x in a.poll(free_slots=2)["tasks"]}
        assert got == {on_b, own["id"]}
        lost = [c.wait_task(x, {"lost"}, timeout=15) for x in (on_b, own["id"])]
    finally:
        node_b.halt()
    assert lost[0]["error"].endswith(f"not continued: no listed node online that allows train (nodes {b.id})")
    assert lost[1]["error"].endswith(f"not continued: no listed node online that allows train (nodes {a.id})")
    assert len(c.list_tasks()) == 2


def test_the_agent_back_within_the_lease_keeps_its_task(two_nodes):
    c, a, b = two_nodes
    node_b = Poller(b)
    try:
        t = c.create_task(a.id, "custom", image="x:1", retry={"max": 1, "agent_ids": [b.id]})
        _run_once(a, t["id"])
        for _ in range(12):  # 3 leases: a's contacts keep renewing it
            a.poll(running=[t["id"]], wait=0.5)
        a.state(t["id"], "finished")
    finally:
        node_b.halt()
    assert c.get_task(t["id"])["state"] == "finished" and not node_b.got


def test_the_policy_is_checked_at_creation(client, make_agent):
    a = make_agent()
    s = client.session

    def post(retry) -> dict:
        r = s.post(
            f"{client.base}/api/v1/tasks", json={"agent_id": a.id, "type": "custom", "image": "x", "retry": retry}
        )
        return {"status": r.status_code, **r.json()}

    assert post({"max": 101})["error"] == "invalid_request"
    assert post({"max": -1})["error"] == "invalid_request"
    assert post({"max": 1, "agent_ids": []})["error"] == "invalid_request"
    assert post({"max": 1, "agent_ids": [a.id] * 101})["error"] == "invalid_request"
    assert post({"max": 1, "nodes": [1]})["error"] == "unknown_field"
    assert post({"max": 1, "agent_ids": [a.id], "attempt": 5})["error"] == "unknown_field"
    missing = post({"max": 1, "agent_ids": [a.id, 2_000_000]})
    assert missing["status"] == 404 and missing["error"] == "agent_not_found" and "2000000" in missing["detail"]
    ok = post({"max": 0, "agent_ids": [a.id, a.id]})
    assert ok["status"] == 200 and ok["retry"] == {"max": 0, "agent_ids": [a.id], "attempt": 0}
    with pytest.raises(APIError):
        client.create_task(a.id, "custom", image="x", retry={"max": 1, "agent_ids": ["x"]})


# --- two replicas on PostgreSQL --------------------------------------------------------------


@needs_pg
@pytest.mark.server_process("two replicas on one PostgreSQL database")
def test_two_replicas_notice_the_loss_and_exactly_one_continuation_is_made(pg_db, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    args = ["--db", pg_db, *LEASE]
    r1, r2 = ServerProcess(data, extra_args=args), ServerProcess(data, extra_args=args)
    r2.admin_token = r1.admin_token
    started = []
    try:
        for srv in (r1, r2):
            started.append(srv.start())
        c = UserClient(r1.url, r1.admin_token)
        ia, ib = c.create_agent("a"), c.create_agent("b")
        a = FakeAgent(r1.url, ia["token"], ia["id"])
        b = FakeAgent(r2.url, ib["token"], ib["id"])  # b polls the other replica
        ids = [c.create_task(a.id, "train", image="t:1", retry={"max": 1, "agent_ids": [b.id]})["id"] for _ in range(8)]
        got = a.poll(free_slots=8)["tasks"]
        assert sorted(t["id"] for t in got) == ids
        node_b = Poller(b)
        try:
            poll_for(lambda: len(node_b.got) == 8, timeout=20, what="8 continuations on b")
            conts = {t["id"] for t in node_b.got}
            c2 = UserClient(r2.url, r2.admin_token)
            for _ in range(3):  # both reapers have had several rounds since
                for client in (c, c2):
                    tasks = client.list_tasks()
                    for tid in ids:
                        made = [t["id"] for t in tasks if t.get("resumed_from") == tid]
                        assert len(made) == 1, (tid, made)
                        assert next(t for t in tasks if t["id"] == tid)["continued_by"] == made[0]
                    assert {t["id"] for t in tasks if t.get("resumed_from")} == conts
                time.sleep(0.5)  # more reaper rounds on both replicas: none makes a second continuation
            assert len(node_b.got) == 8
        finally:
            node_b.halt()
        # each loss was written by one replica's reaper (the one that also made its continuation)
        said = [_reaped(srv.log_path.read_text()) for srv in (r1, r2)]
        assert sorted(said[0] + said[1]) == ids, said
    finally:
        for srv in started:
            srv.stop()


def _reaped(log: str) -> list[int]:
    """The task ids a server's reaper made lost, from its log lines `tasks lost (...): [ids]`."""
    out: list[int] = []
    for line in log.splitlines():
        if "tasks lost (agent silent past the lease): [" in line:
            out += json.loads(line[line.index("[", line.index("tasks lost")) :])
    return out
