"""The public API's one route: `/public/api/v3/<method>` (POST, or GET for the methods the SDK
GETs), authenticated by an App token in `x-api-key`.

- no token, a malformed one, a node token, a token whose task has ended: 401;
- a method this server does not implement: 404 `method_not_supported`, naming it;
- a known method called with the other HTTP verb: 405.

Errors carry the SDK's error shape `{"error": <sentence>, "details": {...}}` (the SDK prints the
body, and reads `error` when it decides whether to retry) plus our own `code`.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from protocol.errors import APIError
from server.http.deps import json_object
from server.http.strict import dumps
from server.public import files, read, tasks, tokens, write  # noqa: F401  (they register their methods)
from server.public.registry import METHODS, Call

log = logging.getLogger("sly-server")

PREFIX = "/public/api/v3/"
API_KEY_HEADER = "x-api-key"
MULTIPART = "multipart/form-data"

router = APIRouter(include_in_schema=False)


def sdk_error(status: int, code: str, detail: str, **details) -> JSONResponse:
    """An error answer the SDK understands: `error` is the sentence, `details` the particulars."""
    return JSONResponse({"error": detail, "code": code, "details": details}, status_code=status)


@router.api_route(PREFIX + "{name:path}", methods=["GET", "POST"])
async def public_api(name: str, request: Request) -> Response:
    state = request.app.state.server
    token = request.headers.get(API_KEY_HEADER, "")
    task = await state.db.run(_task_of, state, token) if token else None
    if task is None:
        return sdk_error(
            401,
            "unauthorized",
            "the x-api-key header must hold the API token of a running App task (node tokens and "
            "tokens of ended tasks are refused)",
        )
    entry = METHODS.get(name)
    if entry is None:
        return sdk_error(
            404,
            "method_not_supported",
            f"public API method {name[:200]!r} is not supported by this server (docs/apps.md lists the supported ones)",
            method=name[:200],
        )
    verb, handler = entry
    # GET methods also answer POST (the SDK posts some of them); STREAM and RAW are POSTs whose
    # body the handler reads itself (registry.method).
    allowed = ("GET", "POST") if verb == "GET" else ("POST",)
    if request.method not in allowed:
        return sdk_error(405, "method_not_allowed", f"{name} is called with {allowed[0]}", method=name)
    if request.method == "GET":
        body: dict = dict(request.query_params)
    elif verb in ("STREAM", "RAW") or request.headers.get("content-type", "").startswith(MULTIPART):
        body = {}  # the handler reads the body itself
    else:
        try:
            body = await json_object(request, "the request body")
        except APIError as e:
            return sdk_error(e.status or 400, e.code, e.detail)
    try:
        out = await handler(Call(state=state, request=request, task=task, body=body))
    except APIError as e:
        return sdk_error(e.status or 500, e.code, e.detail, **e.extra)
    if isinstance(out, Response):
        return out
    return Response(dumps(out).encode(), media_type="application/json")


def _task_of(state, token: str):
    with state.db.reader() as conn:
        return tokens.task_of(conn, token)
