"""Database schema (SQLAlchemy Core) and engine setup. SQLite in WAL mode by default.

The tables here are what the queries use; the database itself is made and changed only by the
migrations in server/db/migrations (server/db/migrate.py runs them at start). A change here goes with
a new revision there, and a test checks that the two agree.
"""

from __future__ import annotations

import json
import time

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    false,
    insert,
)
from sqlalchemy.engine import Engine

from server.http import strict

metadata = MetaData()

agents = Table(
    "agents",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 hex; the token itself is never stored
    Column("allowed_task_types", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float),
    Column("system_info", JSON),  # as the agent last said at connect; rewritten only when it changes
    Column("telemetry_ts", Float),  # the time of its newest telemetry history point (server clock)
    # Shared by every replica (revision 0003): bumped when name or allowed types change, so an
    # open poll on any replica answers at once; why the agent's last poll took no task.
    Column("settings_version", Integer, nullable=False, default=0, server_default="0"),
    Column("refusing", Text),
    sqlite_autoincrement=True,  # ids are never reused: tasks of a deleted node keep naming it alone
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("agent_id", Integer, nullable=False, index=True),
    Column("type", String(32), nullable=False),
    Column("image", String(500)),
    Column("command", JSON),
    Column("config", JSON, nullable=False),
    Column("project_id", Integer),
    Column("model_id", Integer),
    Column("resources", JSON, nullable=False),
    Column("timeout_s", Float),
    Column("state", String(16), nullable=False, index=True),
    Column("progress", JSON),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("stop_requested", Boolean, nullable=False, default=False),
    # A poll answer carried the stop: later polls still list it but do not answer early for it.
    Column("stop_delivered", Boolean, nullable=False, default=False, server_default=false()),
    Column("lease_until", Float),
    Column("timeline", JSON, nullable=False),
    Column("results", JSON, nullable=False),
    Column("log_acked", Integer, nullable=False, default=-1),
    # Bytes of log stored for the task (message + extra fields); the log quota is checked against it.
    Column("log_bytes", BigInteger, nullable=False, default=0, server_default="0"),
    Column("logs_expired_at", Float),  # its log lines were deleted by the retention setting then
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # The retry policy {max, agent_ids, attempt} (NULL: none), and the task's place in its resume
    # chain (server/tasks/lost.py): the lost task it continues, the task that continues it.
    Column("retry", JSON),
    Column("resumed_from", Integer),
    Column("continued_by", Integer),
    # An `app` task's dataset, and what the App set as its output (`api.task.set_output_*`):
    # {"type": "project", "project_id"} | {"type": "file", "team_id", "path"} | {"type": "directory", ...}.
    Column("dataset_id", Integer),
    Column("output", JSON),
    # A lost task is continued at most once, whichever replica noticed the loss.
    Index("uq_tasks_resumed_from", "resumed_from", unique=True),
    sqlite_autoincrement=True,  # ids are never reused: an agent's task dir, its models' task_id
)

# A task's artifacts (results of kind "artifacts"), one row per path: a post upserts its entries,
# whatever the task holds already; the task's `results` keeps only their count and bytes. Stored
# clustered by task and path on SQLite, the order in which they are paged (GET .../artifacts).
task_artifacts = Table(
    "task_artifacts",
    metadata,
    Column("task_id", Integer, primary_key=True, autoincrement=False),
    Column("path", String(1024), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    # Is a replaced blob still named by another of the task's paths (blob_refs.drop_results)?
    Index("ix_task_artifacts_task_id_sha256", "task_id", "sha256"),
    sqlite_with_rowid=False,
)

log_lines = Table(
    "log_lines",
    metadata,
    Column("task_id", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("ts", Float),
    Column("level", String(16)),
    Column("stream", String(16)),
    Column("message", Text),
    Column("extra", Text),  # JSON text of the line's other fields, or NULL
    sqlite_with_rowid=False,
)

task_metrics = Table(
    "task_metrics",
    metadata,
    Column("task_id", Integer, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("type", String(32)),
    Column("epoch", Float),
    Column("metrics", JSON),
)

# A Supervisely project: its meta (classes, tag metas) here, its items in project_items.
projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(500), nullable=False),
    Column("datasets", JSON, nullable=False),  # [{name, items_count}] in order: the listing needs no join
    Column("task_id", Integer),
    Column("created_at", Float, nullable=False),
    Column("meta", JSON, nullable=False),
    # Changes to the meta and the stored annotations (an App's), counted: kept stats see them.
    Column("revision", Integer, nullable=False, server_default="0"),
)

# One row per image: its blob and its annotation (Supervisely JSON). Rows of a project are
# inserted in dataset and item order, so `id` orders them and pages them.
# A project's datasets with their ids (the public API names a dataset by id); the project's
# `datasets` summary repeats the id with the name and count.
datasets = Table(
    "datasets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, nullable=False),
    Column("name", String(500), nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("project_id", "name", name="uq_datasets_project_name"),
    sqlite_autoincrement=True,
)
# The one team and workspace the public API shows (Apps get them as TEAM_ID and WORKSPACE_ID);
# every project is in the workspace, every team file in the team.
DEFAULT_TEAM_ID, DEFAULT_TEAM_NAME = 1, "default"
DEFAULT_WORKSPACE_ID, DEFAULT_WORKSPACE_NAME = 1, "default"
# A team's files (Supervisely "team files"): a path in the team's tree names a stored blob.
team_files = Table(
    "team_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("team_id", Integer, nullable=False),
    Column("path", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("task_id", Integer),  # the App task that wrote it, if one did
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("team_id", "path", name="uq_team_files_team_path"),
    sqlite_autoincrement=True,
)
# The hash of each App task's API token (server/public/auth.py): valid while its task is leased.
app_tokens = Table(
    "app_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("task_id", Integer, nullable=False, index=True),
    Column("created_at", Float, nullable=False),
)
project_items = Table(
    "project_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, nullable=False),
    Column("dataset", String(500), nullable=False),
    Column("name", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("ann", JSON, nullable=False),
    Index("ix_project_items_project_id_dataset", "project_id", "dataset"),
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(500), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("files", JSON, nullable=False),
    Column("task_id", Integer, index=True),
    Column("created_at", Float, nullable=False),
    Column("checkpoint", JSON),  # {epoch?, metrics?, final} when a task posted it as a checkpoint
)

# Console sign-in sessions: only a hash of each cookie value is stored.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False),
)

# Which blob each project item, model file, task result and agent upload names: who may download
# a blob (an agent: those of its leased tasks and its own uploads) and which blobs the collector
# keeps (those of projects, models and results). kind: project | model | result (owner = task id)
# | upload (owner = agent id).
blob_refs = Table(
    "blob_refs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),
    Column("owner_id", Integer, primary_key=True),
    sqlite_with_rowid=False,
)

# The latest telemetry sample of each agent, small: what the nodes list shows (server/telemetry/service.py).
telemetry_latest = Table(
    "telemetry_latest",
    metadata,
    Column("agent_id", Integer, primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False),
    Column("cpu", Float),
    Column("mem", Float),
    Column("mem_used", BigInteger),
    Column("mem_total", BigInteger),
    Column("disks", JSON),  # [{path, used, total, percent}]
    Column("gpus", JSON),  # [{index, name, utilization, memory_used, memory_total}]
    Column("gpu_count", Integer, nullable=False, default=0),
    Column("containers", Integer),
    Column("free_slots", Integer),
    Column("fatal", JSON),  # what the agent reported it gave up on (a helper FATAL), while it says so
)

# Telemetry history per agent for the console's charts: a few numbers per point, every point for
# an hour, then one a minute (`minute`), then dropped (server/telemetry/service.py). Stored clustered by
# agent on SQLite, so one node's chart reads adjacent pages.
telemetry_history = Table(
    "telemetry_history",
    metadata,
    Column("agent_id", Integer, primary_key=True, autoincrement=False),
    Column("ts", Float, primary_key=True),
    Column("minute", Boolean, nullable=False),
    Column("cpu", Float),
    Column("mem", Float),
    Column("disks", JSON),  # [percent per disk], in the order of telemetry_latest.disks
    Column("gpus", JSON),  # [[utilization, memory percent] per GPU]
    Index("ix_telemetry_history_ts", "ts"),
    sqlite_with_rowid=False,
)

# Long-polls open now, one row each, on whichever replica holds them (revision 0003). A replica
# that dies leaves rows behind; `expires_at` (the poll's deadline plus a margin) retires them.
polls = Table(
    "polls",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("agent_id", Integer, nullable=False, index=True),
    Column("replica", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),
)


def _json_out(value) -> str:
    """JSON columns are written by orjson (a non-finite float becomes null: no engine stores NaN in JSON)."""
    return strict.dumps(value)


def _json_in(text: str):
    """Read by orjson; a value written by an older server (NaN in it) by the json module."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """An engine for `url`; SQLite gets WAL, NORMAL sync and a busy timeout.

    `pool_size` connections at most (no overflow): the server's database threads are bounded by
    the same number, so a thread never waits for a connection.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False},
            pool_size=pool_size,
            max_overflow=0,
            json_serializer=_json_out,
            json_deserializer=_json_in,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            # Takes effect only on a new, empty database (before its first table): freed pages can
            # then be returned to the filesystem by `PRAGMA incremental_vacuum` (server/tasks/retention.py).
            cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=5000")
            # No checkpoint at commit: the writer would copy the WAL into the database file and
            # sync it while every other write waits. `checkpoint()` does it from the read thread.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()
    else:
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=60,
            json_serializer=_json_out,
            json_deserializer=_json_in,
        )
        _ping_when_idle(engine)
    return engine


PING_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection at checkout only if it sat unused for PING_IDLE_S or more.

    SQLAlchemy's `pool_pre_ping` pings at every checkout: one more round trip for every request,
    a sixth of a busy server's statements. A connection used a moment ago is very likely alive;
    one that sat idle (a quiet server, a database restarted meanwhile) is pinged, and a dead one
    is replaced before the request sees it. A connection that dies between two busy moments fails
    that one request, and SQLAlchemy then replaces every connection of the pool.
    """

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _used(_dbapi_conn, record):  # a new connection counts as used now
        record.info["sly_used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy):
        if time.monotonic() - record.info.get("sly_used", 0.0) < PING_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as e:  # noqa: BLE001 - any failure: the pool replaces the connection and retries
            raise exc.DisconnectionError(f"pooled connection failed its ping: {e}") from e


def checkpoint(engine: Engine) -> None:
    """SQLite: copy the WAL's committed pages into the database file, without waiting for readers
    or the writer (PASSIVE); what it cannot copy now, a later call does."""
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def insert_ignore(engine: Engine, table: Table):
    """INSERT that skips rows whose key exists (SQLite and PostgreSQL; a plain INSERT elsewhere)."""
    name = engine.dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    elif name == "postgresql":
        # the two dialects' Insert classes differ in type, not in the on_conflict_* API used here
        from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
    else:
        return insert(table)
    return dialect_insert(table).on_conflict_do_nothing()


def upsert(engine: Engine, table: Table, keys: list[str], update: list[str]):
    """INSERT whose rows replace the `update` columns of a row with the same `keys` (SQLite, PostgreSQL)."""
    if engine.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        # the two dialects' Insert classes differ in type, not in the on_conflict_* API used here
        from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
    stmt = dialect_insert(table)
    return stmt.on_conflict_do_update(index_elements=keys, set_={c: stmt.excluded[c] for c in update})
