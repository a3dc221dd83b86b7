"""The benchmark's baseline for log ingest: mounted only with `--echo-endpoint` (Settings.echo_endpoint)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from protocol import endpoints
from server.http.deps import AdminDep

router = APIRouter(tags=["user"], include_in_schema=False)


@router.post(endpoints.ECHO)
async def echo(request: Request, _: AdminDep):
    """Reads the body and throws it away."""
    n = 0
    async for chunk in request.stream():
        n += len(chunk)
    return {"bytes": n}
