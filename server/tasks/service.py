"""Task rows: state changes (checked against protocol.states), the poll's hand-out, the lease reaper."""
from __future__ import annotations

import time

from sqlalchemy import bindparam, select, update

from server import db
from server.projects.service import read_project
from protocol.errors import APIError
from protocol.states import AGENT_REPORTABLE, FINAL, LEASED, IllegalTransition, TaskState, check_transition

LEASED_VALUES = [s.value for s in LEASED]

# The poll's statements, built once: a statement made per call costs its construction and its
# cache key every time, and a poll runs them hundreds of times a second.
_c = db.tasks.c
_TASK = select(db.tasks).where(_c.id == bindparam("tid"))
# Only ids and flags here: an agent may hold many leased tasks and a poll must stay cheap.
_MINE = (select(_c.id, _c.state, _c.stop_requested, _c.stop_delivered)
         .where(_c.agent_id == bindparam("aid"), _c.state.in_(LEASED_VALUES + [TaskState.LOST.value])).order_by(_c.id))
_VALID_TOKEN = (select(db.agents.c.id).where(db.agents.c.id == bindparam("aid"), db.agents.c.token_hash == bindparam("h"))
                .with_for_update(read=True, key_share=True))
_QUEUED = (select(db.tasks).where(_c.agent_id == bindparam("aid"), _c.state == TaskState.QUEUED.value)
           .order_by(_c.id).limit(200).with_for_update(skip_locked=True))


class StateRace(APIError):
    """The task left the state it was read in before the change was written (another request,
    thread or replica changed it first); the change was not made."""

    def __init__(self, task_id: int):
        super().__init__(409, "state_changed", f"task {task_id} changed meanwhile; read it again and retry")


def retry_race(fn, *args, tries: int = 5):
    """`fn(*args)` again (it reads afresh) while it loses a StateRace; the last loss is raised."""
    for i in range(tries):
        try:
            return fn(*args)
        except StateRace:
            if i == tries - 1:
                raise


def public_task(row) -> dict:
    """A task as the user API shows it."""
    t = dict(row)
    t.pop("lease_until", None)
    t["stop_requested"] = bool(t["stop_requested"])
    return t


def get_task(conn, task_id: int, stmt=None) -> dict | None:
    """The task's row; `stmt`: a prepared select of some of its columns by `tid` instead of all."""
    row = conn.execute(_TASK if stmt is None else stmt, {"tid": task_id}).mappings().first()
    return dict(row) if row else None


def own_task(conn, agent_id: int, task_id: int, stmt=None) -> dict:
    """The task if it belongs to agent `agent_id`; another agent's task is answered as missing
    (404). `stmt`: as for get_task, a select of some of its columns."""
    task = get_task(conn, task_id, stmt)
    if task is None or task["agent_id"] != agent_id:
        raise APIError(404, "task_not_found", f"no task {task_id} for this agent")
    return task


def change_state(conn, task: dict, new: TaskState, now: float | None = None, **values) -> dict:
    """Move a task to `new` (IllegalTransition if the edge is not allowed); timestamped in `timeline`.

    The write applies only if the task is still in the state it was read in: concurrent requests
    (threads, replicas) never both make a transition from the same state; the loser gets StateRace.
    """
    now = time.time() if now is None else now
    check_transition(TaskState(task["state"]), new)
    timeline = list(task["timeline"]) + [{"state": new.value, "ts": now}]
    values.update(state=new.value, timeline=timeline, updated_at=now)
    if new in FINAL:
        values["lease_until"] = None
    done = conn.execute(update(db.tasks).where(db.tasks.c.id == task["id"], db.tasks.c.state == task["state"])
                        .values(**values)).rowcount
    if done != 1:
        raise StateRace(task["id"])
    task = dict(task, **values)
    return task


def agent_task(conn, task: dict) -> dict:
    """A task as a poll answer shows it: project and model expanded with their items/files."""
    out = {"id": task["id"], "type": task["type"], "image": task["image"], "config": task["config"],
           "resources": task["resources"]}
    if task["command"] is not None:
        out["command"] = task["command"]
    if task["timeout_s"] is not None:
        out["timeout_s"] = task["timeout_s"]
    if task["project_id"] is not None:
        p = read_project(conn, task["project_id"], anns=True)
        if p is not None:
            out["project"] = {"id": p["id"], "name": p["name"], "meta": p["meta"],
                              "datasets": p["datasets"]}
    if task["model_id"] is not None:
        m = conn.execute(select(db.models).where(db.models.c.id == task["model_id"])).mappings().first()
        if m is not None:
            out["model"] = {"id": m["id"], "name": m["name"], "hash": m["hash"], "files": m["files"]}
    return out


def hand_out(core, conn, agent: dict, free_slots: int, free_gpus: int, running: list[int], now: float):
    """One poll's decisions. Returns (tasks for the agent, stop ids, stop ids not yet delivered).

    - a leased task missing from `running`: stopped if a stop was requested, else handed out again;
    - queued tasks in id order, as many as free slots, each only if its GPU count fits;
    - stop: this agent's leased tasks with a stop requested, and `running` ids the server has
      given up as lost (the agent should kill them).

    A queued task is claimed with a guarded update (and, on PostgreSQL, rows locked with SKIP
    LOCKED), so two polls racing on two replicas never both take it. Before anything is handed
    out, the agent's token is checked again in this transaction: a poll whose token was rotated
    or whose agent was deleted while it waited delivers nothing (401).
    """
    agent_id = agent["id"]
    running_set = set(running)
    mine = conn.execute(_MINE, {"aid": agent_id}).all()
    stop, new_stop, again = [], [], []
    for tid, state, stop_requested, stop_delivered in mine:
        if state == TaskState.LOST.value:
            if tid in running_set:
                stop.append(tid)
                if not stop_delivered:
                    new_stop.append(tid)
            continue
        if tid in running_set:
            if stop_requested:
                stop.append(tid)
                if not stop_delivered:
                    new_stop.append(tid)
        elif stop_requested:
            try:
                change_state(conn, get_task(conn, tid), TaskState.STOPPED, now, error="stopped before the agent ran it")
                core.notify_task(conn, tid)
            except StateRace:
                pass
        else:
            again.append(get_task(conn, tid))
    queued = []
    if free_slots > 0:
        queued = conn.execute(_QUEUED, {"aid": agent_id}).mappings().all()
    out = []
    slots, gpus = free_slots, free_gpus
    for t in again + [dict(r) for r in queued]:
        if t is None:
            continue
        if slots <= 0:
            break
        need = int((t["resources"] or {}).get("gpus") or 0)
        if need > gpus:
            continue
        if t["state"] != TaskState.ASSIGNED.value:
            try:
                t = change_state(conn, t, TaskState.ASSIGNED, now, lease_until=now + core.settings.lease_s)
            except StateRace:
                continue   # another poll claimed it (or a user stopped it) first
            core.notify_task(conn, t["id"])
        else:
            conn.execute(update(db.tasks).where(db.tasks.c.id == t["id"]).values(lease_until=now + core.settings.lease_s))
        out.append(agent_task(conn, t))
        slots -= 1
        gpus -= need
    if out:
        # FOR KEY SHARE on PostgreSQL: a rotation (an UPDATE of token_hash, a unique column) or a
        # removal waits for this transaction, or this read sees it. The contact batch's UPDATEs
        # of last_seen and telemetry_ts touch no unique column and do not conflict with it: a
        # hand-out never waits for them (FOR SHARE did, for as long as the batch's transaction).
        valid = conn.execute(_VALID_TOKEN, {"aid": agent_id, "h": agent["token_hash"]}).first()
        if valid is None:
            raise APIError(401, "unauthorized", "the agent token was rotated or the agent removed")
    return out, stop, new_stop


def reap_lost(core, now: float | None = None) -> list[int]:
    """Leased tasks whose lease ran out become lost. Returns their ids."""
    now = time.time() if now is None else now
    lost = []
    with core.transaction() as conn:
        rows = conn.execute(select(db.tasks).where(db.tasks.c.state.in_(LEASED_VALUES),
                                                   db.tasks.c.lease_until < now)).mappings().all()
        for row in rows:
            try:
                change_state(conn, dict(row), TaskState.LOST, now,
                             error=f"the agent was silent for more than {core.settings.lease_s:g} s")
            except StateRace:
                continue   # the agent reported meanwhile, or another replica's reaper was first
            core.notify_task(conn, row["id"])
            core.notify_agent(conn, row["agent_id"])   # its waiting poll answers: the lost task goes in `stop`
            lost.append(row["id"])
    return lost


def agent_change_state(conn, task: dict, body, now: float) -> dict:
    """An agent's state post: same state = progress update; otherwise a checked transition."""
    try:
        new = TaskState(body.state)
    except ValueError:
        raise APIError(400, "unknown_state", f"{body.state!r} is not a task state") from None
    values = {}
    if body.progress is not None:
        values["progress"] = body.progress.model_dump()
    if body.exit_code is not None:
        values["exit_code"] = body.exit_code
    if body.error is not None:
        values["error"] = body.error
    if new.value == task["state"]:
        if values:
            values["updated_at"] = now
            conn.execute(update(db.tasks).where(db.tasks.c.id == task["id"]).values(**values))
            task = dict(task, **values)
        return task
    if new not in AGENT_REPORTABLE:
        raise APIError(409, "illegal_transition", f"an agent cannot report the state {new.value}")
    try:
        return change_state(conn, task, new, now, **values)
    except IllegalTransition as e:
        raise APIError(409, "illegal_transition", str(e)) from None


def release_task(conn, task: dict, now: float) -> dict:
    """A draining agent returns a task it was given: assigned -> queued, lease cleared.

    Already queued: nothing to do (a retried release). A stop requested meanwhile wins: the task
    is stopped, since handing it out again would only deliver the stop. Any other state: 409
    (`task_final` for a final one, `illegal_transition` for one the agent has begun).
    """
    state = TaskState(task["state"])
    if state is TaskState.QUEUED:
        return task
    if state in FINAL:
        raise APIError(409, "task_final", f"task {task['id']} is already {state.value}")
    if state is not TaskState.ASSIGNED:
        raise APIError(409, "illegal_transition",
                       f"task {task['id']} is {state.value}; only an assigned task can be released")
    if task["stop_requested"]:
        return change_state(conn, task, TaskState.STOPPED, now, error="stopped before the agent ran it")
    return change_state(conn, task, TaskState.QUEUED, now, lease_until=None, stop_delivered=False)
