"""Error bodies (`{"error": code, "detail": sentence}`) and the one APIError both sides raise."""

from __future__ import annotations

import json


class APIError(Exception):
    """A protocol error: an HTTP status, a machine code and a human sentence.

    The server raises it in a handler (it becomes the JSON error answer, `extra` fields added);
    a client raises it for an error answer (`method` and `path` say which call; `status` is None
    when no answer came). Never carries a token: only method, path, status, code and detail.
    """

    def __init__(self, status: int | None, code: str, detail: str, *, method: str = "", path: str = "", **extra):
        self.status, self.code, self.detail = status, code, detail
        self.method, self.path, self.extra = method, path, extra
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status or 'no answer'} {code}: {detail}".strip())


class AuthError(APIError):
    """The token was refused (401)."""


class ConfigError(ValueError):
    """A setting the agent or the server cannot start with (missing or malformed); the message
    names it. The agent exits with EXIT_CONFIG, the server with status 2."""


def error_body(code: str, detail: str, **extra) -> dict:
    return {"error": code, "detail": detail, **extra}


def decode_error(status: int | None, body: bytes | str | None, *, method: str = "", path: str = "") -> APIError:
    """The APIError for an error answer; tolerant of bodies that are not ours (a proxy's HTML page)."""
    code, detail, extra = "http_error", "", {}
    if body:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            code = obj["error"]
            d = obj.get("detail")
            detail = d if isinstance(d, str) else ""
            extra = {k: v for k, v in obj.items() if k not in ("error", "detail")}
        else:
            detail = text[:300]
    if status is None:
        code = "no_answer"
    cls = AuthError if status == 401 else APIError
    return cls(status, code, detail, method=method, path=path, **extra)
