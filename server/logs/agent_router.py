"""Agent side: a task's log batches (`POST /agent/v1/tasks/{id}/logs`), stored by seq."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlalchemy import bindparam, select

from protocol import endpoints
from server import db
from server.auth.service import require_agent
from server.http.deps import core_of
from server.http.strict import ID_MAX, RowId
from server.logs import service as logs
from server.tasks.service import own_task

router = APIRouter(tags=["agent"])

# The log batch is read by hand (for speed); its shape is described for /openapi.json here.
_LOG_BATCH = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["first_seq", "lines"],
    "properties": {"first_seq": {"type": "integer", "minimum": 0, "maximum": ID_MAX},
                   "lines": {"type": "array", "items": {"type": "object", "properties": {
                       "ts": {"type": "number"}, "level": {"type": "string"}, "stream": {"type": "string"},
                       "message": {"type": "string"}}, "additionalProperties": True}}}}}}}}


_t = db.tasks.c
# What a log batch needs of its task: not the config, project or timeline JSON a full row decodes.
_LOG_TASK = select(_t.id, _t.agent_id, _t.log_acked, _t.log_bytes).where(_t.id == bindparam("tid"))


@router.post(endpoints.TASK_LOGS, openapi_extra=_LOG_BATCH)
async def post_logs(task_id: RowId, request: Request, agent: dict = Depends(require_agent)):
    """`{first_seq, lines}` (gzip accepted): line i gets seq first_seq + i; answers `{acked}`."""
    core = core_of(request)
    raw = await request.body()

    def store():
        first_seq, lines = logs.parse_batch(raw)   # here, off the loop: a batch may be MiBs of JSON
        with core.transaction() as conn:
            task = own_task(conn, agent["id"], task_id, _LOG_TASK)
            acked, stored = logs.ingest(core, conn, task, first_seq, lines)
            if acked != task["log_acked"]:
                core.notify_task(conn, task_id)   # the followers of this task, on every replica
            return acked, stored
    acked, stored = await core.run(store)
    if stored:
        core.m_lines.inc(stored)
    return {"acked": acked}
