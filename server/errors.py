"""JSON errors everywhere ({"error": code, "detail": sentence}) and per-route request body limits."""
from __future__ import annotations

import re
import zlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import endpoints
from protocol.errors import APIError, error_body
from server.settings import Settings

__all__ = ["APIError", "BodyLimitMiddleware", "body_limit", "error_response", "install_error_handlers"]


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this route's limit of {limit} bytes")


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
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
        return error_response(400, "invalid_request", "; ".join(parts))

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


def _template_re(*templates: str) -> re.Pattern:
    """A regex matching the concrete paths of endpoint templates ('{task_id}' matches one segment)."""
    alts = (re.sub(r"\\{\w+\\}", "[^/]+", re.escape(t)) for t in templates)
    return re.compile("^(?:" + "|".join(alts) + ")$")


_BLOB_RE = _template_re(endpoints.AGENT_BLOB, endpoints.USER_BLOB)
_LARGE_RE = _template_re(endpoints.TASK_LOGS, endpoints.ECHO)


def body_limit(settings: Settings, method: str, path: str) -> int | None:
    """The most bytes a request body may have on this route; None: streamed, unlimited (blob PUT)."""
    if method == "PUT" and _BLOB_RE.match(path):
        return None
    if _LARGE_RE.match(path):
        return settings.logs_body_limit
    return settings.json_body_limit


class BodyLimitMiddleware:
    """Refuse oversized bodies with 413 and undo `content-encoding: gzip` (bounded) for JSON routes."""

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
        if headers.get(b"content-encoding", b"").lower() == b"gzip":
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
            try:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                plain = d.decompress(bytes(body), limit + 1)
                if len(plain) > limit or d.unconsumed_tail:
                    return await _send_error(send, 413, "body_too_large",
                                             f"the decompressed body is larger than this route's limit of {limit} bytes")
            except zlib.error:
                return await _send_error(send, 400, "bad_gzip", "the body is not valid gzip data")
            new_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
            new_headers.append((b"content-length", str(len(plain)).encode()))
            scope = dict(scope, headers=new_headers)
            sent = False

            async def replay():
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": plain, "more_body": False}
            return await self.app(scope, replay, send)

        seen = 0

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg
        return await self.app(scope, counting_receive, send)


async def _send_error(send, status: int, code: str, detail: str) -> None:
    import json
    body = json.dumps(error_body(code, detail)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
