"""JSON errors everywhere ({"error": code, "detail": sentence}) and per-route request body limits."""

from __future__ import annotations

import asyncio
import json
import re
import zlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import endpoints
from protocol.errors import APIError, error_body
from server.http import strict
from server.settings import Settings

__all__ = [
    "APIError",
    "BodyLimitMiddleware",
    "ERROR_RESPONSES",
    "ErrorOut",
    "body_limit",
    "error_response",
    "install_error_handlers",
]


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
    503: {"model": ErrorOut, "description": "`server_busy`: too many large bodies at once (see Retry-After)"},
    507: {"model": ErrorOut, "description": "the blob store's quota would be exceeded"},
}


def error_response(status: int, code: str, detail: str, **extra) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


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
        # The user API's bodies refuse fields they do not know (server/http/fields.py UserIn): most
        # often a typo, said first and with its own code, whatever else is wrong.
        unknown = [_where(e) for e in errs if e.get("type") == "extra_forbidden"]
        if unknown:
            others = [f"{_where(e)}: {e.get('msg', 'invalid')}" for e in errs if e.get("type") != "extra_forbidden"]
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            return error_response(
                400,
                "unknown_field",
                "; ".join(
                    [
                        f"unknown field(s) {shown}: the user API refuses fields it does not know (a typo?); "
                        "/openapi.json lists the known ones",
                        *others[:5],
                    ]
                ),
                fields=unknown[:10],
            )
        parts = [f"{_where(e)}: {e.get('msg', 'invalid')}" for e in errs[:5]]
        # A name refused as path-like, a bad sha256 in a bulk list and a bulk list over its bound keep
        # their own codes (schemas.SafeName, blobs.bulk.HashesIn raise them).
        kinds = {e.get("type") for e in errs}
        code = kinds.pop() if len(kinds) == 1 and kinds <= _OWN_CODES else "invalid_request"
        return error_response(400, code, "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint"
        if exc.status_code == 405:
            detail = "this endpoint does not accept that method"
        return error_response(exc.status_code, code, detail)

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        return error_response(500, "internal", f"the server failed on this request ({type(exc).__name__})")


_OWN_CODES = {"bad_name", "bad_sha256", "batch_too_large"}


def _where(e: dict) -> str:
    """Where a validation error stands in the body (`datasets.0.name`), cut short: a field's name is the sender's."""
    return ".".join(str(x)[:100] for x in e.get("loc", ()) if x != "body")[:300] or "body"


def _template_re(*templates: str) -> re.Pattern:
    """A regex matching the concrete paths of endpoint templates ('{task_id}' matches one segment)."""
    alts = (re.sub(r"\\{\w+\\}", "[^/]+", re.escape(t)) for t in templates)
    return re.compile("^(?:" + "|".join(alts) + ")$")


_BLOB_RE = _template_re(endpoints.AGENT_BLOB, endpoints.USER_BLOB)
_BULK_UPLOAD_RE = _template_re(endpoints.AGENT_BLOBS_UPLOAD, endpoints.USER_BLOBS_UPLOAD)
_LARGE_RE = _template_re(endpoints.TASK_LOGS, endpoints.ECHO)
_PROJECT_RE = _template_re(endpoints.PROJECTS, endpoints.PROJECT_ITEMS, endpoints.TASK_RESULTS)


def body_limit(settings: Settings, method: str, path: str) -> int | None:
    """The most bytes a request body may have on this route; None: streamed, unlimited (blob PUT,
    bulk blob upload: bounded by protocol.bulk's MAX_BYTES as it streams; the public API's uploads)."""
    if (method == "PUT" and _BLOB_RE.match(path)) or (method == "POST" and _BULK_UPLOAD_RE.match(path)):
        return None
    # The public API (server/public/): its multipart uploads stream, bounded by their own reading
    # (images.bulk.upload: parts and bytes; team files: their size bound); its JSON methods take
    # project-sized bodies, since annotations travel inline (50 with bitmaps pass 1 MiB).
    if path.startswith("/public/api/v3/"):
        from server.public.registry import METHODS  # the router imported every method module

        entry = METHODS.get(path.removeprefix("/public/api/v3/"))
        return None if entry is not None and entry[0] == "STREAM" else settings.project_body_limit
    if _LARGE_RE.match(path):
        return settings.logs_body_limit
    if _PROJECT_RE.match(path):
        return settings.project_body_limit
    return settings.json_body_limit


# Large bodies (over Settings.json_body_limit) read, decoded and served at once in one server
# process: a project body of 64 MiB is ~10 times that as Python objects while its request runs, so
# several nodes posting results at once must not add up. The others wait for a slot (their bodies
# stay unread in the socket, which costs nothing here) up to LARGE_WAIT_S, less than a client's
# usual 30 s timeout, then get 503 `server_busy` with Retry-After, which the node's client honours.
LARGE_AT_ONCE = 2
LARGE_WAIT_S = 20.0
BUSY_RETRY_AFTER_S = 5


class BodyLimitMiddleware:
    """Refuse oversized bodies with 413, undo `content-encoding: gzip` (bounded), and hold every
    JSON route's body to server.http.strict's rules (400 before the route runs).

    A JSON route's body (at most `json_body_limit`) is read whole here, checked and replayed; the
    log batch and the echo route stream through with their bytes counted (the log batch applies
    the strict rules itself, see server.logs.lines.parse_batch). A body over `json_body_limit` (the
    project routes', the log batch's) holds one of LARGE_AT_ONCE slots until its request ends and
    is decoded in a thread, off the event loop."""

    def __init__(self, app, settings: Settings, large_at_once: int = LARGE_AT_ONCE, large_wait_s: float = LARGE_WAIT_S):
        self.app, self.settings = app, settings
        self.large, self.large_wait_s = asyncio.Semaphore(large_at_once), large_wait_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = body_limit(self.settings, scope["method"], scope["path"])
        if limit is None:
            return await self.app(scope, receive, send)
        slot = _Slot(self.large, self.large_wait_s)
        try:
            try:
                scope, receive = await self._checked(scope, receive, limit, slot)
            except _Refused as e:
                return await _send_error(send, e.status, e.code, e.detail, e.close, e.retry_after)
            if receive is not None:  # None: the client left
                await self.app(scope, receive, send)
        finally:
            slot.release()

    async def _checked(self, scope, receive, limit: int, slot: _Slot):
        """(scope, receive) for the route: the body checked and replayed, or counted as it streams.
        This frame ends before the route runs, so no copy of the body outlives the route's own."""
        small = self.settings.json_body_limit
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        length = int(length) if length is not None and length.isdigit() else None
        if length is not None and length > limit:
            raise _Refused(
                413, "body_too_large", f"the request body is larger than this route's limit of {limit} bytes"
            )
        if length is not None and length > small:
            await slot.take()
        gzipped = headers.get(b"content-encoding", b"").lower() == b"gzip"
        if not gzipped and _LARGE_RE.match(scope["path"]):
            return scope, _counting(receive, limit, small, slot)
        plain = await _read(receive, limit, small, slot)
        if plain is None:
            return scope, None
        if gzipped:
            plain = await _gunzip(plain, limit, small, slot)
            new_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
            new_headers.append((b"content-length", str(len(plain)).encode()))
            scope = dict(scope, headers=new_headers)
        if not _LARGE_RE.match(scope["path"]):
            try:
                if len(plain) > small:
                    value = await run_in_threadpool(strict.check_body, plain, True)
                else:
                    value = strict.check_body(plain)
            except strict.NotStrictJSON as e:
                raise _Refused(400, e.code, e.detail, close=False) from None
            if value is not strict.NOT_JSON:
                scope = dict(scope, **{"sly.json": value})  # routes that read JSON by hand take it from here
        return scope, _replay(receive, plain)


class _Refused(Exception):
    """The middleware's answer instead of the route's; `close`: the body was left unread."""

    def __init__(self, status: int, code: str, detail: str, close: bool = True, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.close, self.retry_after = status, code, detail, close, retry_after


_BUSY = "the server is reading as many large bodies as it reads at once; try again after Retry-After seconds"


class _Slot:
    """A request's hold on one of its process's large-body slots, taken once the body is known large."""

    def __init__(self, slots: asyncio.Semaphore, wait_s: float):
        self.slots, self.wait_s, self.held = slots, wait_s, False

    async def take(self, close: bool = True) -> None:
        """Wait for a slot, or _Refused 503 `server_busy` after wait_s (`close`: the body is unread)."""
        if not self.held:
            try:
                await asyncio.wait_for(self.slots.acquire(), self.wait_s)
            except TimeoutError:
                raise _Refused(503, "server_busy", _BUSY, close, BUSY_RETRY_AFTER_S) from None
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()


def _replay(receive, body: bytes):
    pending = [body]  # handed over, then dropped: the route's copy is the only one

    async def replay():
        if not pending:
            return await receive()
        return {"type": "http.request", "body": pending.pop(), "more_body": False}

    return replay


async def _read(receive, limit: int, small: int, slot: _Slot) -> bytes | None:
    """The whole body (its chunks joined once), or None: the client left."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "body_too_large", f"the request body is larger than {limit} bytes")
        if chunk:
            chunks.append(chunk)
        if size > small:
            await slot.take()
        if not msg.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _gunzip(packed: bytes, limit: int, small: int, slot: _Slot) -> bytes:
    """`packed` decompressed; a slot is taken before it grows past `small`."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        plain = d.decompress(packed, min(small, limit) + 1)
        if small < len(plain) <= limit:  # so the next max_length is at least 1 (0: no limit)
            await slot.take(close=False)
            plain = b"".join((plain, d.decompress(d.unconsumed_tail, limit + 1 - len(plain))))
    except zlib.error:
        raise _Refused(400, "bad_gzip", "the body is not valid gzip data", close=False) from None
    if len(plain) > limit or d.unconsumed_tail:
        raise _Refused(
            413,
            "body_too_large",
            f"the decompressed body is larger than this route's limit of {limit} bytes",
            close=False,
        )
    return plain


def _counting(receive, limit: int, small: int, slot: _Slot):
    seen = 0

    async def counting_receive():
        nonlocal seen
        msg = await receive()
        if msg["type"] == "http.request":
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            if seen > small:
                try:
                    await slot.take()
                except _Refused as e:
                    raise APIError(503, e.code, e.detail, retry_after=e.retry_after) from None
        return msg

    return counting_receive


async def _send_error(
    send, status: int, code: str, detail: str, close: bool = True, retry_after: int | None = None
) -> None:
    """An error answer from a middleware; `close` when the body was left unread."""
    body = json.dumps(error_body(code, detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
