"""App tokens: the `API_TOKEN` an `app` task's code calls the public API with.

A token is 128 letters and digits (the SDK refuses any other length), minted when its task is
handed to a node (`mint`, in the poll's transaction; a task handed out again gets a new one and
the old one dies), stored only as its sha256 in `app_tokens`, and valid only while its task is
leased (assigned, preparing, running, uploading): it dies with every end state (finished,
failed, stopped, lost) without anything to revoke. It is never a node token (those are 32
characters and live in `agents`), and a node token is never an App token.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, insert, select

from protocol.states import LEASED
from server import db
from server.auth.service import hash_token, new_token

APP_TOKEN_LEN = 128
LEASED_VALUES = tuple(s.value for s in LEASED)


def mint(conn, task_id: int, now: float | None = None) -> str:
    """A new token for task `task_id` (any earlier one of the task is deleted); the token itself,
    which only the poll answer carries."""
    token = new_token(APP_TOKEN_LEN)
    conn.execute(delete(db.app_tokens).where(db.app_tokens.c.task_id == task_id))
    conn.execute(
        insert(db.app_tokens).values(
            token_hash=hash_token(token), task_id=task_id, created_at=time.time() if now is None else now
        )
    )
    return token


def task_of(conn, token: str) -> dict | None:
    """The task row (id, agent_id, project_id, dataset_id, state) a valid App token belongs to, or None
    (unknown, malformed, or its task is not leased any more)."""
    if len(token) != APP_TOKEN_LEN or not token.isascii() or not token.isalnum():
        return None
    a, t = db.app_tokens.c, db.tasks.c
    row = (
        conn.execute(
            select(t.id, t.agent_id, t.project_id, t.dataset_id, t.state)
            .select_from(db.app_tokens.join(db.tasks, t.id == a.task_id))
            .where(a.token_hash == hash_token(token), t.state.in_(LEASED_VALUES))
        )
        .mappings()
        .first()
    )
    return dict(row) if row is not None else None


def drop(conn, task_id: int) -> None:
    """Forget the task's token (its row; the token is dead already once the task left the lease)."""
    conn.execute(delete(db.app_tokens).where(db.app_tokens.c.task_id == task_id))
