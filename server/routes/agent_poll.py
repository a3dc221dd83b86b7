"""Agent side: connect (hello with system info) and the long-poll that hands out tasks and stops."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, update

from protocol import endpoints
from protocol.errors import APIError
from server import db
from server.auth import require_agent
from server.routes.common import core_of, json_object
from server.schemas import PollIn
from server.tasks import hand_out

router = APIRouter(tags=["agent"])

# A body read by hand (it is free-form) is described for /openapi.json here.
ANY_OBJECT = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


@router.post(endpoints.CONNECT, openapi_extra=ANY_OBJECT)
async def connect(request: Request, agent: dict = Depends(require_agent)):
    """The agent says hello with its system info; answers who it is and the server's options."""
    core = core_of(request)
    info = await json_object(request, "system info")
    with core.engine.begin() as conn:
        values = {"last_seen": time.time()}
        if info != agent.get("system_info"):   # it changes rarely (a new GPU, a Docker upgrade): rewrite it only then
            values["system_info"] = info
        conn.execute(update(db.agents).where(db.agents.c.id == agent["id"]).values(**values))
    s = core.settings
    return {"agent": {"id": agent["id"], "name": agent["name"], "allowed_task_types": agent["allowed_task_types"]},
            "options": {"lease_s": s.lease_s, "telemetry_interval_s": s.telemetry_interval_s,
                        "max_poll_wait_s": s.max_poll_wait_s, "logs_body_limit": s.logs_body_limit,
                        "json_body_limit": s.json_body_limit, "project_body_limit": s.project_body_limit}}


@router.post(endpoints.POLL)
async def poll(body: PollIn, request: Request, wait: float = Query(0, ge=0),
               agent: dict = Depends(require_agent)):
    """Long-poll: answers at once when a task or a new stop request is pending, else after `wait` s."""
    core = core_of(request)
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
                # A task's project carries every annotation: plain JSON, so FastAPI's slow encoder is skipped.
                return JSONResponse({"tasks": tasks, "stop": stop,
                                     "settings": {"name": row["name"], "allowed_task_types": row["allowed_task_types"]}})
            await core.agent_waiters.wait(ev, left)
    finally:
        core.m_polls.dec()
        core.polling[aid] -= 1
        if core.polling[aid] <= 0:
            del core.polling[aid]
        core.touch_agent(aid)   # a poll that waited was contact all along
