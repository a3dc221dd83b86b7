"""Replicas: the state every server replica shares lives in the database.

`agents.settings_version` and `agents.refusing`, `tasks.stop_delivered`, and `polls` (one row
per open long-poll, with the replica holding it) replace what one process kept in memory.

Revision ID: 0003_replicas
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_replicas"
down_revision: str | Sequence[str] | None = "0002_sly_projects"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as b:
        b.add_column(sa.Column("settings_version", sa.Integer(), nullable=False, server_default="0"))
        b.add_column(sa.Column("refusing", sa.Text(), nullable=True))
    with op.batch_alter_table("tasks") as b:
        b.add_column(sa.Column("stop_delivered", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "polls",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("agent_id", sa.Integer(), nullable=False),
        sa.Column("replica", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_polls_agent_id", "polls", ["agent_id"])


def downgrade() -> None:
    op.drop_index("ix_polls_agent_id", table_name="polls")
    op.drop_table("polls")
    with op.batch_alter_table("tasks") as b:
        b.drop_column("stop_delivered")
    with op.batch_alter_table("agents") as b:
        b.drop_column("refusing")
        b.drop_column("settings_version")
