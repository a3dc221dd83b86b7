"""The benchmark's baseline for log ingest: mounted only with `--echo-endpoint` (Settings.echo_endpoint)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from protocol import endpoints
from server.auth.service import require_admin

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)], include_in_schema=False)


@router.post(endpoints.ECHO)
async def echo(request: Request):
    """Reads the body and throws it away."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return {"bytes": n}
