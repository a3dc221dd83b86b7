"""The database as routes and jobs use it: the engine, and the threads its work runs on.

Database work runs in a bounded pool of threads (`await db.run(fn, ...)`), never on the event
loop, so a big read does not stall other requests (`/healthz` included). The pool has as many
threads as the engine has connections (`--db-pool-size`). On SQLite one more connection and
thread serve the console's big reads only (`run_read`): in WAL mode a read never waits for the
writer, and the writer's queue never waits for it.
"""

from __future__ import annotations

import anyio

from server import db
from server.settings import Settings
from server.wakeups import Wakeups


class Database:
    def __init__(self, settings: Settings):
        sqlite = settings.database_url.startswith("sqlite")
        self.engine = db.make_engine(settings.database_url, pool_size=settings.pool_size + (1 if sqlite else 0))
        # The same pool, each checkout in autocommit: a lone read then costs one round trip, not three
        # (BEGIN, the statement, ROLLBACK on PostgreSQL).
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self.limiter = anyio.CapacityLimiter(settings.pool_size)
        self.read_limiter = anyio.CapacityLimiter(1) if sqlite else self.limiter
        self.wakeups: Wakeups | None = None  # set by ServerState: transactions notify through it

    async def run(self, fn, *args):
        """`fn(*args)` on one of the database threads; the request waits without holding the loop."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run_read(self, fn, *args):
        """`fn(*args)`, which only reads, on the read thread (SQLite) or a database thread (PostgreSQL).
        The nodes list, a node's chart and the task list use it: a console refreshing them does not
        hold up the fleet's writes."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.read_limiter)

    def reader(self):
        """A connection for reads that need no transaction of their own (each statement sees what
        was committed when it ran): no BEGIN and no ROLLBACK around them."""
        return self._autocommit.connect()

    def transaction(self):
        """A write transaction whose `notify_*()` wake-ups fire after it commits (here and on every replica)."""
        return self.wakeups.transaction()
