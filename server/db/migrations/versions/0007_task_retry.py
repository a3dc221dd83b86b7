"""A task's retry policy and its place in a resume chain: tasks.retry, tasks.resumed_from and
tasks.continued_by.

`retry` is the policy as stored (`{"max", "agent_ids", "attempt"}`, NULL: none); `resumed_from`
names the lost task a continuation continues, `continued_by` the continuation of a lost task.
`resumed_from` is unique: a lost task is continued at most once, whatever the replicas do.

Revision ID: 0007_task_retry
Revises: 0006_task_artifacts
Create Date: 2026-12-20 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_task_retry"
down_revision: str | Sequence[str] | None = "0006_task_artifacts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as b:
        b.add_column(sa.Column("retry", sa.JSON(), nullable=True))
        b.add_column(sa.Column("resumed_from", sa.Integer(), nullable=True))
        b.add_column(sa.Column("continued_by", sa.Integer(), nullable=True))
        b.create_index("uq_tasks_resumed_from", ["resumed_from"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("tasks") as b:
        b.drop_index("uq_tasks_resumed_from")
        b.drop_column("continued_by")
        b.drop_column("resumed_from")
        b.drop_column("retry")
