"""The public API's method table: `@method("images.list")` registers a handler.

A handler is `async def h(call: Call) -> dict | list | Response`: a dict or list is answered as
JSON (200), a Response as it is. `call.body` is the request's JSON object (POST) or its query
parameters (GET); `call.task` the App task the token belongs to (server/public/tokens.py);
`call.state` the ServerState; `call.request` the Starlette request (a multipart body is read from
it). Errors are APIError: the router answers them in the SDK's error shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from protocol.errors import APIError
from server.http.strict import ID_MAX


def is_id(v) -> bool:
    """Whether `v` (a decoded JSON value) is an id: an integer, not a bool, from 0 to ID_MAX."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= ID_MAX


@dataclass
class Call:
    state: Any  # ServerState
    request: Request
    task: dict  # the App task row: id, agent_id, project_id, dataset_id, state
    body: dict

    def int_field(self, name: str, *, required: bool = True, default: int | None = None) -> int | None:
        """A non-negative id-sized integer field of the body (a GET's query string gives text)."""
        v = self.body.get(name)
        if v is None:  # absent, or null: the SDK sends null for a field it leaves to the server
            v = default
        if v is None:
            if required:
                raise APIError(400, "invalid_request", f"{name!r} is required")
            return None
        if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 19:
            v = int(v)
        if not is_id(v):
            raise APIError(400, "invalid_request", f"{name!r} must be an id (an integer from 0 to {ID_MAX})")
        return v


Handler = Callable[[Call], Awaitable[Any]]
METHODS: dict[str, tuple[str, Handler]] = {}  # name -> (HTTP method, handler)


def method(name: str, http: str = "POST"):
    """Register the decorated handler as public API method `name`: `http` is POST (a JSON object
    body, read by the router), GET (query parameters; POST answered too), STREAM (a POST whose
    body, unlimited by the body middleware, the handler streams itself: a multipart upload) or RAW
    (a POST whose JSON body, checked and decoded by the body middleware, is not an object: the
    handler takes it from `request.scope["sly.json"]`)."""

    def register(fn: Handler) -> Handler:
        if name in METHODS:
            raise RuntimeError(f"public API method {name!r} registered twice")
        METHODS[name] = (http, fn)
        return fn

    return register
