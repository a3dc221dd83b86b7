"""The auth dependencies (`require_admin`, `require_agent`; routes declare them as AdminDep and
AgentDep from server/http/deps.py) and the same-origin rule for writes signed in by the console's
cookie (`check_browser_write`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request

from protocol.endpoints import AGENT_TOKEN_HEADER, AUTHORIZATION_HEADER, BEARER
from protocol.errors import APIError
from server.auth.service import SESSION_COOKIE, SignInThrottle, hash_token, verify_admin_token

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def client_of(request: Request) -> str:
    """The key the sign-in throttle counts this request's client under."""
    return SignInThrottle.client_key(request.client.host if request.client else "")


def _origin(url: str) -> str | None:
    """scheme://host:port with the default port spelt out, or None for anything else ('null')."""
    try:
        u = urlsplit(url.strip())
        port = u.port or {"http": 80, "https": 443}.get(u.scheme)
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or port is None:
        return None
    return f"{u.scheme}://{u.hostname.lower()}:{port}"


def check_browser_write(request: Request) -> None:
    """A write authenticated by the session cookie must come from the console's own origin.

    Origin, when sent, must be the request's own scheme://host:port or that of --public-url;
    without Origin only `Sec-Fetch-Site: same-origin` will do. Anything else is a page of another
    origin (a different port of the same host is another origin, though the same site for
    SameSite cookies) submitting a form or a fetch with the user's cookie: 403 cross_origin.
    """
    if request.method not in WRITE_METHODS:
        return
    origin = request.headers.get("origin")
    if origin is None:
        if request.headers.get("sec-fetch-site") == "same-origin":
            return
        raise APIError(
            403,
            "cross_origin",
            "a write signed in by the console's cookie must come from the console's "
            "own pages (no Origin header and no 'Sec-Fetch-Site: same-origin'); scripts send "
            "'Authorization: Bearer <admin token>'",
        )
    allowed = {_origin(str(request.base_url))}
    public = request.app.state.server.settings.public_url
    if public:
        allowed.add(_origin(public))
    got = _origin(origin)
    if got is None or got not in allowed:
        raise APIError(
            403,
            "cross_origin",
            f"a write signed in by the console's cookie must come from the console's "
            f"own origin, not {origin[:200]!r}; scripts send 'Authorization: Bearer <admin token>'",
        )


async def require_admin(request: Request) -> None:
    """Dependency: a Bearer admin token or a valid console session cookie (writes: from the
    console's own origin, else 403), else 401; failed token checks are throttled (429)."""
    state = request.app.state.server
    auth = request.headers.get(AUTHORIZATION_HEADER, "")
    if auth[: len(BEARER)].lower() == BEARER.lower():
        verify_admin_token(state, client_of(request), auth[len(BEARER) :].strip())
        return
    sid = request.cookies.get(SESSION_COOKIE)
    ok = state.sessions.cached(sid)
    if ok is None:
        ok = await state.db.run(state.sessions.valid, sid)
    if ok:
        check_browser_write(request)
        return
    raise APIError(401, "unauthorized", "send 'Authorization: Bearer <admin token>' or sign in to the console")


async def require_agent(request: Request) -> dict:
    """Dependency: the agent row for the `x-token` header (401 otherwise); the request counts as
    the agent's contact (written in the next batch: server/agents/contact.py)."""
    state = request.app.state.server
    token = request.headers.get(AGENT_TOKEN_HEADER, "")
    if not token:
        raise APIError(401, "unauthorized", f"the {AGENT_TOKEN_HEADER} header is missing")
    h = hash_token(token)
    agent = await state.agent_rows.get(h)
    if agent is None:
        raise APIError(401, "unauthorized", "the agent token is wrong or was rotated")
    state.contacts.seen(agent["id"])
    return agent
