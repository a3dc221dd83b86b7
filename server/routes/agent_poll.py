"""Agent side: connect (hello with system info) and the long-poll that hands out tasks and stops."""
from __future__ import annotations

import time
import uuid

import anyio
from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import delete, insert, select, update

from protocol import endpoints
from protocol.errors import APIError
from server.strict import SafeJSONResponse
from server import db
from server.auth import require_agent
from server.routes.common import core_of, json_object
from server.schemas import PollIn
from server.tasks import hand_out
from server.wakeups import Waiters

router = APIRouter(tags=["agent"])

# A body read by hand (it is free-form) is described for /openapi.json here.
ANY_OBJECT = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


@router.post(endpoints.CONNECT, openapi_extra=ANY_OBJECT)
async def connect(request: Request, agent: dict = Depends(require_agent)):
    """The agent says hello with its system info; answers who it is and the server's options."""
    core = core_of(request)
    info = await json_object(request, "system info")

    def store():
        with core.engine.begin() as conn:
            values = {"last_seen": time.time()}
            if info != agent.get("system_info"):   # it changes rarely (a new GPU, a Docker upgrade): rewrite it only then
                values["system_info"] = info
            conn.execute(update(db.agents).where(db.agents.c.id == agent["id"]).values(**values))
    await core.run(store)
    s = core.settings
    return {"agent": {"id": agent["id"], "name": agent["name"], "allowed_task_types": agent["allowed_task_types"]},
            "options": {"lease_s": s.lease_s, "telemetry_interval_s": s.telemetry_interval_s,
                        "max_poll_wait_s": s.max_poll_wait_s, "logs_body_limit": s.logs_body_limit,
                        "json_body_limit": s.json_body_limit, "project_body_limit": s.project_body_limit}}


POLL_ROW_MARGIN_S = 30.0   # a poll's row outlives its deadline this long, in case its replica dies


def _poll_round(core, agent: dict, body: PollIn, first: bool, last: bool, poll_id: str, registered: bool,
                expires_at: float) -> tuple[dict | None, bool]:
    """One look at the database for a poll: (the answer or None to keep waiting, poll row written).

    Runs in one transaction: the agent's row (gone or with another token: 401), its refusal
    (first round), the hand-out, stops marked delivered when answering, and the poll's row in
    `polls` when it is about to wait for the first time.
    """
    aid = agent["id"]
    with core.transaction() as conn:
        row = conn.execute(select(db.agents).where(db.agents.c.id == aid)).mappings().first()
        if row is None:
            raise APIError(401, "unauthorized", "this agent was removed")
        if row["token_hash"] != agent["token_hash"]:
            raise APIError(401, "unauthorized", "the agent token was rotated")
        if first and (row["refusing"] or "") != body.refusing:
            conn.execute(update(db.agents).where(db.agents.c.id == aid).values(refusing=body.refusing or None))
        tasks, stop, new_stop = hand_out(core, conn, agent, body.free_slots, len(body.free_gpus), body.running,
                                         time.time())
        if tasks or new_stop or last or row["settings_version"] != agent["settings_version"]:
            if new_stop:
                conn.execute(update(db.tasks).where(db.tasks.c.id.in_(new_stop)).values(stop_delivered=True))
            return ({"tasks": tasks, "stop": stop,
                     "settings": {"name": row["name"], "allowed_task_types": row["allowed_task_types"]}}, registered)
        if not registered:
            conn.execute(insert(db.polls).values(id=poll_id, agent_id=aid, replica=core.wakeups.replica,
                                                 expires_at=expires_at))
            registered = True
        return None, registered


def _poll_end(core, aid: int, poll_id: str, registered: bool) -> None:
    """The poll is over: its row goes, and the wait counts as contact (one transaction)."""
    now = time.time()
    if not registered:
        core.touch_agent(aid, now)
        return
    with core.engine.begin() as conn:
        conn.execute(delete(db.polls).where(db.polls.c.id == poll_id))
        core.touch_agent(aid, now, conn=conn)


@router.post(endpoints.POLL)
async def poll(body: PollIn, request: Request, wait: float = Query(0, ge=0, allow_inf_nan=False),
               agent: dict = Depends(require_agent)):
    """Long-poll: answers at once when a task or a new stop request is pending, else after `wait` s.

    Woken (on any replica) by a new task, a stop, a settings change, a rotated token or a
    removed agent; the last two end it with 401 and no task.
    """
    core = core_of(request)
    aid = agent["id"]
    wait = min(wait, core.settings.max_poll_wait_s)
    deadline = time.monotonic() + wait
    expires_at = time.time() + wait + POLL_ROW_MARGIN_S
    poll_id = uuid.uuid4().hex
    registered, first = False, True
    core.m_polls.inc()
    try:
        while True:
            ev = core.wakeups.agents.event(aid)   # before reading the database: no wake-up is lost
            last = deadline - time.monotonic() <= 0 or core.closing
            answer, registered = await core.run(_poll_round, core, agent, body, first, last, poll_id, registered,
                                                expires_at)
            first = False
            if answer is not None:
                # A task's project carries every annotation: plain JSON, so FastAPI's slow encoder is skipped.
                return SafeJSONResponse(answer)
            await Waiters.wait(ev, deadline - time.monotonic())
    finally:
        core.m_polls.dec()
        with anyio.CancelScope(shield=True):   # a client that hung up still has its poll row removed
            await core.run(_poll_end, core, aid, poll_id, registered)
