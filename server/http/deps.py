"""What the route modules share: the ServerState of a request, the decoded body (ParsedJSONRoute), JSON object
bodies, paging.

Reading rows (one by id, a page newest first) is server/db/rows.py."""

from __future__ import annotations

import gzip
import hashlib
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from protocol.errors import APIError
from server.auth.deps import require_admin, require_agent
from server.http.strict import ID_MAX, dumps
from server.state import ServerState


async def state_of(request: Request) -> ServerState:
    return request.app.state.server


# What a route declares it needs, as parameters: `state: StateDep`, `agent: AgentDep` (the calling
# node's row; the request counts as its contact), `_: AdminDep` (a user: Bearer admin token or
# console session).
StateDep = Annotated[ServerState, Depends(state_of)]
AgentDep = Annotated[dict, Depends(require_agent)]
AdminDep = Annotated[None, Depends(require_admin)]

# openapi_extra of a route that reads its JSON object body by hand (no body model): the schema
# still says a JSON object is required.
ANY_OBJECT = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}}


async def json_object(request: Request, what: str) -> dict:
    """The body as a JSON object, or a 400 JSON error saying what is wrong with it."""
    try:
        # Decoded once already by the strict check (server/http/errors.py), which left it here.
        body = request.scope["sly.json"] if "sly.json" in request.scope else await request.json()
    except ValueError:
        raise APIError(400, "malformed_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "invalid_request", f"{what} must be a JSON object")
    return body


class ParsedRequest(Request):
    async def json(self):
        # BodyLimitMiddleware decoded the body already (server/http/errors.py): a project body of 64 MiB
        # is hundreds of MB as Python objects, so a second decoding would double the request's memory.
        if "sly.json" in self.scope:
            return self.scope["sly.json"]
        return await super().json()

    async def body(self) -> bytes:
        # Starlette joins the chunks it reads with an empty last one: a copy of the whole body,
        # which the request would keep as long as it runs. The middleware replays it in one chunk.
        if not hasattr(self, "_body"):
            chunks = [c async for c in self.stream() if c]
            self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body


class ParsedJSONRoute(APIRoute):
    """A route whose body model is validated from the middleware's decoded body (FastAPI's documented
    custom Request class); the annotations are the same objects, not copies."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed(request: Request):
            return await handler(ParsedRequest(request.scope, request.receive))

        return parsed


def page(items: list[dict], limit: int) -> dict:
    """One page of a list answer; `next` is the last id when more rows exist (rows fetched: limit + 1)."""
    more = len(items) > limit
    items = items[:limit]
    return {"items": items, "next": str(items[-1]["id"]) if more else None}


def cursor_id(cursor: str | None) -> int | None:
    if cursor in (None, ""):
        return None
    # isascii: str.isdigit() also takes digits such as '²' that int() refuses.
    if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 19 and int(cursor) <= ID_MAX):
        raise APIError(400, "bad_cursor", "cursor must be the `next` value of a previous page")
    return int(cursor)


def conditional_json(request: Request, body: dict) -> Response:
    """`body` as JSON with a weak ETag of its bytes: 304 when If-None-Match names it, gzipped when
    the client accepts it (a nodes page of 1,000 rows shrinks about tenfold)."""
    data = dumps(body).encode()  # a stored non-finite number reads as null, never a 500
    etag = 'W/"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Vary": "Accept-Encoding", "Cache-Control": "no-cache"}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    if len(data) > 1400 and "gzip" in request.headers.get("accept-encoding", ""):
        data = gzip.compress(data, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(data, media_type="application/json", headers=headers)
