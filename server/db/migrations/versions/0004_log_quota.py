"""Log quota and blob references: tasks.log_bytes (filled from the lines stored) and the
blob_refs table.

Revision ID: 0004_log_quota
Revises: 0003_replicas
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_log_quota"
down_revision: str | Sequence[str] | None = "0003_replicas"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("log_bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_table(
        "blob_refs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "kind", "owner_id"),
        sqlite_with_rowid=False,
    )
    # The bytes of log already stored (characters: close enough for the quota). The blob_refs of
    # projects, models and results already stored are filled by the server at start
    # (server.blobs.refs.fill_if_empty), which reads their JSON the same way on every database.
    op.execute(
        "UPDATE tasks SET log_bytes = (SELECT COALESCE(SUM(LENGTH(message) + COALESCE(LENGTH(extra), 0)), 0) "
        "FROM log_lines WHERE log_lines.task_id = tasks.id)"
    )


def downgrade() -> None:
    op.drop_table("blob_refs")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("log_bytes")
