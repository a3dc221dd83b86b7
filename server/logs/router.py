"""User side: a task's log, as pages or followed live as server-sent events (through server.logs.feed)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from protocol import endpoints
from protocol.errors import APIError
from server.http.deps import AdminDep, StateDep
from server.http.strict import ID_MAX, RowId, dumps
from server.logs import service as logs
from server.tasks.service import get_task

router = APIRouter(tags=["user"])


@router.get(
    endpoints.USER_TASK_LOGS,
    responses={
        200: {
            "description": "a page of lines; with follow=1 an event stream",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
    },
)
async def task_logs(
    _: AdminDep,
    task_id: RowId,
    state: StateDep,
    after: int = Query(-1, ge=-1, le=ID_MAX),
    limit: int = Query(1000, ge=1, le=10000),
    follow: bool = False,
):
    """Lines with seq > after in order (never past a gap), at most `limit` lines and about
    `--log-page-bytes` bytes (at least one line); `next` is set when more lines exist.
    follow=1: server-sent events, live."""

    def page():
        with state.db.engine.connect() as conn:
            task = get_task(conn, task_id)
            if task is None:
                raise APIError(404, "task_not_found", f"no task {task_id}")
            if follow:
                return task, None
            lines, more = logs.read_lines(conn, task, after, limit, state.settings.log_page_bytes)
        # Encoded here, on the database thread: a page of MiBs would hold the event loop.
        return task, dumps({"lines": lines, "next": lines[-1]["seq"] if more and lines else None})

    task, body = await state.db.run(page)
    if not follow:
        return Response(body, media_type="application/json")
    return StreamingResponse(
        state.log_hub.follow(task, after),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
