"""Agent side of protocol v1 (header x-token): connect, long-poll, state, logs, telemetry, results."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import insert, select, update

from server import db, logs
from server.auth import require_agent
from server.errors import APIError
from server.schemas import PollIn, ResultsIn, StateIn, check_files, check_relpath, model_hash
from server.states import FINAL, TaskState
from server.tasks import agent_change_state, get_task, hand_out

router = APIRouter(prefix="/agent/v1", tags=["agent"])

# Bodies read by hand (for speed or because they are free-form) are described for /openapi.json here.
_ANY_OBJECT = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}
_LOG_BATCH = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["first_seq", "lines"],
    "properties": {"first_seq": {"type": "integer", "minimum": 0},
                   "lines": {"type": "array", "items": {"type": "object", "properties": {
                       "ts": {"type": "number"}, "level": {"type": "string"}, "stream": {"type": "string"},
                       "message": {"type": "string"}}, "additionalProperties": True}}}}}}}}


def _core(request: Request):
    return request.app.state.core


def _own_task(conn, agent: dict, task_id: int) -> dict:
    task = get_task(conn, task_id)
    if task is None or task["agent_id"] != agent["id"]:
        raise APIError(404, "task_not_found", f"no task {task_id} for this agent")
    return task


async def _json_object(request: Request, what: str) -> dict:
    """The body as a JSON object, or a 400 JSON error saying what is wrong with it."""
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", f"{what} must be a JSON object")
    return body


@router.post("/connect", openapi_extra=_ANY_OBJECT)
async def connect(request: Request, agent: dict = Depends(require_agent)):
    """The agent says hello with its system info; answers who it is and the server's options."""
    core = _core(request)
    info = await _json_object(request, "system info")
    with core.engine.begin() as conn:
        conn.execute(update(db.agents).where(db.agents.c.id == agent["id"]).values(system_info=info, last_seen=time.time()))
    s = core.settings
    return {"agent": {"id": agent["id"], "name": agent["name"], "allowed_task_types": agent["allowed_task_types"]},
            "options": {"lease_s": s.lease_s, "telemetry_interval_s": s.telemetry_interval_s,
                        "max_poll_wait_s": s.max_poll_wait_s, "logs_body_limit": s.logs_body_limit,
                        "json_body_limit": s.json_body_limit}}


@router.post("/poll")
async def poll(body: PollIn, request: Request, wait: float = Query(0, ge=0),
               agent: dict = Depends(require_agent)):
    """Long-poll: answers at once when a task or a new stop request is pending, else after `wait` s."""
    core = _core(request)
    aid = agent["id"]
    wait = min(wait, core.settings.max_poll_wait_s)
    deadline = time.monotonic() + wait
    version = core.settings_version[aid]
    core.m_polls.inc()
    core.polling[aid] += 1
    if body.refusing:
        core.refusing[aid] = body.refusing
    else:
        core.refusing.pop(aid, None)
    try:
        while True:
            ev = core.agent_waiters.event(aid)   # before reading the database: no wake-up is lost
            now = time.time()
            with core.engine.begin() as conn:
                row = conn.execute(select(db.agents).where(db.agents.c.id == aid)).mappings().first()
                if row is None:
                    raise APIError(401, "unauthorized", "this agent was removed")
                tasks, stop, changed = hand_out(core, conn, aid, body.free_slots, len(body.free_gpus), body.running, now)
            for tid in changed:
                core.wake_task(tid)
            new_stop = [t for t in stop if t not in core.stops_delivered]
            left = deadline - time.monotonic()
            if tasks or new_stop or left <= 0 or core.settings_version[aid] != version:
                core.stops_delivered.update(stop)
                return {"tasks": tasks, "stop": stop,
                        "settings": {"name": row["name"], "allowed_task_types": row["allowed_task_types"]}}
            await core.agent_waiters.wait(ev, left)
    finally:
        core.m_polls.dec()
        core.polling[aid] -= 1
        if core.polling[aid] <= 0:
            del core.polling[aid]
        core.touch_agent(aid)   # a poll that waited was contact all along


@router.post("/tasks/{task_id}/state")
async def post_state(task_id: int, body: StateIn, request: Request, agent: dict = Depends(require_agent)):
    """The agent reports a state (or, with the same state, new progress / exit_code / error)."""
    core = _core(request)
    now = time.time()
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        task = agent_change_state(conn, task, body, now)
    if TaskState(task["state"]) in FINAL:
        core.stops_delivered.discard(task_id)
    core.wake_task(task_id)
    return {"id": task["id"], "state": task["state"], "progress": task["progress"],
            "stop_requested": bool(task["stop_requested"])}


@router.post("/tasks/{task_id}/logs", openapi_extra=_LOG_BATCH)
async def post_logs(task_id: int, request: Request, agent: dict = Depends(require_agent)):
    """`{first_seq, lines}` (gzip accepted): line i gets seq first_seq + i; answers `{acked}`."""
    core = _core(request)
    first_seq, lines = logs.parse_batch(await request.body())
    with core.engine.begin() as conn:
        task = _own_task(conn, agent, task_id)
        acked, stored = logs.ingest(core, conn, task, first_seq, lines)
    if stored:
        core.m_lines.inc(stored)
    if acked != task["log_acked"]:
        core.wake_task(task_id)
    return {"acked": acked}


@router.post("/telemetry", openapi_extra=_ANY_OBJECT)
async def telemetry(request: Request, agent: dict = Depends(require_agent)):
    """A telemetry sample (cpu, memory, disks, gpus, containers, free slots): kept as latest + history."""
    core = _core(request)
    sample = await _json_object(request, "a telemetry sample")
    now = time.time()
    with core.engine.begin() as conn:
        conn.execute(update(db.agents).where(db.agents.c.id == agent["id"])
                     .values(telemetry=sample, telemetry_ts=now, last_seen=now))
        core.add_telemetry(conn, agent["id"], now, sample)
    return {"ok": True}


@router.post("/tasks/{task_id}/results")
async def post_results(task_id: int, body: ResultsIn, request: Request, agent: dict = Depends(require_agent)):
    """Results of a task: a new model, a new project (paths '<dataset>/<item>') or artifacts."""
    core = _core(request)
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
        else:
            arts = {a["path"]: a for a in results.get("artifacts", [])}
            for f in files:
                arts[f["path"]] = f   # a re-uploaded checkpoint replaces the earlier one
            results["artifacts"] = list(arts.values())
        results.setdefault("artifacts", [])
        conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(results=results, updated_at=now))
    return {"results": results}
