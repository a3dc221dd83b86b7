"""Blob upload, existence check and download, on both sides (agent: x-token; user: admin)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from protocol import endpoints
from protocol.errors import APIError
from server.auth import require_admin, require_agent
from server.blobs import SHA256_RE, check_sha256


def _router(path: str, dep, tag: str) -> APIRouter:
    router = APIRouter(tags=[tag], dependencies=[Depends(dep)])

    @router.put(path)
    async def put_blob(sha256: str, request: Request):
        """Upload the bytes of a blob named by its sha256 (raw body, streamed)."""
        check_sha256(sha256)
        try:
            size, created = await request.app.state.core.blobs.put_stream(sha256, request.stream())
        except ClientDisconnect:
            raise APIError(400, "incomplete_upload", "the client went away before the upload ended") from None
        return {"sha256": sha256, "size": size, "created": created}

    @router.head(path, responses={200: {"description": "the blob exists; content-length is its size",
                                        "content": {"application/octet-stream": {}}}})
    async def head_blob(sha256: str, request: Request):
        """200 with content-length when the blob exists, else 404 (the headers a GET would have)."""
        size = request.app.state.core.blobs.size(sha256) if SHA256_RE.match(sha256) else None
        if size is None:
            return Response(status_code=404, media_type="application/json")
        return Response(status_code=200, media_type="application/octet-stream",
                        headers={"content-length": str(size), "accept-ranges": "bytes"})

    @router.get(path, responses={200: {"description": "the blob's bytes (206 with a Range)",
                                       "content": {"application/octet-stream": {}}},
                                  206: {"description": "the requested range", "content": {"application/octet-stream": {}}},
                                  416: {"description": "the range is outside the blob"}})
    async def get_blob(sha256: str, request: Request):
        """The blob's bytes; `Range: bytes=a-b` gives 206 with that part."""
        check_sha256(sha256)
        blobs = request.app.state.core.blobs
        if not blobs.exists(sha256):
            raise APIError(404, "blob_not_found", f"no blob {sha256}")
        return FileResponse(blobs.path(sha256), media_type="application/octet-stream",
                            headers={"cache-control": "public, max-age=31536000, immutable"})

    return router


agent_router = _router(endpoints.AGENT_BLOB, require_agent, "agent")
user_router = _router(endpoints.USER_BLOB, require_admin, "user")
