"""User side: tasks: create, list, read, stop, delete, artifacts, training metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query

from protocol import endpoints
from protocol.states import TaskState
from server.http.deps import AdminDep, StateDep, cursor_id, page
from server.http.strict import RowId, query_id
from server.logs import service as logs
from server.tasks import lost, retention, service, waiting
from server.tasks.schemas import TaskIn
from server.tasks.service import public_task, retry_race

router = APIRouter(tags=["user"])


def _read(state, fn, *args):
    """`fn(conn, *args)` on a connection of its own (reads only)."""
    with state.db.engine.connect() as conn:
        return fn(conn, *args)


@router.post(endpoints.TASKS)
async def create_task(body: TaskIn, state: StateDep, _: AdminDep):
    """A task for one agent (queued); 404 unknown agent, 400 unknown type, 409 when the node cannot
    run it (type not allowed, node deleted, no GPU or too few: server/tasks/waiting.py)."""
    service.check_new_task(body)
    now = time.time()

    def create():
        shown = state.contacts.shown()  # before the reads: a batch written meanwhile is in one or both
        with state.db.transaction() as conn:
            node = _node(state, conn, shown, body.agent_id, now)
            waiting.check_runnable(conn, body.agent_id, body.type, body.resources, node)
            retry = lost.retry_policy(conn, body.retry, body.agent_id)
            task = service.create_task(conn, body, now, retry)
            state.wakeups.notify_agent(
                conn, task["agent_id"]
            )  # its poll, waiting on any replica, answers with the task
            return dict(public_task(task), waiting=waiting.why_waiting(conn, task, node, now))

    return await state.db.run(create)


@router.get(endpoints.TASKS)
async def list_tasks(
    server: StateDep,
    _: AdminDep,
    agent_id: int | None = query_id(),
    state: str | None = Query(None, max_length=16),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
):
    """Tasks, newest first, optionally of one agent and/or in one state (`server`: the server's
    state; `state`: the tasks' state, a query parameter). A queued task's `waiting` says why it
    waits, as on `GET /api/v1/tasks/{id}` (each node read once per page)."""
    before = cursor_id(cursor)

    def read(conn):
        now = time.time()
        shown = server.contacts.shown()
        items = service.list_tasks(conn, agent_id, state, limit, before)
        nodes: dict = {}
        for t in items[:limit]:
            t["waiting"] = None
            if t["state"] == TaskState.QUEUED.value:
                if t["agent_id"] not in nodes:
                    nodes[t["agent_id"]] = _node(server, conn, shown, t["agent_id"], now)
                t["waiting"] = waiting.why_waiting(conn, t, nodes[t["agent_id"]], now)
        return items

    return page(await server.db.run_read(_read, server, read), limit)


def _node(state, conn, shown, agent_id: int, now: float):
    return waiting.read_node(conn, agent_id, shown, state.wakeups.replica, state.settings.offline_after, now)


@router.get(endpoints.TASK)
async def read_task(task_id: RowId, state: StateDep, _: AdminDep):
    """State, timeline [{state, ts}], progress, exit_code, error, results, log_acked; a queued
    task's `waiting` says why it waits ({reason, detail, since}; null for any other task)."""

    def read(conn):
        now = time.time()
        shown = state.contacts.shown()  # before the reads: a batch written meanwhile is in one or both
        task = service.task_or_404(conn, task_id)
        node = _node(state, conn, shown, task["agent_id"], now) if task["state"] == TaskState.QUEUED.value else None
        return dict(public_task(task), waiting=waiting.why_waiting(conn, task, node, now))

    return await state.db.run(_read, state, read)


@router.post(endpoints.TASK_STOP)
async def stop_task(task_id: RowId, state: StateDep, _: AdminDep):
    """Stop a task: a queued one at once, a leased one through its agent's next poll answer."""

    def stop():
        with state.db.transaction() as conn:
            task = service.stop_task(conn, task_id)
            state.wakeups.notify_agent(conn, task["agent_id"])
            state.wakeups.notify_task(conn, task_id)
            return task

    return public_task(await state.db.run(retry_race, stop))


@router.delete(endpoints.TASK)
async def delete_task(task_id: RowId, state: StateDep, _: AdminDep):
    """Delete a final task with its log lines and metrics (409 task_not_final otherwise); the models
    and projects it made are kept, and the answer lists them."""

    def remove():
        with state.db.transaction() as conn:
            answer = retention.delete_task(conn, task_id)
            state.wakeups.notify_task(conn, task_id)  # a follower of its log ends now
        retention.after_delete(state, answer["deleted"]["log_lines"])
        return answer

    return await state.db.run(remove)


@router.get(endpoints.TASK_ARTIFACTS)
async def task_artifacts(
    task_id: RowId,
    state: StateDep,
    _: AdminDep,
    after: str | None = Query(None, max_length=1024),
    limit: int = Query(1000, ge=1, le=10000),
):
    """The task's artifacts `{items: [{path, sha256, size}], next}` by path; `next` (the last path
    of this page, null on the last page) goes in `after` for the next page."""
    items = await state.db.run_read(_read, state, service.artifacts_page, task_id, after, limit)
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next": items[-1]["path"] if more else None}


@router.get(endpoints.TASK_METRICS)
async def task_metrics(task_id: RowId, state: StateDep, _: AdminDep, chain: bool = False):
    """Training metrics from the task's `metrics` log events: [{seq, type, epoch, metrics}].
    `chain=1`: those of the lost runs this task continues too, oldest run first, each item with
    its `task_id` (one epoch axis for a resumed training)."""

    def read(conn):
        service.task_or_404(conn, task_id)
        if not chain:
            return logs.read_metrics(conn, task_id)
        return [
            dict(item, task_id=tid) for tid in service.chain_ids(conn, task_id) for item in logs.read_metrics(conn, tid)
        ]

    return {"items": await state.db.run(_read, state, read), "next": None}
