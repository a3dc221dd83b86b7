"""Agent side: connect (hello with system info) and the long-poll that hands out tasks and stops."""

from __future__ import annotations

import random
import time
import uuid

from fastapi import APIRouter, Query, Request

from protocol import endpoints
from server.agents import service
from server.agents.schemas import PollIn
from server.http.deps import ANY_OBJECT, AgentDep, StateDep, json_object
from server.http.strict import SafeJSONResponse
from server.wakeups import Waiters

router = APIRouter(tags=["agent"])


@router.post(endpoints.CONNECT, openapi_extra=ANY_OBJECT)
async def connect(request: Request, agent: AgentDep, state: StateDep):
    """The agent says hello with its system info; answers who it is and the server's options."""
    info = await json_object(request, "system info")

    def store():
        with state.db.engine.begin() as conn:
            service.set_system_info(conn, agent["id"], info)

    # It changes rarely (a new GPU, a Docker upgrade): written only then, so a fleet reconnecting
    # after a server restart writes nothing here (the contact goes with the batch, as for any request).
    if info != agent.get("system_info"):
        await state.db.run(store)
        state.agent_rows.forget(agent["id"])  # its kept row has the old system info
    s = state.settings
    return {
        "agent": {"id": agent["id"], "name": agent["name"], "allowed_task_types": agent["allowed_task_types"]},
        "options": {
            "lease_s": s.lease_s,
            "telemetry_interval_s": s.telemetry_interval_s,
            "max_poll_wait_s": s.max_poll_wait_s,
            "logs_body_limit": s.logs_body_limit,
            "json_body_limit": s.json_body_limit,
            "project_body_limit": s.project_body_limit,
        },
    }


POLL_JITTER = 0.2  # an idle poll answers after (1 - POLL_JITTER * U(0, 1)) x wait
POLL_ROW_MARGIN_S = 30.0  # a poll's row outlives its deadline this long, in case its replica dies


def _poll_round(state, agent: dict, body: PollIn, first: bool, last: bool) -> tuple[dict | None, dict]:
    """One look at the database for a poll: (the answer or None to keep waiting, the answer this
    round would give at the poll's end).

    First one statement outside any transaction (`ServerState.reader`, `service.peek`). When it shows
    nothing to hand out, claim or mark delivered, and no refusal to write (`service.quiet_round`:
    a node running its tasks, or an idle one), that is the answer and nothing is written.
    Otherwise one transaction (`service.poll_round`).
    """
    with state.db.reader() as conn:
        rows = service.peek(conn, agent["id"])
    quiet = service.quiet_round(rows, agent, body, first, last)
    if quiet is not None:
        return quiet
    with state.db.transaction() as conn:
        return service.poll_round(conn, state, agent, body, first, last)


@router.post(endpoints.POLL)
async def poll(body: PollIn, agent: AgentDep, state: StateDep, wait: float = Query(0, ge=0, allow_inf_nan=False)):
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
    aid = agent["id"]
    # Ends at a random point of the wait's last fifth: a fleet that started together (after a server
    # restart, every node reconnects at once) would otherwise keep polling in step, every node's
    # poll answering and coming back in the same second, wait after wait.
    wait = min(wait, state.settings.max_poll_wait_s) * (1.0 - POLL_JITTER * random.random())
    deadline = time.monotonic() + wait
    expires_at = time.time() + wait + POLL_ROW_MARGIN_S
    poll_id = uuid.uuid4().hex
    registered, first = False, True
    state.metrics.polls.inc()
    try:
        while True:
            ev = state.wakeups.agents.event(aid)  # before reading the database: no wake-up is lost
            last = deadline - time.monotonic() <= 0 or state.closing
            answer, at_end = await state.db.run(_poll_round, state, agent, body, first, last)
            first = False
            if answer is not None:
                # A task's project carries every annotation: plain JSON, so FastAPI's slow encoder is skipped.
                return SafeJSONResponse(answer)
            if not registered:
                state.contacts.poll_open(poll_id, aid, state.wakeups.replica, expires_at)
                registered = True
            if not await Waiters.wait(ev, deadline - time.monotonic()) and not state.closing:
                return SafeJSONResponse(at_end)  # nothing changed since the last look
    finally:
        state.metrics.polls.dec()
        if registered:  # also when the client hung up
            state.contacts.poll_closed(poll_id)
        state.contacts.seen(aid)  # the wait was contact
