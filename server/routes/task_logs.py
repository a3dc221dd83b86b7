"""User side: a task's log, as pages or followed live as server-sent events."""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from protocol import endpoints
from protocol.states import FINAL, TaskState
from server import logs
from server.auth import require_admin
from server.routes.common import core_of
from server.routes.tasks import task_or_404
from server.tasks import get_task

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)])

FOLLOW_BATCH = 2000         # lines per SSE write
KEEPALIVE_S = 15.0          # a comment this often keeps proxies from closing an idle stream


def _sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@router.get(endpoints.USER_TASK_LOGS)
async def task_logs(task_id: int, request: Request, after: int = Query(-1, ge=-1),
                    limit: int = Query(1000, ge=1, le=10000), follow: bool = False):
    """Lines with seq > after in order (never past a gap). follow=1: server-sent events, live."""
    core = core_of(request)
    task = task_or_404(core, task_id)
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
                lines = logs.read_lines(conn, t, cursor, FOLLOW_BATCH) if t else []
            if lines:
                cursor = lines[-1]["seq"]
                yield "".join(_sse("line", ln) for ln in lines)
                continue
            if t is None or (TaskState(t["state"]) in FINAL and (cursor >= t["log_acked"] or t["logs_expired_at"])):
                yield _sse("end", {"state": t["state"] if t else None, "acked": t["log_acked"] if t else cursor})
                return
            if not await core.task_waiters.wait(ev, KEEPALIVE_S):
                yield ": keep-alive\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
