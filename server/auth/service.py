"""Tokens and the two auth dependencies: `require_admin` (user API) and `require_agent` (agent API).

Agent tokens are 32 letters/digits from `secrets`, stored only as their sha256 and compared in
constant time. The admin token comes from SERVER_ADMIN_TOKEN, else from DATA_DIR/admin_token
(mode 0600, generated and printed once on first start); it must be at least MIN_ADMIN_TOKEN
characters. The web console signs in with the admin token and gets an HttpOnly cookie
`sly_session` holding a random session id kept server-side, bound to that admin token. A write
authenticated by the cookie must come from the console's own origin (`check_browser_write`), and
failed admin-token checks are slowed down per client address (`SignInThrottle`).
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import delete, insert, select

from protocol.backoff import backoff_delay
from protocol.endpoints import AGENT_TOKEN_HEADER, AUTHORIZATION_HEADER, BEARER
from protocol.errors import APIError
from server import db

TOKEN_ALPHABET = string.ascii_letters + string.digits
SESSION_COOKIE = "sly_session"
ADMIN_TOKEN_ENV = "SERVER_ADMIN_TOKEN"
MIN_ADMIN_TOKEN = 16          # characters; a shorter admin token is refused at start
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ConfigError(ValueError):
    """A setting the server cannot start with; the message names it."""


def new_token(n: int = 32) -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(n))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_admin_token_length(token: str, source: str) -> str:
    """The token, or ConfigError naming where it came from when it is shorter than MIN_ADMIN_TOKEN."""
    if len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(f"{source} is {len(token)} characters long; the admin token must have at least "
                          f"{MIN_ADMIN_TOKEN} (generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def load_admin_token(data_dir: Path, environ=os.environ) -> str:
    """SERVER_ADMIN_TOKEN, or the token in DATA_DIR/admin_token (generated and printed once).
    ConfigError when the token found is shorter than MIN_ADMIN_TOKEN."""
    env = environ.get(ADMIN_TOKEN_ENV, "").strip()
    if env:
        return check_admin_token_length(env, ADMIN_TOKEN_ENV)
    path = Path(data_dir) / "admin_token"
    if path.exists():
        return check_admin_token_length(path.read_text().strip(), f"the admin token in {path}")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"sly-server: generated the admin token (stored in {path}, shown only now): {token}", file=sys.stderr, flush=True)
    return token


class Sessions:
    """Console sign-in sessions. The database keeps an HMAC of each id keyed with the admin token
    (so the data dir holds no usable cookie) and its expiry; sessions survive a server restart,
    but not a change of the admin token: the same cookie then hashes to a row that is not there."""

    TTL_S = 7 * 24 * 3600

    def __init__(self, engine, admin_token: str):
        self.engine = engine
        self._key = admin_token.encode()
        self._cache: dict[str, float] = {}     # id hash -> expiry, so most checks skip the database

    def _hash(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()

    def create(self) -> str:
        sid = secrets.token_urlsafe(32)
        h, expires = self._hash(sid), time.time() + self.TTL_S
        with self.engine.begin() as conn:
            conn.execute(delete(db.console_sessions).where(db.console_sessions.c.expires_at < time.time()))
            conn.execute(insert(db.console_sessions).values(id_hash=h, expires_at=expires))
        self._cache[h] = expires
        return sid

    def cached(self, sid: str | None) -> bool | None:
        """`valid(sid)` when it needs no database (no cookie, or a session seen before), else None."""
        if not sid:
            return False
        expires = self._cache.get(self._hash(sid))
        return None if expires is None else expires > time.time()

    def valid(self, sid: str | None) -> bool:
        """Blocking on a cache miss (a database read): from async code, `cached()` first, then
        this through `core.run`."""
        if not sid:
            return False
        h = self._hash(sid)
        expires = self._cache.get(h)
        if expires is None:
            with self.engine.connect() as conn:
                expires = conn.execute(select(db.console_sessions.c.expires_at)
                                       .where(db.console_sessions.c.id_hash == h)).scalar()
            if expires is None:
                return False
            self._cache[h] = expires
        return expires > time.time()

    def drop(self, sid: str | None) -> None:
        if not sid:
            return
        h = self._hash(sid)
        self._cache.pop(h, None)
        with self.engine.begin() as conn:
            conn.execute(delete(db.console_sessions).where(db.console_sessions.c.id_hash == h))


class SignInThrottle:
    """Failed admin-token checks per client address (an IPv6 address counts by its /64).

    The first FREE failures cost nothing; from then on the client must wait BASE_S, doubling per
    further failure up to CAP_S, before its next try, which until then is answered 429 with
    Retry-After without looking at the token (so guessing during the wait learns nothing). A
    success or QUIET_S without a failure forgets the client; at most MAX_CLIENTS are remembered
    (the longest quiet ones are forgotten first), so memory stays bounded.
    """

    FREE = 5
    BASE_S = 1.0
    CAP_S = 300.0
    QUIET_S = 900.0
    MAX_CLIENTS = 10_000

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        # client -> [failures, blocked until, last failure]; oldest failure first
        self._clients: collections.OrderedDict[str, list] = collections.OrderedDict()

    @staticmethod
    def client_of(request: Request) -> str:
        host = request.client.host if request.client else ""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host
        if ip.version == 6:
            if ip.ipv4_mapped:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def check(self, client: str) -> None:
        """429 too_many_attempts while the client must wait."""
        entry = self._clients.get(client)
        if entry is None:
            return
        now = self.clock()
        if now - entry[2] > self.QUIET_S:
            del self._clients[client]
            return
        if now < entry[1]:
            wait = math.ceil(entry[1] - now)
            raise APIError(429, "too_many_attempts", f"{entry[0]} wrong admin tokens from this address; "
                           f"try again in {wait} s", retry_after=wait)

    def failed(self, client: str) -> None:
        now = self.clock()
        entry = self._clients.pop(client, None) or [0, 0.0, now]
        entry[0] += 1
        entry[2] = now
        if entry[0] >= self.FREE:
            entry[1] = now + backoff_delay(entry[0] - self.FREE + 1, self.BASE_S, self.CAP_S, rng=lambda _a, _b: 1.0)
        self._clients[client] = entry
        while len(self._clients) > self.MAX_CLIENTS:
            self._clients.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)


def check_admin_token(core, token: str) -> bool:
    return hmac.compare_digest(token.encode(), core.admin_token.encode())


def verify_admin_token(core, request: Request, token: str) -> None:
    """The admin token check behind sign-in and Bearer auth: throttled per client, 401 when wrong."""
    client = core.signin_throttle.client_of(request)
    core.signin_throttle.check(client)
    if not check_admin_token(core, token):
        core.signin_throttle.failed(client)
        core.m_signin_failures.inc()
        raise APIError(401, "unauthorized", "the admin token is wrong")
    core.signin_throttle.succeeded(client)


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
        raise APIError(403, "cross_origin", "a write signed in by the console's cookie must come from the console's "
                       "own pages (no Origin header and no 'Sec-Fetch-Site: same-origin'); scripts send "
                       "'Authorization: Bearer <admin token>'")
    allowed = {_origin(str(request.base_url))}
    public = request.app.state.core.settings.public_url
    if public:
        allowed.add(_origin(public))
    got = _origin(origin)
    if got is None or got not in allowed:
        raise APIError(403, "cross_origin", f"a write signed in by the console's cookie must come from the console's "
                       f"own origin, not {origin[:200]!r}; scripts send 'Authorization: Bearer <admin token>'")


async def require_admin(request: Request) -> None:
    """Dependency: a Bearer admin token or a valid console session cookie (writes: from the
    console's own origin, else 403), else 401; failed token checks are throttled (429)."""
    core = request.app.state.core
    auth = request.headers.get(AUTHORIZATION_HEADER, "")
    if auth[:len(BEARER)].lower() == BEARER.lower():
        verify_admin_token(core, request, auth[len(BEARER):].strip())
        return
    sid = request.cookies.get(SESSION_COOKIE)
    ok = core.sessions.cached(sid)
    if ok is None:
        ok = await core.run(core.sessions.valid, sid)
    if ok:
        check_browser_write(request)
        return
    raise APIError(401, "unauthorized", "send 'Authorization: Bearer <admin token>' or sign in to the console")


async def require_agent(request: Request) -> dict:
    """Dependency: the agent row for the `x-token` header (401 otherwise); the request counts as
    the agent's contact (written in the next batch: server/agents/contact.py)."""
    core = request.app.state.core
    token = request.headers.get(AGENT_TOKEN_HEADER, "")
    if not token:
        raise APIError(401, "unauthorized", f"the {AGENT_TOKEN_HEADER} header is missing")
    h = hash_token(token)
    agent = await core.agent_of(h)
    if agent is None:
        raise APIError(401, "unauthorized", "the agent token is wrong or was rotated")
    core.contacts.seen(agent["id"])
    return agent
