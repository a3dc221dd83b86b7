"""Bulk blob transfer, on both sides (agent: x-token; user: admin): check, upload and download
many blobs per request (protocol.bulk; the logic is server.blobs.bulk). A node reaches only the
blobs it may read, as with the single blob routes (server.blobs.router)."""
# No `from __future__ import annotations`: the routes' `who: dep` annotation is the parameter of
# _router, which FastAPI could not resolve from a string.

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from protocol import bulk as protocol_bulk
from protocol import endpoints
from server.blobs import bulk
from server.http.deps import AdminDep, AgentDep, ParsedJSONRoute, StateDep
from server.http.strict import SafeJSONResponse

_TAR_BODY = {
    "requestBody": {
        "required": True,
        "content": {protocol_bulk.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}
_TAR_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": f"a tar stream of the blobs (protocol.bulk); `{protocol_bulk.BULK_MISSING_HEADER}` counts "
        "those left out",
        "content": {protocol_bulk.CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _agent_id(who) -> int | None:
    return who["id"] if isinstance(who, dict) else None


def _router(paths: tuple[str, str, str], dep, body, tag: str) -> APIRouter:
    """The three routes on (check, upload, download) `paths`; `dep` (AgentDep or AdminDep) is who may
    call them: an agent's row, or None; `body` the JSON body's model of that side."""
    check_path, upload_path, download_path = paths
    # The JSON bodies are validated from the body the middleware decoded (server.http.deps).
    router = APIRouter(tags=[tag], route_class=ParsedJSONRoute)

    @router.post(check_path, responses={200: {"model": bulk.MissingOut}})
    async def check_blobs(hashes: body, who: dep, state: StateDep):
        """Which of the blobs (1 to 10,000 sha256s) are missing: not stored, or, for a node, not
        readable by it (one answer for both, as a single GET's 404). In the order asked, each once."""
        return SafeJSONResponse({"missing": await bulk.missing(state, hashes.sha256, _agent_id(who))})

    @router.post(upload_path, openapi_extra=_TAR_BODY, responses={200: {"model": bulk.UploadOut}})
    async def upload_blobs(request: Request, who: dep, state: StateDep):
        """Upload many blobs as one tar stream (entries named by their sha256; at most 10,000 entries
        and 256 MiB). Each entry is hashed as it streams and kept only if it matches; one answer per
        entry (a refused one carries the single PUT's error code). 400 `bad_batch` for a malformed or
        cut stream, `batch_too_large` past the bounds: the entries before it stay stored."""
        answers = await bulk.upload(state, request.stream(), _agent_id(who))
        return SafeJSONResponse({"blobs": answers})

    @router.post(download_path, responses=_TAR_ANSWER)
    async def download_blobs(hashes: body, who: dep, state: StateDep):
        """A tar stream of the blobs asked for (1 to 10,000 sha256s) that are stored (and, for a node,
        readable by it), in the order asked, each once; the others are left out and counted in the
        header `x-blobs-missing`. 400 `batch_too_large` when they hold more than 256 MiB."""
        entries, left_out = await bulk.listing(state, hashes.sha256, _agent_id(who))
        return StreamingResponse(
            bulk.tar_stream(state.blobs, entries),
            media_type=protocol_bulk.CONTENT_TYPE,
            headers={
                "content-length": str(bulk.tar_length(entries)),
                protocol_bulk.BULK_MISSING_HEADER: str(left_out),
            },
        )

    return router


agent_router = _router(
    (endpoints.AGENT_BLOBS_CHECK, endpoints.AGENT_BLOBS_UPLOAD, endpoints.AGENT_BLOBS_DOWNLOAD),
    AgentDep,
    bulk.HashesIn,
    "agent",
)
user_router = _router(
    (endpoints.USER_BLOBS_CHECK, endpoints.USER_BLOBS_UPLOAD, endpoints.USER_BLOBS_DOWNLOAD),
    AdminDep,
    bulk.UserHashesIn,
    "user",
)
