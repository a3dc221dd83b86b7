"""Agent side: a task's log batches (`POST /agent/v1/tasks/{id}/logs`), stored by seq."""

from __future__ import annotations

from fastapi import APIRouter, Request

from protocol import endpoints
from server.http.deps import AgentDep, StateDep
from server.http.strict import ID_MAX, RowId
from server.logs import service as logs
from server.logs.lines import parse_batch

router = APIRouter(tags=["agent"])

# The log batch is read by hand (for speed); its shape is described for /openapi.json here.
_LOG_BATCH = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["first_seq", "lines"],
                    "properties": {
                        "first_seq": {"type": "integer", "minimum": 0, "maximum": ID_MAX},
                        "lines": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "ts": {"type": "number"},
                                    "level": {"type": "string"},
                                    "stream": {"type": "string"},
                                    "message": {"type": "string"},
                                },
                                "additionalProperties": True,
                            },
                        },
                    },
                }
            }
        },
    }
}


@router.post(endpoints.TASK_LOGS, openapi_extra=_LOG_BATCH)
async def post_logs(task_id: RowId, request: Request, state: StateDep, agent: AgentDep):
    """`{first_seq, lines}` (gzip accepted): line i gets seq first_seq + i; answers `{acked}`."""
    raw = await request.body()

    def store():
        first_seq, lines = parse_batch(raw)  # here, off the loop: a batch may be MiBs of JSON
        with state.db.transaction() as conn:
            task = logs.batch_task(conn, agent["id"], task_id)
            done = logs.ingest(conn, task, first_seq, lines, state.settings.log_quota_bytes)
            if done.added:
                state.metrics.log_bytes.inc(done.added)
            if done.dropped:
                state.metrics.log_dropped.inc(done.dropped)
            if done.cut:
                state.metrics.log_cut.inc(done.cut)
            if done.acked != task["log_acked"]:
                state.wakeups.notify_task(conn, task_id)  # the followers of this task, on every replica
            return done

    done = await state.db.run(store)
    if done.stored:
        state.metrics.lines.inc(done.stored)
    return {"acked": done.acked}
