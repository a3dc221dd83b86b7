"""Why a task cannot run on its node (refused at creation, 409) and why a queued one waits.

Both are decided from what the server already holds about the node, read when asked: its row (last
contact, the refusal its last poll sent), its latest telemetry sample (GPUs, free slots), its open
long-polls and the GPUs its leased tasks hold. Nothing is stored: a reason is as fresh as the read.

A node that has sent no telemetry yet has told nothing about its GPUs: a GPU task for it is
accepted and waits (the node may be a GPU box whose agent is not started yet).
"""

from __future__ import annotations

import time
from typing import NamedTuple

from sqlalchemy import func, select

from protocol.errors import APIError
from protocol.states import LEASED, TaskState
from server import db
from server.agents import service as agents


class Node(NamedTuple):
    """What the server knows of a node that decides whether and when a task of it runs."""

    id: int
    name: str
    online: bool
    last_seen: float | None
    refusing: str  # "" while the node takes tasks
    gpus: int | None  # GPUs in its latest telemetry; None: no telemetry yet
    free_slots: int | None  # from its latest telemetry; None: not reported
    gpus_held: int  # GPUs its leased tasks asked for


def wanted_gpus(resources) -> int:
    """The GPU count a task names (a dict, a Resources model or None); 0 when it names none."""
    if resources is None:
        return 0
    gpus = resources.get("gpus") if isinstance(resources, dict) else getattr(resources, "gpus", None)
    return int(gpus or 0)


def read_node(conn, agent_id: int, shown, replica: str, offline_after: float, now: float) -> Node | None:
    """The node as a waiting task sees it (None when it does not exist); `shown`, `replica`: as for
    server/agents/service.py `read_agent` (this process's unwritten contacts on top of the rows)."""
    try:
        a = agents.read_agent(conn, offline_after, shown, replica, agent_id, now)
    except APIError:
        return None
    tele = a["telemetry"]
    t = db.tasks.c
    held = conn.execute(
        select(t.resources).where(t.agent_id == agent_id, t.state.in_([s.value for s in LEASED]))
    ).scalars()
    return Node(
        id=agent_id,
        name=a["name"],
        online=a["status"] == "online",
        last_seen=a["last_seen"],
        refusing=a["refusing"] or "",
        gpus=None if tele is None else len(tele.get("gpus") or []),
        free_slots=None if tele is None else tele.get("free_slots"),
        gpus_held=sum(wanted_gpus(r) for r in held),
    )


def _deleted(conn, agent_id: int) -> bool:
    """Did a node of this id exist? Ids are never reused, and its tasks keep naming it."""
    return conn.execute(select(db.tasks.c.id).where(db.tasks.c.agent_id == agent_id).limit(1)).first() is not None


def check_runnable(conn, agent_id: int, task_type: str, resources, node: Node | None) -> None:
    """409 when the node can never run such a task: it was deleted (`node_deleted`), it reported no
    GPU (`node_has_no_gpu`) or fewer than the task names (`too_few_gpus`). An unknown node is left
    to the task's creation (404 agent_not_found); so is a type the node does not allow (409)."""
    if node is None:
        if _deleted(conn, agent_id):
            raise APIError(
                409,
                "node_deleted",
                f"node {agent_id} was deleted; a task needs a node that exists (GET /api/v1/agents lists them)",
            )
        return
    need = wanted_gpus(resources)
    if need <= 0 or node.gpus is None:
        return
    if node.gpus == 0:
        raise APIError(
            409,
            "node_has_no_gpu",
            f"node {node.id} ({node.name}) reported no GPU in its latest telemetry and this {task_type} task "
            f"asks for {need}. If the machine has GPUs, its agent does not see them: start the agent's container "
            f"with --gpus all (the GPU form of the run command) and check it with ./run.sh doctor; "
            f"or send the task to a GPU node, or ask for no GPU.",
        )
    if need > node.gpus:
        raise APIError(
            409,
            "too_few_gpus",
            f"this {task_type} task asks for {need} GPUs and node {node.id} ({node.name}) has {node.gpus}",
        )


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h" if seconds < 172800 else f"{seconds // 86400} days"


def _queued_ahead(conn, task: dict) -> int:
    """Queued tasks of the same node created before this one: a poll hands them out first."""
    t = db.tasks.c
    return conn.execute(
        select(func.count()).where(t.agent_id == task["agent_id"], t.state == TaskState.QUEUED.value, t.id < task["id"])
    ).scalar_one()


def _queued_since(task: dict) -> float:
    """When the task last became queued (a released task is queued again)."""
    for entry in reversed(task.get("timeline") or []):
        if entry.get("state") == TaskState.QUEUED.value:
            return entry.get("ts") or task["created_at"]
    return task["created_at"]


def why_waiting(conn, task: dict, node: Node | None, now: float | None = None) -> dict | None:
    """`{reason, detail, since}` for a queued task (None for any other): the first that holds of
    node_deleted, node_offline, node_refusing, too_few_gpus, gpus_busy, slots_full, and else
    waiting_for_poll (the node takes it at its next poll)."""
    if task["state"] != TaskState.QUEUED.value:
        return None
    now = time.time() if now is None else now
    reason, detail = _reason(conn, task, node, now)
    return {"reason": reason, "detail": detail, "since": _queued_since(task)}


def _reason(conn, task: dict, node: Node | None, now: float) -> tuple[str, str]:
    if node is None:
        return "node_deleted", f"node {task['agent_id']} was deleted; this task will never run (stop it)"
    if not node.online:
        if node.last_seen is None:
            return "node_offline", (
                f"node {node.name} has never connected: start its agent with the run command shown when it "
                "was added (rotating its token shows a new one)"
            )
        return "node_offline", f"node {node.name} is offline (last seen {_ago(now - node.last_seen)} ago)"
    if node.refusing:
        return "node_refusing", f"node {node.name} takes no task now: {node.refusing}"
    need = wanted_gpus(task["resources"])
    if need and node.gpus is not None:
        if need > node.gpus:
            return "too_few_gpus", f"the task asks for {need} GPUs and node {node.name} reports {node.gpus}"
        free = node.gpus - node.gpus_held
        if need > free:
            return "gpus_busy", (
                f"the task asks for {need} GPUs; {node.gpus_held} of the node's {node.gpus} are held by its "
                "running tasks"
            )
    ahead = _queued_ahead(conn, task)
    if node.free_slots is not None and node.free_slots <= ahead:
        if node.free_slots == 0:
            return "slots_full", f"every task slot of node {node.name} is taken (MAX_TASKS on the node)"
        return "slots_full", (
            f"node {node.name} has {node.free_slots} free slot(s) and {ahead} earlier queued task(s) go first"
        )
    return "waiting_for_poll", f"waiting for node {node.name} to poll; it takes the task at its next poll"
