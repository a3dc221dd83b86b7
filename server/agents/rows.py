"""The agent rows the server keeps in memory, by token hash: a node's token is looked up once.

Every change of an agent row (rename, allowed types, token rotation, removal) sends the agent's
ROW wake-up once it commits, here and through NOTIFY on every replica, and that drops the row
from every replica's copy (`forget`). A new task or a stop wakes the agent without dropping its
row. `AGENT_CACHE_S` bounds how long a row may be kept if a notification were lost (a replica's
listener reconnecting also drops them all); it is long, since reloading every node's row that
often would be a steady read load of its own (2,000 nodes: 7 reads a second).
"""

from __future__ import annotations

import hmac
import threading
import time

from sqlalchemy import bindparam, select

from server import db

AGENT_CACHE_S = 300.0
_AGENT_BY_HASH = select(db.agents).where(db.agents.c.token_hash == bindparam("h"))


class AgentRows:
    def __init__(self, database):
        self.db = database
        self._rows: dict[str, tuple[dict, float]] = {}  # token hash -> (agent row, kept until)
        self._hash_of: dict[int, str] = {}  # agent id -> its token hash in _rows
        self._lock = threading.Lock()
        self._epoch = 0  # bumped by every forget: a row read before it is not kept

    async def get(self, h: str) -> dict | None:
        """The agent row of token hash `h` (None if no agent has it), from memory when it is there,
        else read on a database thread. The row is shared: callers must not change it."""
        return self.cached(h) or await self.db.run(self.load, h)

    def cached(self, h: str) -> dict | None:
        hit = self._rows.get(h)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def load(self, h: str) -> dict | None:
        """Read the agent of token hash `h` (a database thread) and keep it, unless it changed meanwhile."""
        epoch = self._epoch
        with self.db.reader() as conn:
            row = conn.execute(_AGENT_BY_HASH, {"h": h}).mappings().first()
        if row is None or not hmac.compare_digest(row["token_hash"], h):
            return None
        agent = dict(row)
        with self._lock:
            if self._epoch == epoch:  # no change committed since the read began
                self._rows[h] = (agent, time.monotonic() + AGENT_CACHE_S)
                self._hash_of[agent["id"]] = h
        return agent

    def forget(self, agent_id: int | None) -> None:
        """Agent `agent_id` changed (None: any may have): its row is read afresh next time."""
        with self._lock:
            self._epoch += 1
            if agent_id is None:
                self._rows.clear()
                self._hash_of.clear()
                return
            h = self._hash_of.pop(agent_id, None)
            if h is not None:
                self._rows.pop(h, None)
