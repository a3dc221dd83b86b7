"""One-time console sign-in links: `POST /api/v1/session/links` (admin) makes one, `GET /signin/<token>` spends it.

A link's token is 32 random bytes (URL-safe), lives LINK_TTL_S and works once. It is kept only
as a hash in the `console_sessions` table, next to the session rows, so a link works on every
replica and across a restart with no table of its own. The hash is SHA3-256, not the SHA-256
that session ids use: a session cookie is looked up by sha256(cookie), which can never equal a
link's row, so a link token sent as a cookie is no session. Spending is one DELETE of an unexpired
row: of two requests racing with the same link, exactly one deletes it.
"""
from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import delete, insert

from server import db

LINK_TTL_S = 15 * 60


def _hash(token: str) -> str:
    return hashlib.sha3_256(token.encode()).hexdigest()


def create_link(engine, ttl_s: float = LINK_TTL_S) -> tuple[str, float]:
    """A new one-time token and its expiry (epoch seconds); only its hash is stored."""
    token = secrets.token_urlsafe(32)
    expires = time.time() + ttl_s
    with engine.begin() as conn:
        conn.execute(insert(db.console_sessions).values(id_hash=_hash(token), expires_at=expires))
    return token, expires


def spend_link(engine, token: str) -> bool:
    """True once for a live link; False for an unknown, used or expired one."""
    if not token or len(token) > 128:
        return False
    t = db.console_sessions.c
    with engine.begin() as conn:
        spent = conn.execute(delete(db.console_sessions)
                             .where(t.id_hash == _hash(token), t.expires_at > time.time())).rowcount
    return spent == 1
