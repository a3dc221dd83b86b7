"""Telemetry in a small latest row per node and a compact, downsampled history; log expiry.

`telemetry_latest` (one row per agent: cpu, memory, disks and GPUs summaries, containers count,
free slots) replaces `agents.telemetry` (the agent's whole ~4 KB sample), and
`telemetry_history` (a few numbers per point, every point for an hour, then one a minute)
replaces `telemetry` (every sample whole). The old samples are dropped, not converted: the
latest row refills with each node's next sample, seconds after the server starts, and the
history was an hour of chart data. `agents.telemetry_ts` now holds the time of the agent's
newest history point. `tasks.logs_expired_at` says when the log retention setting deleted a
task's log lines. On SQLite, `agents` and `tasks` become AUTOINCREMENT tables: now that rows are
deleted, a new row must not take the id of a deleted one.

Revision ID: 0005_telemetry
Revises: 0004_log_quota
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_telemetry"
down_revision: str | Sequence[str] | None = "0004_log_quota"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemetry_latest",
        sa.Column("agent_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=True),
        sa.Column("mem", sa.Float(), nullable=True),
        sa.Column("mem_used", sa.BigInteger(), nullable=True),
        sa.Column("mem_total", sa.BigInteger(), nullable=True),
        sa.Column("disks", sa.JSON(), nullable=True),
        sa.Column("gpus", sa.JSON(), nullable=True),
        sa.Column("gpu_count", sa.Integer(), nullable=False),
        sa.Column("containers", sa.Integer(), nullable=True),
        sa.Column("free_slots", sa.Integer(), nullable=True),
        sa.Column("fatal", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("agent_id"),
    )
    op.create_table(
        "telemetry_history",
        sa.Column("agent_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("minute", sa.Boolean(), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=True),
        sa.Column("mem", sa.Float(), nullable=True),
        sa.Column("disks", sa.JSON(), nullable=True),
        sa.Column("gpus", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("agent_id", "ts"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_telemetry_history_ts", "telemetry_history", ["ts"])
    op.drop_index("ix_telemetry_agent_id", table_name="telemetry")
    op.drop_table("telemetry")
    # On SQLite the two tables are rebuilt with AUTOINCREMENT: a deleted row's id is never given
    # again (PostgreSQL's sequences never reuse one anyway).
    autoinc = (
        {"recreate": "always", "table_kwargs": {"sqlite_autoincrement": True}}
        if op.get_bind().dialect.name == "sqlite"
        else {}
    )
    with op.batch_alter_table("agents", **autoinc) as batch:
        batch.drop_column("telemetry")
    op.execute(sa.text("UPDATE agents SET telemetry_ts = NULL"))
    with op.batch_alter_table("tasks", **autoinc) as batch:
        batch.add_column(sa.Column("logs_expired_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("logs_expired_at")
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("telemetry", sa.JSON(), nullable=True))
    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("sample", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_telemetry_agent_id", "telemetry", ["agent_id"])
    op.drop_index("ix_telemetry_history_ts", table_name="telemetry_history")
    op.drop_table("telemetry_history")
    op.drop_table("telemetry_latest")
