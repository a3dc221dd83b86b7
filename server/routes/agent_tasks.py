"""Agent side, one task of the agent's own: state reports, log batches, results, release."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from sqlalchemy import insert, select, update

from protocol import endpoints
from protocol.errors import APIError
from protocol.states import FINAL, TaskState
from server import blob_refs, db, logs
from server.auth import require_agent
from server.routes.common import core_of
from server.schemas import ResultsIn, StateIn, check_files, check_relpath, model_hash
from server.tasks import agent_change_state, get_task, release_task

router = APIRouter(tags=["agent"])

# The log batch is read by hand (for speed); its shape is described for /openapi.json here.
_LOG_BATCH = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["first_seq", "lines"],
    "properties": {"first_seq": {"type": "integer", "minimum": 0},
                   "lines": {"type": "array", "items": {"type": "object", "properties": {
                       "ts": {"type": "number"}, "level": {"type": "string"}, "stream": {"type": "string"},
                       "message": {"type": "string"}}, "additionalProperties": True}}}}}}}}


def _own_task(conn, agent: dict, task_id: int) -> dict:
    """The task if it belongs to this agent; another agent's task is answered as missing (404)."""
    task = get_task(conn, task_id)
    if task is None or task["agent_id"] != agent["id"]:
        raise APIError(404, "task_not_found", f"no task {task_id} for this agent")
    return task


def _state_answer(task: dict) -> dict:
    return {"id": task["id"], "state": task["state"], "progress": task["progress"],
            "stop_requested": bool(task["stop_requested"])}


@router.post(endpoints.TASK_STATE)
async def post_state(task_id: int, body: StateIn, request: Request, agent: dict = Depends(require_agent)):
    """The agent reports a state (or, with the same state, new progress / exit_code / error)."""
    core = core_of(request)
    now = time.time()
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        task = agent_change_state(conn, task, body, now)
    if TaskState(task["state"]) in FINAL:
        core.stops_delivered.discard(task_id)
    core.wake_task(task_id)
    return _state_answer(task)


@router.post(endpoints.TASK_RELEASE)
async def release(task_id: int, request: Request, agent: dict = Depends(require_agent)):
    """A draining agent hands back a task it was given but will not run: assigned -> queued."""
    core = core_of(request)
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        before = task["state"]
        task = release_task(conn, task, time.time())
    core.stops_delivered.discard(task_id)
    if task["state"] != before:
        core.wake_task(task_id)
    return _state_answer(task)


@router.post(endpoints.TASK_LOGS, openapi_extra=_LOG_BATCH)
async def post_logs(task_id: int, request: Request, agent: dict = Depends(require_agent)):
    """`{first_seq, lines}` (gzip accepted): line i gets seq first_seq + i; answers `{acked}`."""
    core = core_of(request)
    first_seq, lines = logs.parse_batch(await request.body())
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        acked, stored = logs.ingest(core, conn, task, first_seq, lines)
    if stored:
        core.m_lines.inc(stored)   # the bytes, cut lines and lines over the quota are counted in logs.ingest
    if acked != task["log_acked"]:
        core.wake_task(task_id)
    return {"acked": acked}


@router.post(endpoints.TASK_RESULTS)
async def post_results(task_id: int, body: ResultsIn, request: Request, agent: dict = Depends(require_agent)):
    """Results of a task: a new model, a new project (paths '<dataset>/<item>') or artifacts."""
    core = core_of(request)
    check_files(core.blobs, body.files, "path", "result file")
    files = [f.model_dump() for f in body.files]
    now = time.time()
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        if TaskState(task["state"]) in FINAL:
            raise APIError(409, "task_final", f"task {task_id} is {task['state']}; results come before the final state")
        results = dict(task["results"])
        name = body.name or f"task {task_id} {body.kind}"
        if body.kind == "model":
            # Idempotent per task: an agent restarted mid-upload posts the same model again.
            h = model_hash(files)
            same = results.get("model_id") and conn.execute(
                select(db.models.c.id).where(db.models.c.id == results["model_id"], db.models.c.hash == h)).first()
            if not same:
                results["model_id"] = conn.execute(insert(db.models).values(
                    name=name, hash=h, files=files, task_id=task_id, created_at=now)).inserted_primary_key[0]
                blob_refs.add(conn, blob_refs.MODEL, results["model_id"], [f["sha256"] for f in files])
        elif body.kind == "project":
            datasets: dict[str, list] = {}
            for f in files:
                if "/" not in f["path"]:
                    raise APIError(400, "bad_name", f"project result file {f['path']!r} must be '<dataset>/<item name>'")
                ds, item = f["path"].split("/", 1)
                check_relpath(ds, "dataset name", single=True)
                datasets.setdefault(ds, []).append({"name": item, "sha256": f["sha256"], "size": f["size"]})
            ds_list = [{"name": k, "items": v} for k, v in datasets.items()]
            prev = results.get("project_id") and conn.execute(
                select(db.projects.c.datasets).where(db.projects.c.id == results["project_id"])).first()
            if not (prev and prev[0] == ds_list):     # idempotent per task, as for models
                results["project_id"] = conn.execute(insert(db.projects).values(
                    name=name, datasets=ds_list, task_id=task_id, created_at=now)).inserted_primary_key[0]
                blob_refs.add(conn, blob_refs.PROJECT, results["project_id"], [f["sha256"] for f in files])
        else:
            arts = {a["path"]: a for a in results.get("artifacts", [])}
            for f in files:
                arts[f["path"]] = f   # a re-uploaded checkpoint replaces the earlier one
            results["artifacts"] = list(arts.values())
            blob_refs.add(conn, blob_refs.RESULT, task_id, [f["sha256"] for f in files])
        results.setdefault("artifacts", [])
        conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(results=results, updated_at=now))
    return {"results": results}
