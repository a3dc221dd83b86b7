"""One-time console sign-in links: `POST /api/v1/session/links` (admin) makes one, `GET /signin/<token>` spends it.

A link's token is 32 random bytes (URL-safe), lives LINK_TTL_S and works once. It is kept only
as a keyed hash in the `console_sessions` table, next to the session rows, so a link works on every
replica and across a restart with no table of its own. The key is the admin token, as for
sessions, so a link not yet spent dies with the admin token that made it. The hash is
HMAC-SHA3-256, not the HMAC-SHA-256 that session ids use, so a link token sent as a cookie hashes
to no session row. Spending is one DELETE of an unexpired row: of two requests racing with the
same link, exactly one deletes it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from sqlalchemy import delete, insert

from server import db

LINK_TTL_S = 15 * 60


def _hash(key: str, token: str) -> str:
    return hmac.new(key.encode(), token.encode(), hashlib.sha3_256).hexdigest()


def create_link(engine, key: str, ttl_s: float = LINK_TTL_S) -> tuple[str, float]:
    """A new one-time token and its expiry (epoch seconds); only its hash under `key` (the admin
    token) is stored."""
    token = secrets.token_urlsafe(32)
    expires = time.time() + ttl_s
    with engine.begin() as conn:
        conn.execute(insert(db.console_sessions).values(id_hash=_hash(key, token), expires_at=expires))
    return token, expires


def spend_link(engine, key: str, token: str) -> bool:
    """True once for a live link made under `key`; False for an unknown, used or expired one, or
    one made under another admin token."""
    if not token or len(token) > 128:
        return False
    t = db.console_sessions.c
    with engine.begin() as conn:
        spent = conn.execute(delete(db.console_sessions)
                             .where(t.id_hash == _hash(key, token), t.expires_at > time.time())).rowcount
    return spent == 1
