"""User side: tasks: create, list, read, stop, delete, training metrics."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import insert, select, update

from protocol import endpoints
from protocol.errors import APIError
from protocol.states import FINAL, TaskState
from protocol.tasks import CONTAINER_TYPES, TASK_TYPES
from server import db
from server.logs import service as logs
from server.tasks import retention
from server.auth.service import require_admin
from server.agents.router import agent_row
from server.http.deps import core_of, cursor_id, page
from server.schemas import TaskIn
from server.http.strict import RowId, query_id
from server.tasks.service import change_state, get_task, public_task, retry_race

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)])

# A new task's results: small totals only; its artifacts are rows, paged by TASK_ARTIFACTS.
EMPTY_RESULTS = {"artifacts_count": 0, "artifacts_bytes": 0, "result_files": 0, "result_bytes": 0}


def task_or_404(core, task_id: int) -> dict:
    with core.engine.connect() as conn:
        task = get_task(conn, task_id)
    if task is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    return task


@router.post(endpoints.TASKS)
async def create_task(body: TaskIn, request: Request):
    """A task for one agent (queued); 404 unknown agent, 400 unknown type, 409 type not allowed."""
    core = core_of(request)
    if body.type not in TASK_TYPES:
        raise APIError(400, "unknown_type", f"unknown task type {body.type!r}; known: {list(TASK_TYPES)}")
    if body.type in CONTAINER_TYPES and not body.image:
        raise APIError(400, "invalid_request", f"a {body.type} task needs an image")
    if isinstance(body.command, str) and not body.command.strip() or body.command == []:
        raise APIError(400, "invalid_request", "command must not be empty (leave it out for the image's own)")
    now = time.time()

    def create():
        with core.transaction() as conn:
            agent = agent_row(conn, body.agent_id)
            if body.type not in agent["allowed_task_types"]:
                raise APIError(409, "type_not_allowed", f"agent {agent['id']} does not run {body.type} tasks "
                               f"(allowed: {agent['allowed_task_types']})")
            for oid, table, what in ((body.project_id, db.projects, "project"), (body.model_id, db.models, "model")):
                if oid is not None and conn.execute(select(table.c.id).where(table.c.id == oid)).first() is None:
                    raise APIError(404, f"{what}_not_found", f"no {what} {oid}")
            resources = (body.resources.model_dump() if body.resources else
                         {"gpus": 0, "cpus": None, "memory": None, "shm_size": None})
            tid = conn.execute(insert(db.tasks).values(
                agent_id=agent["id"], type=body.type, image=body.image, command=body.command, config=body.config or {},
                project_id=body.project_id, model_id=body.model_id, resources=resources, timeout_s=body.timeout_s,
                state=TaskState.QUEUED.value, stop_requested=False,
                timeline=[{"state": TaskState.QUEUED.value, "ts": now}],
                results=dict(EMPTY_RESULTS), log_acked=-1, created_at=now, updated_at=now)).inserted_primary_key[0]
            core.notify_agent(conn, agent["id"])   # its poll, waiting on any replica, answers with the task
            return get_task(conn, tid)
    return public_task(await core.run(create))


@router.get(endpoints.TASKS)
async def list_tasks(request: Request, agent_id: int | None = query_id(), state: str | None = Query(None, max_length=16),
                     limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Tasks, newest first, optionally of one agent and/or in one state."""
    core = core_of(request)
    t = db.tasks
    q = select(t).order_by(t.c.id.desc()).limit(limit + 1)
    if agent_id is not None:
        q = q.where(t.c.agent_id == agent_id)
    if state is not None:
        q = q.where(t.c.state == state)
    c = cursor_id(cursor)
    if c is not None:
        q = q.where(t.c.id < c)

    def read():
        with core.engine.connect() as conn:
            return conn.execute(q).mappings().all()
    return page([public_task(r) for r in await core.run_read(read)], limit)


@router.get(endpoints.TASK)
async def read_task(task_id: RowId, request: Request):
    """State, timeline [{state, ts}], progress, exit_code, error, results, log_acked."""
    core = core_of(request)
    return public_task(await core.run(task_or_404, core, task_id))


@router.post(endpoints.TASK_STOP)
async def stop_task(task_id: RowId, request: Request):
    """Stop a task: a queued one at once, a leased one through its agent's next poll answer."""
    core = core_of(request)

    def stop():
        with core.transaction() as conn:
            task = get_task(conn, task_id)
            if task is None:
                raise APIError(404, "task_not_found", f"no task {task_id}")
            if TaskState(task["state"]) in FINAL:
                raise APIError(409, "task_final", f"task {task_id} is already {task['state']}")
            if task["state"] == TaskState.QUEUED.value:
                task = change_state(conn, task, TaskState.STOPPED, error="stopped by a user before it started",
                                    stop_requested=True)
            else:
                conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(stop_requested=True,
                                                                                     updated_at=time.time()))
                task = dict(task, stop_requested=True)
            core.notify_agent(conn, task["agent_id"])
            core.notify_task(conn, task_id)
            return task
    return public_task(await core.run(retry_race, stop))


@router.delete(endpoints.TASK)
async def delete_task(task_id: RowId, request: Request):
    """Delete a final task with its log lines and metrics (409 task_not_final otherwise); the models
    and projects it made are kept, and the answer lists them."""
    core = core_of(request)

    def remove():
        with core.transaction() as conn:
            answer = retention.delete_task(conn, task_id)
            core.notify_task(conn, task_id)   # a follower of its log ends now
        retention.after_delete(core, answer["deleted"]["log_lines"])
        return answer
    return await core.run(remove)


@router.get(endpoints.TASK_ARTIFACTS)
async def task_artifacts(task_id: RowId, request: Request, after: str | None = Query(None, max_length=1024),
                         limit: int = Query(1000, ge=1, le=10000)):
    """The task's artifacts `{items: [{path, sha256, size}], next}` by path; `next` (the last path
    of this page, null on the last page) goes in `after` for the next page."""
    core = core_of(request)
    if after is not None and "\x00" in after:     # no path holds one, and PostgreSQL refuses it in a query
        raise APIError(400, "bad_cursor", "after must be the `next` value of a previous page")
    a = db.task_artifacts.c
    q = select(a.path, a.sha256, a.size).where(a.task_id == task_id).order_by(a.path).limit(limit + 1)
    if after:
        q = q.where(a.path > after)

    def read():
        with core.engine.connect() as conn:
            if conn.execute(select(db.tasks.c.id).where(db.tasks.c.id == task_id)).first() is None:
                raise APIError(404, "task_not_found", f"no task {task_id}")
            return [dict(r) for r in conn.execute(q).mappings()]
    items = await core.run_read(read)
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next": items[-1]["path"] if more else None}


@router.get(endpoints.TASK_METRICS)
async def task_metrics(task_id: RowId, request: Request):
    """Training metrics from the task's `metrics` log events: [{seq, type, epoch, metrics}]."""
    core = core_of(request)

    def read():
        task_or_404(core, task_id)
        with core.engine.connect() as conn:
            return logs.read_metrics(conn, task_id)
    return {"items": await core.run(read), "next": None}
