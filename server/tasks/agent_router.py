"""Agent side, one task of the agent's own: state reports, its project's items, results, release."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from protocol import endpoints
from server.http.deps import AgentDep, ParsedJSONRoute, StateDep, cursor_id, page
from server.http.strict import RowId, dumps_bytes
from server.projects.schemas import PAGE_MAX
from server.tasks import results as result_posts
from server.tasks.schemas import ResultsIn, StateIn
from server.tasks.service import agent_change_state, own_task, release_task, retry_race, task_project_items

# The results route takes the body the middleware decoded: decoding a project result again
# would double its memory (64 MiB of annotations are hundreds of MB as Python objects).
router = APIRouter(tags=["agent"], route_class=ParsedJSONRoute)


def _state_answer(task: dict) -> dict:
    return {
        "id": task["id"],
        "state": task["state"],
        "progress": task["progress"],
        "stop_requested": bool(task["stop_requested"]),
    }


@router.post(endpoints.TASK_STATE)
async def post_state(task_id: RowId, body: StateIn, state: StateDep, agent: AgentDep):
    """The agent reports a state (or, with the same state, new progress / exit_code / error)."""

    def change():
        with state.db.transaction() as conn:
            task = own_task(conn, agent["id"], task_id)
            before = task["state"]
            task = agent_change_state(conn, task, body, time.time())
            if task["state"] != before:  # followers end on a final state; progress alone wakes no one
                state.wakeups.notify_task(conn, task_id)
            return task

    return _state_answer(await state.db.run(retry_race, change))


@router.get(endpoints.TASK_PROJECT_ITEMS)
async def project_items(
    task_id: RowId,
    state: StateDep,
    agent: AgentDep,
    limit: int = Query(1000, ge=1, le=PAGE_MAX),
    cursor: str | None = None,
):
    """A page of the items of the project of a task leased to this agent, in order, each with its
    annotation: `{items: [{id, dataset, name, sha256, size, ann}], next}`. Any other task: 404."""
    after = cursor_id(cursor)

    def read() -> bytes:
        with state.db.reader() as conn:
            items = task_project_items(conn, agent["id"], task_id, after, limit)
        return dumps_bytes(page(items, limit))

    # On the read thread (SQLite): nodes preparing big projects do not hold up the fleet's writes.
    # Annotations are plain JSON already: no per-value encoding, and the page (megabytes at 5,000
    # items) is encoded there too, by orjson, off the event loop that serves the long-polls.
    return Response(await state.db.run_read(read), media_type="application/json")


@router.post(endpoints.TASK_RELEASE)
async def release(task_id: RowId, state: StateDep, agent: AgentDep):
    """A draining agent hands back a task it was given but will not run: assigned -> queued."""

    def give_back():
        with state.db.transaction() as conn:
            task = own_task(conn, agent["id"], task_id)
            before = task["state"]
            task = release_task(conn, task, time.time())
            if task["state"] != before:
                state.wakeups.notify_task(conn, task_id)
            return task

    return _state_answer(await state.db.run(retry_race, give_back))


@router.post(endpoints.TASK_RESULTS)
async def post_results(task_id: RowId, body: ResultsIn, state: StateDep, agent: AgentDep):
    """Results of a task: a model (or a checkpoint), a project (Supervisely, with annotations) or artifacts.

    Answers `{"results": the task's results, "id": the model or project id}` (no id for artifacts).
    Every blob named must be one the agent may read (uploaded by it, or of its own tasks): any other
    is answered as missing (400 `missing_blobs`). Past the task's results limits: 413 `results_limit`.
    """
    result_posts.check_fields(body)

    def readable():
        with state.db.engine.connect() as conn:
            return result_posts.readable(conn, agent["id"], body)

    blobs = result_posts.Readable(state.blobs, await state.db.run(readable))
    if body.kind == "project" and body.project_id is not None:
        # A further page: its annotations are checked against the meta the first page stored.

        def stored_meta():
            with state.db.engine.connect() as conn:
                return result_posts.result_project_meta(conn, agent["id"], task_id, body.project_id)

        body = body.model_copy(update={"meta": await state.db.run(stored_meta)})
    if body.kind == "project":  # every item and annotation checked: off the loop, before the transaction
        prepared = await run_in_threadpool(result_posts.check_refs, blobs, body, agent["id"])
    else:
        prepared = result_posts.check_refs(blobs, body, agent["id"])
    now = time.time()
    limits = (state.settings.results_max_files, state.settings.results_max_bytes)

    def store():
        with state.db.engine.begin() as conn:
            return result_posts.store(conn, agent["id"], task_id, body, prepared, now, limits)

    results, oid = await state.db.run(store)
    out = {"results": results}
    if oid is not None:
        out["id"] = oid
    return out
