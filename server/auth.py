"""Tokens and the two auth dependencies: `require_admin` (user API) and `require_agent` (agent API).

Agent tokens are 32 letters/digits from `secrets`, stored only as their sha256 and compared in
constant time. The admin token comes from SERVER_ADMIN_TOKEN, else from DATA_DIR/admin_token
(mode 0600, generated and printed once on first start). The web console signs in with the admin
token and gets an HttpOnly cookie `sly_session` holding a random session id kept server-side.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import string
import sys
import time
from pathlib import Path

from fastapi import Request
from sqlalchemy import delete, insert, select

from protocol.endpoints import AGENT_TOKEN_HEADER, AUTHORIZATION_HEADER, BEARER
from protocol.errors import APIError
from server import db

TOKEN_ALPHABET = string.ascii_letters + string.digits
SESSION_COOKIE = "sly_session"


def new_token(n: int = 32) -> str:
    return "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(n))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_admin_token(data_dir: Path, environ=os.environ) -> str:
    """SERVER_ADMIN_TOKEN, or the token in DATA_DIR/admin_token (generated and printed once)."""
    env = environ.get("SERVER_ADMIN_TOKEN", "").strip()
    if env:
        return env
    path = Path(data_dir) / "admin_token"
    if path.exists():
        return path.read_text().strip()
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"sly-server: generated the admin token (stored in {path}, shown only now): {token}", file=sys.stderr, flush=True)
    return token


class Sessions:
    """Console sign-in sessions. The database keeps a sha256 of each id (so the data dir holds no
    usable cookie) and its expiry; sessions survive a server restart."""

    TTL_S = 7 * 24 * 3600

    def __init__(self, engine):
        self.engine = engine
        self._cache: dict[str, float] = {}     # id hash -> expiry, so most checks skip the database

    @staticmethod
    def _hash(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def create(self) -> str:
        sid = secrets.token_urlsafe(32)
        h, expires = self._hash(sid), time.time() + self.TTL_S
        with self.engine.begin() as conn:
            conn.execute(delete(db.console_sessions).where(db.console_sessions.c.expires_at < time.time()))
            conn.execute(insert(db.console_sessions).values(id_hash=h, expires_at=expires))
        self._cache[h] = expires
        return sid

    def valid(self, sid: str | None) -> bool:
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


def check_admin_token(core, token: str) -> bool:
    return hmac.compare_digest(token.encode(), core.admin_token.encode())


async def require_admin(request: Request) -> None:
    """Dependency: a Bearer admin token or a valid console session cookie, else 401."""
    core = request.app.state.core
    auth = request.headers.get(AUTHORIZATION_HEADER, "")
    if auth[:len(BEARER)].lower() == BEARER.lower():
        if check_admin_token(core, auth[len(BEARER):].strip()):
            return
        raise APIError(401, "unauthorized", "the admin token is wrong")
    if core.sessions.valid(request.cookies.get(SESSION_COOKIE)):
        return
    raise APIError(401, "unauthorized", "send 'Authorization: Bearer <admin token>' or sign in to the console")


async def require_agent(request: Request) -> dict:
    """Dependency: the agent row for the `x-token` header (401 otherwise); renews the agent's leases."""
    core = request.app.state.core
    token = request.headers.get(AGENT_TOKEN_HEADER, "")
    if not token:
        raise APIError(401, "unauthorized", f"the {AGENT_TOKEN_HEADER} header is missing")
    agent = await core.run(core.agent_by_token, token, True)
    if agent is None:
        raise APIError(401, "unauthorized", "the agent token is wrong or was rotated")
    return agent
