"""Lost tasks and their continuations: the lease reaper, and the retry policy that resumes a lost
task from its last checkpoint on another node.

A task whose agent stays silent past its lease becomes `lost` (preemption: a spot instance taken
back, a box rebooted). When the task has a retry policy (`retry: {max, agent_ids}` on create),
the transaction that marks it lost also creates its continuation: a queued task with
`resumed_from` set, on the first listed node that is online, allows the type and has the GPUs
(a node other than the lost one preferred), its model the lost task's last checkpoint model (else
its own model) and its config the original plus `resume` and, from a checkpoint,
`weights_init_type: "continue_training"`. Only that transition continues a task: `failed`,
`stopped` and timeouts never pass through here. docs/resume.md tells the whole story.

Exactly once: the loss is written with a guarded update (server/tasks/service.py
`change_state`: `WHERE state = <the state read>`), so of two reapers (two replicas) only one
moves the task and only that one creates the continuation, in the same transaction; the unique
index on `tasks.resumed_from` makes a second continuation impossible in the database as well.
"""

from __future__ import annotations

import time

from sqlalchemy import select, update

from protocol.errors import APIError
from protocol.states import TaskState
from server import db
from server.agents import service as agents
from server.tasks.service import LEASED_VALUES, StateRace, change_state, insert_queued
from server.tasks.waiting import wanted_gpus

CONTINUE_TRAINING = "continue_training"


def retry_policy(conn, retry, agent_id: int) -> dict | None:
    """The policy to store for a new task (a RetryIn or None): `{max, agent_ids, attempt: 0}`,
    the listed nodes in order without repeats (absent: the task's own node). 404
    agent_not_found for a listed node that does not exist."""
    if retry is None:
        return None
    ids = list(dict.fromkeys(retry.agent_ids)) if retry.agent_ids else [agent_id]
    a = db.agents.c
    known = set(conn.execute(select(a.id).where(a.id.in_(ids))).scalars())
    missing = [i for i in ids if i not in known]
    if missing:
        raise APIError(404, "agent_not_found", f"retry.agent_ids: no agent {missing[0]}")
    return {"max": retry.max, "agent_ids": ids, "attempt": 0}


def reap_lost(server, now: float | None = None) -> list[int]:
    """Leased tasks whose lease ran out become lost, each continued when its policy says so (in
    the same transaction). Returns the lost tasks' ids."""
    now = time.time() if now is None else now
    lost = []
    # This process's contacts not written yet, taken before the reads (as the nodes list does):
    # a node heard from a moment ago is online for the continuation's choice.
    shown = server.contacts.shown()
    with server.db.transaction() as conn:
        rows = (
            conn.execute(select(db.tasks).where(db.tasks.c.state.in_(LEASED_VALUES), db.tasks.c.lease_until < now))
            .mappings()
            .all()
        )
        for row in rows:
            why = f"the agent was silent for more than {server.settings.lease_s:g} s"
            try:
                task = change_state(conn, dict(row), TaskState.LOST, now, error=why)
            except StateRace:
                continue  # the agent reported meanwhile, or another replica's reaper was first
            # Only the transaction that made the task lost gets here: the continuation is made once.
            cont, note = continue_lost(server, conn, task, shown, now)
            if note:
                conn.execute(
                    update(db.tasks)
                    .where(db.tasks.c.id == task["id"])
                    .values(error=f"{why}; {note}", continued_by=cont["id"] if cont else None)
                )
            if cont is not None:
                server.wakeups.notify_agent(conn, cont["agent_id"])  # its waiting poll answers with it
            server.wakeups.notify_task(conn, row["id"])
            server.wakeups.notify_agent(conn, row["agent_id"])  # its waiting poll answers: the lost task goes in `stop`
            lost.append(row["id"])
    return lost


def continue_lost(server, conn, task: dict, shown, now: float) -> tuple[dict | None, str]:
    """The continuation of `task`, just made lost in this transaction, and a note for its
    `error`: (the new task's row, "continued as task N on node M ...") or (None, "not continued:
    <why>"); (None, "") for a task without a retry policy."""
    policy = task.get("retry")
    if not policy:
        return None, ""
    if task["stop_requested"]:
        return None, "not continued: a stop was requested"
    attempt, most = int(policy.get("attempt") or 0), int(policy["max"])
    if attempt >= most:
        return None, f"not continued: retry max {most} reached"
    node = _pick_node(server, conn, task, policy["agent_ids"], shown, now)
    if node is None:
        listed = ", ".join(str(i) for i in policy["agent_ids"])
        return None, f"not continued: no listed node online that allows {task['type']} (nodes {listed})"
    model_id, resume, checkpoint = resume_point(conn, task)
    config = dict(task["config"]) if isinstance(task["config"], dict) else {}
    if checkpoint:
        # From a checkpoint: the legacy plugins' way to go on training the model they are given.
        config["weights_init_type"] = CONTINUE_TRAINING
    config["resume"] = resume
    cont = _insert_continuation(conn, task, node, model_id, config, dict(policy, attempt=attempt + 1), now)
    where = (
        f"checkpoint epoch {_num(resume['epoch'])}"
        if "epoch" in resume
        else (f"checkpoint model {model_id}" if checkpoint else "the start")
    )
    return cont, f"continued as task {cont['id']} on node {node} from {where}"


def _num(x):
    """An epoch as people write it: 3, not 3.0."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _pick_node(server, conn, task: dict, listed: list[int], shown, now: float) -> int | None:
    """The first listed node that exists, is online, allows the task's type and has the GPUs it
    asks for (when its telemetry says how many); a node other than the lost one first."""
    lost_on = task["agent_id"]
    order = [i for i in listed if i != lost_on] + [i for i in listed if i == lost_on]
    need = wanted_gpus(task["resources"])
    for aid in order:
        try:
            a = agents.read_agent(conn, server.settings.offline_after, shown, server.wakeups.replica, aid, now)
        except APIError:
            continue  # deleted since the policy was made
        if a["status"] != "online" or task["type"] not in (a["allowed_task_types"] or []):
            continue
        tele = a["telemetry"]
        if need and tele is not None and len(tele.get("gpus") or []) < need:
            continue
        return aid
    return None


def resume_point(conn, task: dict) -> tuple[int | None, dict, bool]:
    """Where a continuation of `task` starts: (its model id, its config's `resume` object, whether
    that is a checkpoint of `task`). The task's last checkpoint model (the newest it posted) and
    that checkpoint's epoch when known; else the task's own model, and the epoch its own resume
    named for that model (a continuation lost before its first checkpoint starts where it did)."""
    checkpoints = (task.get("results") or {}).get("checkpoints") or []
    if checkpoints:
        mid = max(checkpoints)
        ck = conn.execute(select(db.models.c.checkpoint).where(db.models.c.id == mid)).scalar()
        resume: dict = {"task_id": task["id"], "model_id": mid}
        if isinstance(ck, dict) and ck.get("epoch") is not None:
            resume["epoch"] = _num(ck["epoch"])
        return mid, resume, True
    resume = {"task_id": task["id"], "model_id": task["model_id"]}
    before = (task["config"] or {}).get("resume") if isinstance(task["config"], dict) else None
    if isinstance(before, dict) and before.get("model_id") == task["model_id"] and "epoch" in before:
        resume["epoch"] = before["epoch"]
    return task["model_id"], resume, False


def _insert_continuation(conn, task: dict, agent_id: int, model_id, config: dict, retry: dict, now: float) -> dict:
    """The continuation's row: the lost task's image, command, project, resources and timeout on
    `agent_id`, queued, `resumed_from` the lost task."""
    return insert_queued(
        conn,
        now,
        agent_id=agent_id,
        type=task["type"],
        image=task["image"],
        command=task["command"],
        config=config,
        project_id=task["project_id"],
        dataset_id=task.get("dataset_id"),
        model_id=model_id,
        resources=task["resources"],
        timeout_s=task["timeout_s"],
        retry=retry,
        resumed_from=task["id"],
    )
