"""Tasks: creating, listing, reading and stopping them (the user's side), state changes checked
against protocol.states, the poll's hand-out, resume chains read back (the lease reaper and the
continuation of a lost task are in server/tasks/lost.py)."""

from __future__ import annotations

import time

from sqlalchemy import bindparam, insert, select, update

from protocol.errors import APIError
from protocol.states import AGENT_REPORTABLE, FINAL, LEASED, IllegalTransition, TaskState, check_transition
from protocol.tasks import CONTAINER_TYPES, TASK_TYPES
from server import db
from server.db.rows import get_row
from server.projects.service import items_page
from server.public import tokens
from server.tasks.schemas import RETRY_MAX

LEASED_VALUES = [s.value for s in LEASED]

# The poll's statements, built once: a statement made per call costs its construction and its
# cache key every time, and a poll runs them hundreds of times a second.
_c = db.tasks.c
_TASK = select(db.tasks).where(_c.id == bindparam("tid"))
# Only ids and flags here: an agent may hold many leased tasks and a poll must stay cheap.
_MINE = (
    select(_c.id, _c.state, _c.stop_requested, _c.stop_delivered)
    .where(_c.agent_id == bindparam("aid"), _c.state.in_(LEASED_VALUES + [TaskState.LOST.value]))
    .order_by(_c.id)
)
_VALID_TOKEN = (
    select(db.agents.c.id)
    .where(db.agents.c.id == bindparam("aid"), db.agents.c.token_hash == bindparam("h"))
    .with_for_update(read=True, key_share=True)
)
_QUEUED = (
    select(db.tasks)
    .where(_c.agent_id == bindparam("aid"), _c.state == TaskState.QUEUED.value)
    .order_by(_c.id)
    .limit(200)
    .with_for_update(skip_locked=True)
)
_p = db.projects.c
_PROJECT = select(_p.id, _p.name, _p.meta, _p.datasets).where(_p.id == bindparam("pid"))
_TASK_PROJECT = select(_c.agent_id, _c.state, _c.project_id).where(_c.id == bindparam("tid"))


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


# A new task's results: small totals only; its artifacts are rows, paged by TASK_ARTIFACTS.
EMPTY_RESULTS = {"artifacts_count": 0, "artifacts_bytes": 0, "result_files": 0, "result_bytes": 0}


def check_new_task(body) -> None:
    """What a new task (a TaskIn) must be before the database is asked: 400 unknown_type for an
    unknown type, 400 invalid_request for a container type without an image or an empty command."""
    if body.type not in TASK_TYPES:
        raise APIError(400, "unknown_type", f"unknown task type {body.type!r}; known: {list(TASK_TYPES)}")
    if body.type in CONTAINER_TYPES and not body.image:
        raise APIError(400, "invalid_request", f"a {body.type} task needs an image")
    if isinstance(body.command, str) and not body.command.strip() or body.command == []:
        raise APIError(400, "invalid_request", "command must not be empty (leave it out for the image's own)")


def create_task(conn, body, now: float, retry: dict | None = None) -> dict:
    """A queued task (from a TaskIn checked by check_new_task) for its agent; its row. 404 for an
    unknown agent, project or model; 409 type_not_allowed when the agent does not run its type.
    `retry`: its retry policy as stored (server/tasks/lost.py `retry_policy`)."""
    # Not server.agents.service.agent_row: that module builds on this one (the poll's hand-out).
    agent = get_row(conn, db.agents, body.agent_id, "agent")
    if body.type not in agent["allowed_task_types"]:
        raise APIError(
            409,
            "type_not_allowed",
            f"agent {agent['id']} does not run {body.type} tasks (allowed: {agent['allowed_task_types']})",
        )
    project_id = body.project_id
    if body.dataset_id is not None:
        if body.type != "app":
            raise APIError(400, "invalid_request", "dataset_id is for app tasks (their DATASET_ID)")
        ds = conn.execute(select(db.datasets.c.project_id).where(db.datasets.c.id == body.dataset_id)).first()
        if ds is None:
            raise APIError(404, "dataset_not_found", f"no dataset {body.dataset_id}")
        if project_id is not None and project_id != ds[0]:
            raise APIError(400, "invalid_request", f"dataset {body.dataset_id} is not in project {project_id}")
        project_id = ds[0]
    for oid, table, what in ((project_id, db.projects, "project"), (body.model_id, db.models, "model")):
        if oid is not None and conn.execute(select(table.c.id).where(table.c.id == oid)).first() is None:
            raise APIError(404, f"{what}_not_found", f"no {what} {oid}")
    resources = (
        body.resources.model_dump()
        if body.resources
        else {"gpus": None, "cpus": None, "memory": None, "shm_size": None}
    )
    return insert_queued(
        conn,
        now,
        agent_id=agent["id"],
        type=body.type,
        image=body.image,
        command=body.command,
        config=body.config or {},
        project_id=project_id,
        dataset_id=body.dataset_id,
        model_id=body.model_id,
        resources=resources,
        timeout_s=body.timeout_s,
        retry=retry,
    )


def insert_queued(conn, now: float, **fields) -> dict:
    """Insert a task, queued now, from its own fields (agent_id, type, image, ...); its row."""
    tid = conn.execute(
        insert(db.tasks).values(
            **fields,
            state=TaskState.QUEUED.value,
            stop_requested=False,
            timeline=[{"state": TaskState.QUEUED.value, "ts": now}],
            results=dict(EMPTY_RESULTS),
            log_acked=-1,
            created_at=now,
            updated_at=now,
        )
    ).inserted_primary_key[0]
    task = get_task(conn, tid)
    assert task is not None  # inserted just now, in this transaction
    return task


def list_tasks(conn, agent_id: int | None, state: str | None, limit: int, before: int | None) -> list[dict]:
    """Up to limit + 1 tasks (one more tells a next page exists), newest first, as the user API
    shows them: optionally of one agent, in one state, with ids below `before`."""
    t = db.tasks
    q = select(t).order_by(t.c.id.desc()).limit(limit + 1)
    if agent_id is not None:
        q = q.where(t.c.agent_id == agent_id)
    if state is not None:
        q = q.where(t.c.state == state)
    if before is not None:
        q = q.where(t.c.id < before)
    return [public_task(r) for r in conn.execute(q).mappings().all()]


def task_or_404(conn, task_id: int) -> dict:
    """The task's row, or 404 task_not_found."""
    task = get_task(conn, task_id)
    if task is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    return task


def stop_task(conn, task_id: int) -> dict:
    """A user's stop: a queued task is stopped at once; a leased one is marked, and its agent's
    next poll answer carries the stop. 404 unknown, 409 task_final; StateRace as change_state."""
    task = task_or_404(conn, task_id)
    if TaskState(task["state"]) in FINAL:
        raise APIError(409, "task_final", f"task {task_id} is already {task['state']}")
    if task["state"] == TaskState.QUEUED.value:
        return change_state(
            conn, task, TaskState.STOPPED, error="stopped by a user before it started", stop_requested=True
        )
    conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(stop_requested=True, updated_at=time.time()))
    return dict(task, stop_requested=True)


def artifacts_page(conn, task_id: int, after: str | None, limit: int) -> list[dict]:
    """Up to limit + 1 of the task's artifacts {path, sha256, size} by path, those after `after`
    (a path). 400 bad_cursor for an `after` no path can be, 404 for an unknown task."""
    if after is not None and "\x00" in after:  # no path holds one, and PostgreSQL refuses it in a query
        raise APIError(400, "bad_cursor", "after must be the `next` value of a previous page")
    a = db.task_artifacts.c
    q = select(a.path, a.sha256, a.size).where(a.task_id == task_id).order_by(a.path).limit(limit + 1)
    if after:
        q = q.where(a.path > after)
    if conn.execute(select(db.tasks.c.id).where(db.tasks.c.id == task_id)).first() is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    return [dict(r) for r in conn.execute(q).mappings()]


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
    done = conn.execute(
        update(db.tasks).where(db.tasks.c.id == task["id"], db.tasks.c.state == task["state"]).values(**values)
    ).rowcount
    if done != 1:
        raise StateRace(task["id"])
    if new in FINAL and task.get("type") == "app":
        # Dead already (a token is valid only while its task is leased): the row goes too.
        tokens.drop(conn, task["id"])
    task = dict(task, **values)
    return task


def chain_ids(conn, task_id: int) -> list[int]:
    """The task and the lost tasks it continues (`resumed_from`, back to the first run), oldest
    first; a deleted task ends the walk."""
    t = db.tasks.c
    ids: list[int] = []
    tid: int | None = task_id
    while tid is not None and tid not in ids and len(ids) <= RETRY_MAX:
        prev = conn.execute(select(t.resumed_from).where(t.id == tid)).first()
        if prev is None:
            break  # deleted
        ids.append(tid)
        tid = prev[0]
    return ids[::-1]


def lineage(conn, task_id: int | None) -> list[dict]:
    """The runs that made a task's results, oldest first: the lost tasks it continues and the
    task itself, each `{task_id, agent_id, state, model_id, epoch}`: the model the run started
    from and, for a continuation, the checkpoint epoch it resumed from (else null). [] for None."""
    if task_id is None:
        return []
    t = db.tasks.c
    out = []
    for tid in chain_ids(conn, task_id):
        row = (
            conn.execute(select(t.id, t.agent_id, t.state, t.model_id, t.config, t.resumed_from).where(t.id == tid))
            .mappings()
            .first()
        )
        if row is None:
            continue
        resume = row["config"].get("resume") if isinstance(row["config"], dict) else None
        epoch = resume.get("epoch") if row["resumed_from"] is not None and isinstance(resume, dict) else None
        out.append(
            {
                "task_id": row["id"],
                "agent_id": row["agent_id"],
                "state": row["state"],
                "model_id": row["model_id"],
                "epoch": epoch,
            }
        )
    return out


def agent_task(conn, task: dict) -> dict:
    """A task as a poll answer shows it: the model with its files; the project's row only (meta and
    datasets `[{name, items_count}]`): its items are paged by `task_project_items`, never read here,
    so a poll stays cheap for a project of a million items."""
    out = {
        "id": task["id"],
        "type": task["type"],
        "image": task["image"],
        "config": task["config"],
        "resources": task["resources"],
    }
    if task["command"] is not None:
        out["command"] = task["command"]
    if task["type"] == "app":
        # The App's API token (server/public/tokens.py): new at every hand-out, valid while leased.
        from server.public import tokens

        out["api_token"] = tokens.mint(conn, task["id"])
        out["team_id"], out["workspace_id"] = db.DEFAULT_TEAM_ID, db.DEFAULT_WORKSPACE_ID
        if task.get("dataset_id") is not None:
            out["dataset_id"] = task["dataset_id"]
        if task["project_id"] is not None:
            out["project_id"] = task["project_id"]
    if task["timeout_s"] is not None:
        out["timeout_s"] = task["timeout_s"]
    if task["project_id"] is not None:
        p = conn.execute(_PROJECT, {"pid": task["project_id"]}).mappings().first()
        if p is not None:
            out["project"] = dict(p)
    if task["model_id"] is not None:
        m = conn.execute(select(db.models).where(db.models.c.id == task["model_id"])).mappings().first()
        if m is not None:
            out["model"] = {"id": m["id"], "name": m["name"], "hash": m["hash"], "files": m["files"]}
    return out


def task_project_items(conn, agent_id: int, task_id: int, after: int | None, limit: int) -> list[dict]:
    """Up to limit + 1 items (with `ann`) of the project of task `task_id`, in order, those with ids
    after `after`. Only while the task is leased to agent `agent_id`: any other task (another
    agent's, a queued or a final one) is 404 `task_not_found`, as for a task it never had; a task
    without a project is 404 `project_not_found`."""
    task = get_task(conn, task_id, _TASK_PROJECT)
    if task is None or task["agent_id"] != agent_id or task["state"] not in LEASED_VALUES:
        raise APIError(404, "task_not_found", f"no leased task {task_id} for this agent")
    if task["project_id"] is None:
        raise APIError(404, "project_not_found", f"task {task_id} has no project")
    return items_page(conn, task["project_id"], None, after, limit)


def hand_out(server, conn, agent: dict, free_slots: int, free_gpus: int, running: list[int], now: float):
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
    running_set = set(running)
    mine = conn.execute(_MINE, {"aid": agent["id"]}).all()
    stop, new_stop = _stops(mine, running_set)
    candidates = _not_running(server, conn, mine, running_set, now) + _queued(conn, agent["id"], free_slots)
    out = _fitting(server, conn, candidates, free_slots, free_gpus, now)
    if out:
        _check_token_unchanged(conn, agent)
    return out, stop, new_stop


def _stops(mine, running: set[int]) -> tuple[list[int], list[int]]:
    """The tasks the agent runs and should kill (a stop was requested, or the server gave them up
    as lost), and those of them it has not been told about yet."""
    stop, new_stop = [], []
    for tid, state, stop_requested, stop_delivered in mine:
        if tid in running and (state == TaskState.LOST.value or stop_requested):
            stop.append(tid)
            if not stop_delivered:
                new_stop.append(tid)
    return stop, new_stop


def _not_running(server, conn, mine, running: set[int], now: float) -> list[dict | None]:
    """The agent's leased tasks it does not run (it restarted, or never got the answer that gave
    them): one with a stop requested is stopped now; the others' rows, to be handed out again."""
    again = []
    for tid, state, stop_requested, _ in mine:
        if state == TaskState.LOST.value or tid in running:
            continue
        if stop_requested:
            task = get_task(conn, tid)
            if task is None:
                continue  # deleted since the agent's tasks were read: nothing left to stop
            try:
                change_state(conn, task, TaskState.STOPPED, now, error="stopped before the agent ran it")
                server.wakeups.notify_task(conn, tid)
            except StateRace:
                pass
        else:
            again.append(get_task(conn, tid))  # None if gone since: _fitting skips it
    return again


def _queued(conn, agent_id: int, free_slots: int) -> list[dict]:
    """The agent's queued tasks in id order, when it has a free slot (rows locked, SKIP LOCKED)."""
    if free_slots <= 0:
        return []
    return [dict(r) for r in conn.execute(_QUEUED, {"aid": agent_id}).mappings().all()]


def _fitting(server, conn, candidates: list, free_slots: int, free_gpus: int, now: float) -> list[dict]:
    """The candidates, in order, that fit the free slots and GPUs, leased to the agent; as the
    poll answer shows them. A task needing more GPUs than are left is skipped, not waited for."""
    out = []
    slots, gpus = free_slots, free_gpus
    for t in candidates:
        if t is None:
            continue  # gone since the agent's tasks were read
        if slots <= 0:
            break
        need = int((t["resources"] or {}).get("gpus") or 0)
        if need > gpus:
            continue
        t = _lease(server, conn, t, now)
        if t is None:
            continue
        out.append(agent_task(conn, t))
        slots -= 1
        gpus -= need
    return out


def _lease(server, conn, task: dict, now: float) -> dict | None:
    """Lease the task to its agent until now + lease_s: a queued one is claimed (None if another
    poll claimed it, or a user stopped it, first); an assigned one handed out again has its lease renewed."""
    if task["state"] != TaskState.ASSIGNED.value:
        try:
            task = change_state(conn, task, TaskState.ASSIGNED, now, lease_until=now + server.settings.lease_s)
        except StateRace:
            return None
        server.wakeups.notify_task(conn, task["id"])
    else:
        conn.execute(
            update(db.tasks).where(db.tasks.c.id == task["id"]).values(lease_until=now + server.settings.lease_s)
        )
    return task


def _check_token_unchanged(conn, agent: dict) -> None:
    """401 when the agent's token was rotated, or the agent removed, while its poll waited."""
    # FOR KEY SHARE on PostgreSQL: a rotation (an UPDATE of token_hash, a unique column) or a
    # removal waits for this transaction, or this read sees it. The contact batch's UPDATEs
    # of last_seen and telemetry_ts touch no unique column and do not conflict with it: a
    # hand-out never waits for them (FOR SHARE did, for as long as the batch's transaction).
    valid = conn.execute(_VALID_TOKEN, {"aid": agent["id"], "h": agent["token_hash"]}).first()
    if valid is None:
        raise APIError(401, "unauthorized", "the agent token was rotated or the agent removed")


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
        raise APIError(
            409, "illegal_transition", f"task {task['id']} is {state.value}; only an assigned task can be released"
        )
    if task["stop_requested"]:
        return change_state(conn, task, TaskState.STOPPED, now, error="stopped before the agent ran it")
    return change_state(conn, task, TaskState.QUEUED, now, lease_until=None, stop_delivered=False)


def renew_all_leases(engine, lease_s: float, now: float | None = None) -> None:
    """Every leased task gets a full lease from now: at start, since agents could not reach a
    stopped server."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        conn.execute(
            update(db.tasks).where(db.tasks.c.state.in_([s.value for s in LEASED])).values(lease_until=now + lease_s)
        )
