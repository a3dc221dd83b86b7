"""User side of protocol v1 (Bearer admin token or console session): agents, projects, models, tasks."""
from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, func, insert, select, update

from server import db, logs
from server.auth import SESSION_COOKIE, check_admin_token, hash_token, new_token, require_admin
from server.errors import APIError
from server.schemas import (AgentIn, AgentPatch, ModelIn, ProjectIn, SessionIn, TaskIn, check_files, check_relpath,
                            model_hash)
from server.settings import TASK_TYPES
from server.states import FINAL, LEASED, TaskState
from server.tasks import change_state, get_task, public_task

router = APIRouter(prefix="/api/v1", tags=["user"], dependencies=[Depends(require_admin)])
session_router = APIRouter(prefix="/api/v1", tags=["user"])


def _core(request: Request):
    return request.app.state.core


def _page(items: list[dict], limit: int) -> dict:
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next": str(items[-1]["id"]) if more else None}


def _cursor(cursor: str | None) -> int | None:
    if cursor in (None, ""):
        return None
    if not cursor.isdigit():
        raise APIError(400, "bad_cursor", "cursor must be the `next` value of a previous page")
    return int(cursor)


# --- console sign-in ---
@session_router.post("/session")
async def sign_in(body: SessionIn, request: Request, response: Response):
    """Console sign-in with the admin token: sets the HttpOnly cookie `sly_session`."""
    core = _core(request)
    if not check_admin_token(core, body.token):
        raise APIError(401, "unauthorized", "the admin token is wrong")
    sid = core.sessions.create()
    response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return {"ok": True}


@session_router.delete("/session")
async def sign_out(request: Request, response: Response):
    """Sign out of the console (drops the session and the cookie)."""
    _core(request).sessions.drop(request.cookies.get(SESSION_COOKIE))
    response.delete_cookie(SESSION_COOKIE, path="/")
    return {"ok": True}


# --- agents ---
def _check_types(types: list[str] | None) -> list[str]:
    if types is None:
        return list(TASK_TYPES)
    unknown = [t for t in types if t not in TASK_TYPES]
    if unknown:
        raise APIError(400, "unknown_type", f"unknown task type(s) {unknown}; known: {list(TASK_TYPES)}")
    return list(dict.fromkeys(types))


def run_commands(core, request: Request, token: str) -> dict:
    url = (core.settings.public_url or str(request.base_url)).rstrip("/")
    host_dir = f"$HOME/.supervisely-agent/{token}"
    docker = (f'docker run -d --name sly-agent --restart unless-stopped -v /var/run/docker.sock:/var/run/docker.sock '
              f'-v "{host_dir}":"{host_dir}" -e AGENT_HOST_DIR="{host_dir}" -e SERVER_ADDRESS={url} '
              f'-e ACCESS_TOKEN={token} {core.settings.agent_image}')
    return {"docker": docker, "run_sh": f"SERVER_ADDRESS={url} ACCESS_TOKEN={token} ./run.sh"}


def _agent_out(core, row, running: int, now: float) -> dict:
    a = dict(row)
    a.pop("token_hash", None)
    a["status"] = core.agent_status(a["id"], a["last_seen"], now)
    a["running_tasks"] = running
    a["polls_open"] = core.polling.get(a["id"], 0)
    a["refusing"] = core.refusing.get(a["id"], "")
    return a


def _running_counts(conn) -> dict[int, int]:
    t = db.tasks.c
    return dict(conn.execute(select(t.agent_id, func.count()).where(t.state.in_([s.value for s in LEASED]))
                             .group_by(t.agent_id)).all())


def _agent(conn, agent_id: int):
    row = conn.execute(select(db.agents).where(db.agents.c.id == agent_id)).mappings().first()
    if row is None:
        raise APIError(404, "agent_not_found", f"no agent {agent_id}")
    return row


@router.post("/agents")
async def create_agent(body: AgentIn, request: Request):
    """A new agent; its token (shown only in this answer) and a ready-to-paste run_command."""
    core = _core(request)
    types = _check_types(body.allowed_task_types)
    token = new_token()
    with core.engine.begin() as conn:
        aid = conn.execute(insert(db.agents).values(name=body.name, token_hash=hash_token(token),
                                                    allowed_task_types=types, created_at=time.time())).inserted_primary_key[0]
    return {"id": aid, "name": body.name, "allowed_task_types": types, "token": token,
            "run_command": run_commands(core, request, token)}


@router.get("/agents")
async def list_agents(request: Request):
    """Every agent with status online/offline, last_seen, running_tasks, latest telemetry, system_info."""
    core = _core(request)
    now = time.time()
    with core.engine.connect() as conn:
        counts = _running_counts(conn)
        rows = conn.execute(select(db.agents).order_by(db.agents.c.id)).mappings().all()
    return {"items": [_agent_out(core, r, counts.get(r["id"], 0), now) for r in rows], "next": None}


@router.get("/agents/{agent_id}")
async def read_agent(agent_id: int, request: Request):
    core = _core(request)
    with core.engine.connect() as conn:
        row = _agent(conn, agent_id)
        counts = _running_counts(conn)
    return _agent_out(core, row, counts.get(agent_id, 0), time.time())


@router.patch("/agents/{agent_id}")
async def patch_agent(agent_id: int, body: AgentPatch, request: Request):
    """Rename / change allowed task types; the agent sees it in its next poll answer (woken at once)."""
    core = _core(request)
    values = {}
    if body.name is not None:
        values["name"] = body.name
    if body.allowed_task_types is not None:
        values["allowed_task_types"] = _check_types(body.allowed_task_types)
    with core.engine.begin() as conn:
        _agent(conn, agent_id)
        if values:
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(**values))
        row = _agent(conn, agent_id)
        counts = _running_counts(conn)
    core.wake_agent(agent_id, settings_changed=True)
    return _agent_out(core, row, counts.get(agent_id, 0), time.time())


@router.delete("/agents/{agent_id}")
async def delete_agent(agent_id: int, request: Request):
    """Remove an agent; its unfinished tasks fail with 'agent removed'."""
    core = _core(request)
    now = time.time()
    failed = []
    with core.engine.begin() as conn:
        _agent(conn, agent_id)
        rows = conn.execute(select(db.tasks).where(db.tasks.c.agent_id == agent_id,
                                                   db.tasks.c.state.notin_([s.value for s in FINAL]))).mappings().all()
        for r in rows:
            change_state(conn, dict(r), TaskState.FAILED, now, error="its agent was removed")
            failed.append(r["id"])
        conn.execute(delete(db.agents).where(db.agents.c.id == agent_id))
        conn.execute(delete(db.telemetry).where(db.telemetry.c.agent_id == agent_id))
    core.wake_agent(agent_id)
    for tid in failed:
        core.wake_task(tid)
    return {"ok": True, "failed_tasks": failed}


@router.post("/agents/{agent_id}/token")
async def rotate_token(agent_id: int, request: Request):
    """A new token for the agent; the old one stops working at once."""
    core = _core(request)
    token = new_token()
    with core.engine.begin() as conn:
        row = _agent(conn, agent_id)
        conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(token_hash=hash_token(token)))
    core.wake_agent(agent_id)
    return {"id": agent_id, "name": row["name"], "token": token, "run_command": run_commands(core, request, token)}


@router.get("/agents/{agent_id}/telemetry")
async def agent_telemetry(agent_id: int, request: Request, since: float | None = None):
    """Recent telemetry samples `{ts, sample}` (oldest first), those after `since` when given."""
    core = _core(request)
    with core.engine.connect() as conn:
        _agent(conn, agent_id)
        return {"items": core.telemetry_history(conn, agent_id, since), "next": None}


# --- projects and models ---
@router.post("/projects")
async def create_project(body: ProjectIn, request: Request):
    """A project referencing uploaded blobs; every blob must exist (400 missing_blobs)."""
    core = _core(request)
    names = set()
    for ds in body.datasets:
        check_relpath(ds.name, "dataset name", single=True)
        if ds.name in names:
            raise APIError(400, "duplicate_path", f"dataset {ds.name!r} appears twice")
        names.add(ds.name)
    for ds in body.datasets:
        check_files(core.blobs, ds.items, "name", "item name")
    datasets = [{"name": ds.name, "items": [i.model_dump() for i in ds.items]} for ds in body.datasets]
    with core.engine.begin() as conn:
        pid = conn.execute(insert(db.projects).values(name=body.name, datasets=datasets,
                                                      created_at=time.time())).inserted_primary_key[0]
    return _get(core, db.projects, pid, "project")


def _get(core, table, oid: int, what: str) -> dict:
    with core.engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.id == oid)).mappings().first()
    if row is None:
        raise APIError(404, f"{what}_not_found", f"no {what} {oid}")
    return dict(row)


def _list(core, table, limit: int, cursor: str | None, summary) -> dict:
    c = _cursor(cursor)
    q = select(table).order_by(table.c.id.desc()).limit(limit + 1)
    if c is not None:
        q = q.where(table.c.id < c)
    with core.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return _page([summary(dict(r)) for r in rows], limit)


def _project_summary(p: dict) -> dict:
    ds = p.pop("datasets")
    p["datasets"] = [{"name": d["name"], "items_count": len(d["items"])} for d in ds]
    return p


def _model_summary(m: dict) -> dict:
    m["files_count"] = len(m["files"])
    m["size"] = sum(f["size"] for f in m.pop("files"))
    return m


@router.get("/projects")
async def list_projects(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Projects, newest first (datasets summarised: name, items_count)."""
    return _list(_core(request), db.projects, limit, cursor, _project_summary)


@router.get("/projects/{project_id}")
async def read_project(project_id: int, request: Request):
    return _get(_core(request), db.projects, project_id, "project")


@router.post("/models")
async def create_model(body: ModelIn, request: Request):
    """A model referencing uploaded blobs; `hash` = sha256 of its sorted manifest."""
    core = _core(request)
    check_files(core.blobs, body.files, "path", "model file")
    files = [f.model_dump() for f in body.files]
    with core.engine.begin() as conn:
        mid = conn.execute(insert(db.models).values(name=body.name, hash=model_hash(files), files=files,
                                                    created_at=time.time())).inserted_primary_key[0]
    return _get(core, db.models, mid, "model")


@router.get("/models")
async def list_models(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Models, newest first (files summarised: files_count, size)."""
    return _list(_core(request), db.models, limit, cursor, _model_summary)


@router.get("/models/{model_id}")
async def read_model(model_id: int, request: Request):
    return _get(_core(request), db.models, model_id, "model")


# --- tasks ---
@router.post("/tasks")
async def create_task(body: TaskIn, request: Request):
    """A task for one agent (queued); 404 unknown agent, 400 unknown type, 409 type not allowed."""
    core = _core(request)
    if body.type not in TASK_TYPES:
        raise APIError(400, "unknown_type", f"unknown task type {body.type!r}; known: {list(TASK_TYPES)}")
    if body.type != "cleanup" and not body.image:
        raise APIError(400, "invalid_request", f"a {body.type} task needs an image")
    if isinstance(body.command, str) and not body.command.strip() or body.command == []:
        raise APIError(400, "invalid_request", "command must not be empty (leave it out for the image's own)")
    now = time.time()
    with core.engine.begin() as conn:
        agent = _agent(conn, body.agent_id)
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
            state=TaskState.QUEUED.value, stop_requested=False, timeline=[{"state": "queued", "ts": now}],
            results={"artifacts": []}, log_acked=-1, created_at=now, updated_at=now)).inserted_primary_key[0]
        task = get_task(conn, tid)
    core.wake_agent(agent["id"])
    return public_task(task)


@router.get("/tasks")
async def list_tasks(request: Request, agent_id: int | None = None, state: str | None = None,
                     limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Tasks, newest first, optionally of one agent and/or in one state."""
    core = _core(request)
    t = db.tasks
    q = select(t).order_by(t.c.id.desc()).limit(limit + 1)
    if agent_id is not None:
        q = q.where(t.c.agent_id == agent_id)
    if state is not None:
        q = q.where(t.c.state == state)
    c = _cursor(cursor)
    if c is not None:
        q = q.where(t.c.id < c)
    with core.engine.connect() as conn:
        rows = conn.execute(q).mappings().all()
    return _page([public_task(r) for r in rows], limit)


def _task(core, task_id: int) -> dict:
    with core.engine.connect() as conn:
        task = get_task(conn, task_id)
    if task is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    return task


@router.get("/tasks/{task_id}")
async def read_task(task_id: int, request: Request):
    """State, timeline [{state, ts}], progress, exit_code, error, results, log_acked."""
    return public_task(_task(_core(request), task_id))


@router.post("/tasks/{task_id}/stop")
async def stop_task(task_id: int, request: Request):
    """Stop a task: a queued one at once, a leased one through its agent's next poll answer."""
    core = _core(request)
    with core.engine.begin() as conn:
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
    core.wake_agent(task["agent_id"])
    core.wake_task(task_id)
    return public_task(task)


@router.get("/tasks/{task_id}/metrics")
async def task_metrics(task_id: int, request: Request):
    """Training metrics from the task's `metrics` log events: [{seq, type, epoch, metrics}]."""
    core = _core(request)
    _task(core, task_id)
    with core.engine.connect() as conn:
        return {"items": logs.read_metrics(conn, task_id), "next": None}


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get("/tasks/{task_id}/logs")
async def task_logs(task_id: int, request: Request, after: int = Query(-1, ge=-1),
                    limit: int = Query(1000, ge=1, le=10000), follow: bool = False):
    """Lines with seq > after in order (never past a gap). follow=1: server-sent events, live."""
    core = _core(request)
    task = _task(core, task_id)
    if not follow:
        with core.engine.connect() as conn:
            lines = logs.read_lines(conn, task, after, limit)
        return {"lines": lines, "next": lines[-1]["seq"] if len(lines) == limit else None}

    async def events():
        cursor = after
        while True:
            ev = core.task_waiters.event(task_id)
            with core.engine.connect() as conn:
                t = get_task(conn, task_id)
                lines = logs.read_lines(conn, t, cursor, 2000) if t else []
            if lines:
                cursor = lines[-1]["seq"]
                yield "".join(_sse("line", ln) for ln in lines)
                continue
            if t is None or (TaskState(t["state"]) in FINAL and cursor >= t["log_acked"]):
                yield _sse("end", {"state": t["state"] if t else None, "acked": t["log_acked"] if t else cursor})
                return
            if not await core.task_waiters.wait(ev, 15.0):
                yield ": keep-alive\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


@router.post("/_echo", include_in_schema=False)
async def echo(request: Request):
    """Reads the body and throws it away (the benchmark's baseline for log ingest)."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return {"bytes": n}
