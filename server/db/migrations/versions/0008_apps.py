"""Supervisely Apps: dataset ids, team files, per-task API tokens, a task's dataset and output.

- `datasets`: one row per dataset of a project (id, project_id, name); the existing datasets of
  every project get rows here, in their order, and their id in the project's `datasets` summary.
- `team_files`: a team's file tree (path -> blob), written by Apps through the public API.
- `app_tokens`: the hash of each App task's API token; it is valid while its task is leased.
- `projects.revision`: changes to a project's meta and annotations, counted (its kept stats see them);
- `tasks.dataset_id` (an `app` task's dataset) and `tasks.output` (what the App set with
  `api.task.set_output_*`).

Revision ID: 0008_apps
Revises: 0007_task_retry
Create Date: 2026-12-27 10:00:00
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0008_apps"
down_revision: str | Sequence[str] | None = "0007_task_retry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_projects = sa.table("projects", sa.column("id", sa.Integer), sa.column("datasets", sa.JSON))


def upgrade() -> None:
    datasets = op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("project_id", "name", name="uq_datasets_project_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "team_files",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.Integer()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("team_id", "path", name="uq_team_files_team_path"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "app_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.Integer(), nullable=False, index=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("tasks") as b:
        b.add_column(sa.Column("dataset_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("output", sa.JSON(), nullable=True))
    with op.batch_alter_table("projects") as b:
        b.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))
    if context.is_offline_mode():
        return  # SQL rendered for review: no rows to give ids to
    conn = op.get_bind()
    now = time.time()
    for pid, summary in conn.execute(sa.select(_projects.c.id, _projects.c.datasets)).all():
        out = []
        for d in summary or []:
            did = conn.execute(
                sa.insert(datasets).values(project_id=pid, name=d["name"], created_at=now)
            ).inserted_primary_key[0]
            out.append({**d, "id": did})
        conn.execute(sa.update(_projects).where(_projects.c.id == pid).values(datasets=out))


def downgrade() -> None:
    with op.batch_alter_table("projects") as b:
        b.drop_column("revision")
    with op.batch_alter_table("tasks") as b:
        b.drop_column("output")
        b.drop_column("dataset_id")
    op.drop_table("app_tokens")
    op.drop_table("team_files")
    op.drop_table("datasets")
