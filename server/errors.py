"""JSON errors everywhere ({"error": code, "detail": sentence}) and per-route request body limits."""
from __future__ import annotations

import re
import zlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import endpoints
from protocol.errors import APIError, error_body
from server import strict
from server.settings import Settings

__all__ = ["APIError", "BodyLimitMiddleware", "ERROR_RESPONSES", "ErrorOut", "body_limit", "error_response", "install_error_handlers"]


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this route's limit of {limit} bytes")


class ErrorOut(BaseModel):
    """Every error answer: a code and a sentence (some codes add fields, e.g. `missing`)."""
    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


# Declared on every route of the protocol (/openapi.json); 422 is never answered (400 instead).
ERROR_RESPONSES = {
    400: {"model": ErrorOut, "description": "invalid request (see `error`)"},
    401: {"model": ErrorOut, "description": "missing or wrong credentials"},
    404: {"model": ErrorOut, "description": "no such object"},
    409: {"model": ErrorOut, "description": "conflicts with the object's state"},
    403: {"model": ErrorOut, "description": "a console-cookie write from another origin"},
    413: {"model": ErrorOut, "description": "body over the route's limit"},
    415: {"model": ErrorOut, "description": "not a kind of content this route serves (a thumbnail of a non-image)"},
    429: {"model": ErrorOut, "description": "too many wrong admin tokens from this address (see Retry-After)"},
    507: {"model": ErrorOut, "description": "the blob store's quota would be exceeded"},
}


def error_response(status: int, code: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError):
        resp = error_response(exc.status or 500, exc.code, exc.detail, **exc.extra)
        if "retry_after" in exc.extra:
            resp.headers["retry-after"] = str(exc.extra["retry_after"])
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        # The user API's bodies refuse fields they do not know (server/schemas.py UserIn): most
        # often a typo, said first and with its own code, whatever else is wrong.
        unknown = [_where(e) for e in errs if e.get("type") == "extra_forbidden"]
        if unknown:
            others = [f"{_where(e)}: {e.get('msg', 'invalid')}" for e in errs if e.get("type") != "extra_forbidden"]
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            return error_response(400, "unknown_field", "; ".join([
                f"unknown field(s) {shown}: the user API refuses fields it does not know (a typo?); "
                "/openapi.json lists the known ones", *others[:5]]), fields=unknown[:10])
        parts = [f"{_where(e)}: {e.get('msg', 'invalid')}" for e in errs[:5]]
        # A name refused as path-like keeps its own code (schemas.SafeName raises it).
        code = "bad_name" if errs and all(e.get("type") == "bad_name" for e in errs) else "invalid_request"
        return error_response(400, code, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        if exc.status_code == 405:
            detail = "this endpoint does not accept that method"
        return error_response(exc.status_code, code, detail, )

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        return error_response(500, "internal", f"the server failed on this request ({type(exc).__name__})")


def _where(e: dict) -> str:
    """Where a validation error stands in the body (`datasets.0.name`), cut short: a field's name is the sender's."""
    return ".".join(str(x)[:100] for x in e.get("loc", ()) if x != "body")[:300] or "body"


def _template_re(*templates: str) -> re.Pattern:
    """A regex matching the concrete paths of endpoint templates ('{task_id}' matches one segment)."""
    alts = (re.sub(r"\\{\w+\\}", "[^/]+", re.escape(t)) for t in templates)
    return re.compile("^(?:" + "|".join(alts) + ")$")


_BLOB_RE = _template_re(endpoints.AGENT_BLOB, endpoints.USER_BLOB)
_LARGE_RE = _template_re(endpoints.TASK_LOGS, endpoints.ECHO)
_PROJECT_RE = _template_re(endpoints.PROJECTS, endpoints.TASK_RESULTS)


def body_limit(settings: Settings, method: str, path: str) -> int | None:
    """The most bytes a request body may have on this route; None: streamed, unlimited (blob PUT)."""
    if method == "PUT" and _BLOB_RE.match(path):
        return None
    if _LARGE_RE.match(path):
        return settings.logs_body_limit
    if _PROJECT_RE.match(path):
        return settings.project_body_limit
    return settings.json_body_limit


class BodyLimitMiddleware:
    """Refuse oversized bodies with 413, undo `content-encoding: gzip` (bounded), and hold every
    JSON route's body to server.strict's rules (400 before the route runs).

    A JSON route's body (at most `json_body_limit`) is read whole here, checked and replayed; the
    log batch and the echo route stream through with their bytes counted (the log batch applies
    the strict rules itself, see server.logs.parse_batch)."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = body_limit(self.settings, scope["method"], scope["path"])
        if limit is None:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, 413, "body_too_large",
                                     f"the request body is larger than this route's limit of {limit} bytes")
        gzipped = headers.get(b"content-encoding", b"").lower() == b"gzip"
        whole = gzipped or not _LARGE_RE.match(scope["path"])
        if not whole:
            return await self.app(scope, _counting(receive, limit), send)
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            if len(body) > limit:
                return await _send_error(send, 413, "body_too_large", f"the request body is larger than {limit} bytes")
            if not msg.get("more_body"):
                break
        plain = bytes(body)
        if gzipped:
            try:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                plain = d.decompress(plain, limit + 1)
                if len(plain) > limit or d.unconsumed_tail:
                    return await _send_error(send, 413, "body_too_large",
                                             f"the decompressed body is larger than this route's limit of {limit} bytes")
            except zlib.error:
                return await _send_error(send, 400, "bad_gzip", "the body is not valid gzip data")
            new_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
            new_headers.append((b"content-length", str(len(plain)).encode()))
            scope = dict(scope, headers=new_headers)
        if not _LARGE_RE.match(scope["path"]):
            try:
                value = strict.check_body(plain)
            except strict.NotStrictJSON as e:
                return await _send_error(send, 400, e.code, e.detail, close=False)
            if value is not strict.NOT_JSON:
                scope = dict(scope, **{"sly.json": value})   # routes that read JSON by hand take it from here
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": plain, "more_body": False}
        return await self.app(scope, replay, send)


def _counting(receive, limit: int):
    seen = 0

    async def counting_receive():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return msg
    return counting_receive


async def _send_error(send, status: int, code: str, detail: str, close: bool = True) -> None:
    """An error answer from a middleware; `close` when the body was left unread."""
    import json
    body = json.dumps(error_body(code, detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
