"""Schema migrations at start: `upgrade(engine)` brings any database to the newest revision.

The revisions live in server/db/migrations (Alembic; docs/database.md says how to add one). A
database made before migrations existed (its tables made by metadata.create_all, no
`alembic_version`) is recognised by its tables, stamped at the first revision and upgraded
from there, its rows kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

# Alembic names each of its built-in plugins at INFO as it imports them: seven lines of noise
# before the server's own at every start. Set before the import below.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import inspect, text  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

log = logging.getLogger("sly-server")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
INITIAL = "0001"
# The tables of revision 0001, i.e. of the pre-migration schema.
INITIAL_TABLES = frozenset(
    {"agents", "tasks", "log_lines", "task_metrics", "projects", "models", "console_sessions", "telemetry"}
)
_PG_LOCK_KEY = 0x736C7961  # any constant: replicas starting together migrate one at a time


class SchemaError(RuntimeError):
    """The database holds something no revision explains (some of the tables, no version)."""


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config(str(MIGRATIONS / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision id."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None, "server/db/migrations holds no revision"
    return rev


def current(conn: Connection) -> str | None:
    """The revision the database is at (None: not under migrations)."""
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to head: create it, adopt a pre-migration one, or apply new revisions."""
    quiet = logging.getLogger("alembic")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)  # one line of our own below says what changed
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        before = current(conn)
        if before is None:
            tables = set(inspect(conn).get_table_names())
            if INITIAL_TABLES <= tables:
                log.warning("database made before migrations: stamping it at revision %s", INITIAL)
                command.stamp(alembic_config(conn), INITIAL)
                before = INITIAL
            elif tables & INITIAL_TABLES:
                raise SchemaError(
                    f"the database has some of the server's tables ({sorted(tables & INITIAL_TABLES)}) "
                    "but no alembic_version; it was not made by this server"
                )
        command.upgrade(alembic_config(conn), "head")
        after = current(conn)
    if after != before:
        log.info("database schema upgraded from %s to %s", before or "nothing", after)
