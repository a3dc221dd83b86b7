"""Agent side: connect (hello with system info) and the long-poll that hands out tasks and stops."""
from __future__ import annotations

import random
import time
import uuid

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import and_, bindparam, exists, select, update

from protocol import endpoints
from protocol.errors import APIError
from protocol.states import TaskState
from server.http.strict import SafeJSONResponse
from server import db
from server.auth.service import require_agent
from server.http.deps import core_of, json_object
from server.schemas import PollIn
from server.tasks.service import LEASED_VALUES, hand_out
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
            conn.execute(update(db.agents).where(db.agents.c.id == agent["id"]).values(system_info=info))
    # It changes rarely (a new GPU, a Docker upgrade): written only then, so a fleet reconnecting
    # after a server restart writes nothing here (the contact goes with the batch, as for any request).
    if info != agent.get("system_info"):
        await core.run(store)
        core.forget_agent(agent["id"])   # its kept row has the old system info
    s = core.settings
    return {"agent": {"id": agent["id"], "name": agent["name"], "allowed_task_types": agent["allowed_task_types"]},
            "options": {"lease_s": s.lease_s, "telemetry_interval_s": s.telemetry_interval_s,
                        "max_poll_wait_s": s.max_poll_wait_s, "logs_body_limit": s.logs_body_limit,
                        "json_body_limit": s.json_body_limit, "project_body_limit": s.project_body_limit}}


POLL_JITTER = 0.2          # an idle poll answers after (1 - POLL_JITTER * U(0, 1)) x wait
POLL_ROW_MARGIN_S = 30.0   # a poll's row outlives its deadline this long, in case its replica dies


_a = db.agents.c
_t = db.tasks.c
_POLL_AGENT = select(_a.token_hash, _a.refusing, _a.settings_version, _a.name, _a.allowed_task_types).where(
    _a.id == bindparam("aid"))
# The first look, one statement and no transaction: the agent's row, whether a task waits for it,
# and one row per task it holds (leased, or lost and still to be stopped). Most polls stop there.
_q = db.tasks.alias("queued_task")
_PEEK = (select(_a.token_hash, _a.refusing, _a.settings_version, _a.name, _a.allowed_task_types,
                exists().where(_q.c.agent_id == _a.id, _q.c.state == TaskState.QUEUED.value).label("queued"),
                _t.id, _t.state, _t.stop_requested, _t.stop_delivered)
         .select_from(db.agents.outerjoin(db.tasks, and_(_t.agent_id == _a.id,
                                                         _t.state.in_(LEASED_VALUES + [TaskState.LOST.value]))))
         .where(_a.id == bindparam("aid")).order_by(_t.id))


def _quiet_answer(rows, body: PollIn, first: bool) -> list[int] | None:
    """From the first look: the stop list when the poll needs no transaction (nothing to hand out,
    claim or mark delivered, no refusal to write), else None. What `hand_out` would decide."""
    head = rows[0]
    if head["queued"] and body.free_slots > 0:
        return None
    if first and (head["refusing"] or "") != body.refusing:
        return None
    running = set(body.running)
    stop = []
    for r in rows:
        if r["id"] is None:
            continue   # the agent holds no task
        if r["id"] not in running:
            return None    # handed out again, or stopped before it ran
        if r["state"] == TaskState.LOST.value or r["stop_requested"]:
            if not r["stop_delivered"]:
                return None
            stop.append(r["id"])
    return stop


def _check_token(row, agent: dict) -> None:
    if row is None:
        raise APIError(401, "unauthorized", "this agent was removed")
    if row["token_hash"] != agent["token_hash"]:
        raise APIError(401, "unauthorized", "the agent token was rotated")


def _poll_round(core, agent: dict, body: PollIn, first: bool, last: bool) -> tuple[dict | None, dict]:
    """One look at the database for a poll: (the answer or None to keep waiting, the answer this
    round would give at the poll's end).

    First one statement outside any transaction (`Core.reader`, `_PEEK`). When it shows nothing
    to hand out, claim or mark delivered, and no refusal to write (`_quiet_answer`: a node
    running its tasks, or an idle one), that is the answer and nothing is written. Otherwise one
    transaction: the agent's row again (gone or with another token: 401), its refusal (first
    round), the hand-out, and stops marked delivered when answering.
    """
    aid = agent["id"]
    with core.reader() as conn:
        rows = conn.execute(_PEEK, {"aid": aid}).mappings().all()
    _check_token(rows[0] if rows else None, agent)
    stop = _quiet_answer(rows, body, first)
    if stop is not None:
        head = rows[0]
        answer = {"tasks": [], "stop": stop,
                  "settings": {"name": head["name"], "allowed_task_types": head["allowed_task_types"]}}
        if last or head["settings_version"] != agent["settings_version"]:
            return answer, answer
        return None, answer
    with core.transaction() as conn:
        row = conn.execute(_POLL_AGENT, {"aid": aid}).mappings().first()
        _check_token(row, agent)
        if first and (row["refusing"] or "") != body.refusing:
            conn.execute(update(db.agents).where(db.agents.c.id == aid).values(refusing=body.refusing or None))
        tasks, stop, new_stop = hand_out(core, conn, agent, body.free_slots, len(body.free_gpus), body.running,
                                         time.time())
        answer = {"tasks": tasks, "stop": stop,
                  "settings": {"name": row["name"], "allowed_task_types": row["allowed_task_types"]}}
        if tasks or new_stop or last or row["settings_version"] != agent["settings_version"]:
            if new_stop:
                conn.execute(update(db.tasks).where(db.tasks.c.id.in_(new_stop)).values(stop_delivered=True))
            return answer, answer
        return None, answer


@router.post(endpoints.POLL)
async def poll(body: PollIn, request: Request, wait: float = Query(0, ge=0, allow_inf_nan=False),
               agent: dict = Depends(require_agent)):
    """Long-poll: answers at once when a task or a new stop request is pending, else after 0.8 x
    `wait` to `wait` s (a random point, so that polls of nodes that started together spread out).

    Woken (on any replica) by a new task, a stop, a settings change, a lost task, a rotated token
    or a removed agent; the last two end it with 401 and no task. While it waits, a row in
    `polls` says so to every replica (written with the contact batch: a poll answered within the
    batch interval never writes one).

    A poll that was not woken answers at its end with what its last look found, without looking
    again: everything that changes a poll's answer wakes it (the list above), on every replica,
    and a replica whose listener reconnects wakes every poll. That halves the database work of
    a fleet of idle nodes.
    """
    core = core_of(request)
    aid = agent["id"]
    # Ends at a random point of the wait's last fifth: a fleet that started together (after a server
    # restart, every node reconnects at once) would otherwise keep polling in step, every node's
    # poll answering and coming back in the same second, wait after wait.
    wait = min(wait, core.settings.max_poll_wait_s) * (1.0 - POLL_JITTER * random.random())
    deadline = time.monotonic() + wait
    expires_at = time.time() + wait + POLL_ROW_MARGIN_S
    poll_id = uuid.uuid4().hex
    registered, first = False, True
    core.m_polls.inc()
    try:
        while True:
            ev = core.wakeups.agents.event(aid)   # before reading the database: no wake-up is lost
            last = deadline - time.monotonic() <= 0 or core.closing
            answer, at_end = await core.run(_poll_round, core, agent, body, first, last)
            first = False
            if answer is not None:
                # A task's project carries every annotation: plain JSON, so FastAPI's slow encoder is skipped.
                return SafeJSONResponse(answer)
            if not registered:
                core.contacts.poll_open(poll_id, aid, core.wakeups.replica, expires_at)
                registered = True
            if not await Waiters.wait(ev, deadline - time.monotonic()) and not core.closing:
                return SafeJSONResponse(at_end)   # nothing changed since the last look
    finally:
        core.m_polls.dec()
        if registered:   # also when the client hung up
            core.contacts.poll_closed(poll_id)
        core.contacts.seen(aid)   # the wait was contact
