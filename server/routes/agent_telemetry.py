"""Agent side: telemetry samples (kept as the agent's small latest row and in its bounded history)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from sqlalchemy import update

from protocol import endpoints
from server import db, telemetry as tele
from server.auth import require_agent
from server.routes.agent_poll import ANY_OBJECT
from server.routes.common import core_of, json_object

router = APIRouter(tags=["agent"])


@router.post(endpoints.TELEMETRY, openapi_extra=ANY_OBJECT)
async def telemetry(request: Request, agent: dict = Depends(require_agent)):
    """A telemetry sample (cpu, memory, disks, gpus, containers, free slots): kept as latest + history."""
    core = core_of(request)
    sample = await json_object(request, "a telemetry sample")
    now = time.time()

    def store():
        with core.engine.begin() as conn:
            values = {"last_seen": now}
            if tele.record(conn, core.settings, agent["id"], agent.get("telemetry_ts"), now, sample):
                values["telemetry_ts"] = now
            conn.execute(update(db.agents).where(db.agents.c.id == agent["id"]).values(**values))
    await core.run(store)
    return {"ok": True}
