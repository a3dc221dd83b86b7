"""Blob upload, existence check and download, on both sides (agent: x-token; user: admin).

The user side reaches every blob. The agent side reaches only the blobs of its own tasks
(server.blobs.refs.agent_may_read); any other answers 404 as if it did not exist. An agent's
upload is recorded, so it may read back what it sent, only once its bytes were read and hashed to
the name, also for a blob stored already: a PUT without the bytes proves nothing.
"""
# No `from __future__ import annotations`: the routes' `who: dep` annotation is the parameter of
# _router, which FastAPI could not resolve from a string.

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from protocol import endpoints
from protocol.errors import APIError
from server.blobs import refs as blob_refs
from server.blobs.store import SHA256_RE, check_sha256
from server.http.deps import AdminDep, AgentDep, StateDep
from server.state import ServerState


async def _visible(state: ServerState, who, sha256: str) -> bool:
    """The blob exists and the caller may see it (an agent: only the blobs of its own tasks)."""
    if not state.blobs.exists(sha256):
        return False
    if isinstance(who, dict):
        return await state.db.run(_agent_may_read, state, who["id"], sha256)
    return True


def _agent_may_read(state: ServerState, agent_id: int, sha256: str) -> bool:
    with state.db.engine.connect() as conn:
        return blob_refs.agent_may_read(conn, agent_id, sha256)


def _record_upload(state: ServerState, agent_id: int, sha256: str) -> None:
    with state.db.engine.begin() as conn:
        blob_refs.add(conn, blob_refs.UPLOAD, agent_id, [sha256])


def _length(request: Request) -> int | None:
    v = request.headers.get("content-length", "")
    return int(v) if v.isdigit() else None


def _router(path: str, dep, tag: str) -> APIRouter:
    """The three routes on `path`; `dep` (AgentDep or AdminDep) is who may call them: an agent's row, or None."""
    router = APIRouter(tags=[tag])

    @router.put(path)
    async def put_blob(sha256: str, request: Request, who: dep, state: StateDep):
        """Upload the bytes of a blob named by its sha256 (raw body, streamed); 507 past the store's quota."""
        check_sha256(sha256)
        try:
            size, created = await state.blobs.put_stream(sha256, request.stream(), _length(request))
        except ClientDisconnect:
            raise APIError(400, "incomplete_upload", "the client went away before the upload ended") from None
        if isinstance(who, dict):
            await state.db.run(_record_upload, state, who["id"], sha256)
        return {"sha256": sha256, "size": size, "created": created}

    @router.head(
        path,
        responses={
            200: {
                "description": "the blob exists; content-length is its size",
                "content": {"application/octet-stream": {}},
            }
        },
    )
    async def head_blob(sha256: str, who: dep, state: StateDep):
        """200 with content-length when the blob exists (and, for an agent, is one of its tasks'), else 404."""
        if not SHA256_RE.match(sha256) or not await _visible(state, who, sha256):
            return Response(status_code=404, media_type="application/json")
        size = state.blobs.size(sha256)
        if size is None:
            return Response(status_code=404, media_type="application/json")
        return Response(
            status_code=200,
            media_type="application/octet-stream",
            headers={"content-length": str(size), "accept-ranges": "bytes"},
        )

    @router.get(
        path,
        responses={
            200: {"description": "the blob's bytes (206 with a Range)", "content": {"application/octet-stream": {}}},
            206: {"description": "the requested range", "content": {"application/octet-stream": {}}},
            416: {"description": "the range is outside the blob"},
        },
    )
    async def get_blob(sha256: str, who: dep, state: StateDep):
        """The blob's bytes; `Range: bytes=a-b` gives 206 with that part. An agent: its tasks' blobs only."""
        check_sha256(sha256)
        if not await _visible(state, who, sha256):
            raise APIError(404, "blob_not_found", f"no blob {sha256}")
        return FileResponse(
            state.blobs.path(sha256),
            media_type="application/octet-stream",
            headers={"cache-control": "private, max-age=31536000, immutable"},
        )

    return router


agent_router = _router(endpoints.AGENT_BLOB, AgentDep, "agent")
user_router = _router(endpoints.USER_BLOB, AdminDep, "user")
