"""Agent side: telemetry samples (kept as the agent's small latest row and in its bounded history)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from protocol import endpoints
from server.http.deps import ANY_OBJECT, AgentDep, StateDep, json_object
from server.telemetry.service import accept_sample

router = APIRouter(tags=["agent"])


@router.post(endpoints.TELEMETRY, openapi_extra=ANY_OBJECT)
async def telemetry(request: Request, agent: AgentDep, state: StateDep):
    """A telemetry sample (cpu, memory, disks, gpus, containers, free slots): kept as latest + history.

    Written with the next batch (server/agents/contact.py, within a second), not before the answer: a
    sample is worth only its place in a chart, and a thousand nodes send hundreds a second. The
    ordinary case is answered before FastAPI by server/http/fastpath.py; this route answers the rest."""
    sample = await json_object(request, "a telemetry sample")
    accept_sample(state, agent, sample)
    return {"ok": True}
