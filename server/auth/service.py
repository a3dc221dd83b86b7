"""Who may call: agent and admin tokens, console sessions, the sign-in throttle, one-time sign-in links.

Agent tokens are 32 letters/digits from `secrets`, stored only as their sha256 and compared in
constant time. The admin token comes from SERVER_ADMIN_TOKEN, else from DATA_DIR/admin_token
(mode 0600, generated and printed once on first start); it must be at least MIN_ADMIN_TOKEN
characters. The web console signs in with the admin token (or a one-time link) and gets an
HttpOnly cookie `sly_session` holding a random session id kept server-side, bound to that admin
token. Failed admin-token checks are slowed down per client address (`SignInThrottle`). The
FastAPI dependencies built on these are in server/auth/deps.py.
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

from sqlalchemy import delete, insert, select

from protocol.backoff import backoff_delay
from protocol.errors import APIError, ConfigError
from server import db

TOKEN_ALPHABET = string.ascii_letters + string.digits
SESSION_COOKIE = "sly_session"
ADMIN_TOKEN_ENV = "SERVER_ADMIN_TOKEN"
MIN_ADMIN_TOKEN = 16  # characters; a shorter admin token is refused at start
LINK_TTL_S = 15 * 60  # a one-time sign-in link works this long


def new_token(n: int = 32) -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(n))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_admin_token_length(token: str, source: str) -> str:
    """The token, or ConfigError naming where it came from when it is shorter than MIN_ADMIN_TOKEN."""
    if len(token) < MIN_ADMIN_TOKEN:
        raise ConfigError(
            f"{source} is {len(token)} characters long; the admin token must have at least "
            f"{MIN_ADMIN_TOKEN} (generate one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
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
    print(
        f"sly-server: generated the admin token (stored in {path}, shown only now): {token}",
        file=sys.stderr,
        flush=True,
    )
    return token


class Sessions:
    """Console sign-in sessions. The database keeps an HMAC of each id keyed with the admin token
    (so the data dir holds no usable cookie) and its expiry; sessions survive a server restart,
    but not a change of the admin token: the same cookie then hashes to a row that is not there."""

    TTL_S = 7 * 24 * 3600

    def __init__(self, engine, admin_token: str):
        self.engine = engine
        self._key = admin_token.encode()
        self._cache: dict[str, float] = {}  # id hash -> expiry, so most checks skip the database

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
        this through `state.db.run`."""
        if not sid:
            return False
        h = self._hash(sid)
        expires = self._cache.get(h)
        if expires is None:
            with self.engine.connect() as conn:
                expires = conn.execute(
                    select(db.console_sessions.c.expires_at).where(db.console_sessions.c.id_hash == h)
                ).scalar()
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
    def client_key(host: str) -> str:
        """The key a client address is counted under: the address, an IPv6 address's /64 (an
        IPv4-mapped one as IPv4)."""
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
            raise APIError(
                429,
                "too_many_attempts",
                f"{entry[0]} wrong admin tokens from this address; try again in {wait} s",
                retry_after=wait,
            )

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


def check_admin_token(state, token: str) -> bool:
    return hmac.compare_digest(token.encode(), state.admin_token.encode())


def verify_admin_token(state, client: str, token: str) -> None:
    """The admin token check behind sign-in and Bearer auth: throttled per `client`
    (`SignInThrottle.client_key`), 401 when wrong."""
    state.signin_throttle.check(client)
    if not check_admin_token(state, token):
        state.signin_throttle.failed(client)
        state.metrics.signin_failures.inc()
        raise APIError(401, "unauthorized", "the admin token is wrong")
    state.signin_throttle.succeeded(client)


# One-time console sign-in links: a link's token is 32 random bytes (URL-safe), lives LINK_TTL_S
# and works once. It is kept only as a keyed hash in the `console_sessions` table, next to the
# session rows, so a link works on every replica and across a restart with no table of its own.
# The key is the admin token, as for sessions, so a link not yet spent dies with the admin token
# that made it. The hash is HMAC-SHA3-256, not the HMAC-SHA-256 that session ids use, so a link
# token sent as a cookie hashes to no session row.


def _link_hash(key: str, token: str) -> str:
    return hmac.new(key.encode(), token.encode(), hashlib.sha3_256).hexdigest()


def create_link(conn, key: str, ttl_s: float = LINK_TTL_S) -> tuple[str, float]:
    """A new one-time token and its expiry (epoch seconds); only its hash under `key` (the admin
    token) is stored."""
    token = secrets.token_urlsafe(32)
    expires = time.time() + ttl_s
    conn.execute(insert(db.console_sessions).values(id_hash=_link_hash(key, token), expires_at=expires))
    return token, expires


def spend_link(conn, key: str, token: str) -> bool:
    """True once for a live link made under `key`; False for an unknown, used or expired one, or
    one made under another admin token. One DELETE of an unexpired row: of two requests racing
    with the same link, exactly one deletes it."""
    if not token or len(token) > 128:
        return False
    t = db.console_sessions.c
    spent = conn.execute(
        delete(db.console_sessions).where(t.id_hash == _link_hash(key, token), t.expires_at > time.time())
    ).rowcount
    return spent == 1
