"""A task's artifacts as rows of `task_artifacts`, and the task's result totals.

The artifacts were a list inside `tasks.results`, rewritten whole by every post: a post cost
O(artifacts so far) and every task listing carried them all. Each entry of an existing task's
`results.artifacts` becomes a row; `results` keeps `artifacts_count` and `artifacts_bytes`, and
`result_files` and `result_bytes`: the files and bytes of everything the task's results name
(its models' files, its projects' items, its artifacts), which the per-task results limits are
checked against.

Revision ID: 0006_task_artifacts
Revises: 0005_telemetry
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0006_task_artifacts"
down_revision: str | Sequence[str] | None = "0005_telemetry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_tasks = sa.table("tasks", sa.column("id", sa.Integer), sa.column("results", sa.JSON))
_arts = sa.table(
    "task_artifacts",
    sa.column("task_id", sa.Integer),
    sa.column("path", sa.String),
    sa.column("sha256", sa.String),
    sa.column("size", sa.BigInteger),
)
_models = sa.table("models", sa.column("task_id", sa.Integer), sa.column("files", sa.JSON))
_projects = sa.table("projects", sa.column("id", sa.Integer), sa.column("task_id", sa.Integer))
_items = sa.table("project_items", sa.column("project_id", sa.Integer), sa.column("size", sa.BigInteger))
SUMMARY = ("artifacts_count", "artifacts_bytes", "result_files", "result_bytes")


def upgrade() -> None:
    op.create_table(
        "task_artifacts",
        sa.Column("task_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task_id", "path"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_task_artifacts_task_id_sha256", "task_artifacts", ["task_id", "sha256"])
    if context.is_offline_mode():
        return  # SQL output cannot read rows: moving existing artifacts needs an online upgrade (the server's)
    conn = op.get_bind()
    # One task at a time: a task's results may hold tens of thousands of artifacts.
    for tid in conn.execute(sa.select(_tasks.c.id).order_by(_tasks.c.id)).scalars().all():
        results = dict(conn.execute(sa.select(_tasks.c.results).where(_tasks.c.id == tid)).scalar() or {})
        by_path = {a["path"]: a for a in results.pop("artifacts", None) or []}  # a later entry replaced an earlier
        rows = [{"task_id": tid, "path": p, "sha256": a["sha256"], "size": int(a["size"])} for p, a in by_path.items()]
        if rows:
            conn.execute(_arts.insert(), rows)
        files, size = len(rows), sum(r["size"] for r in rows)
        results.update(artifacts_count=files, artifacts_bytes=size)
        for mfiles in conn.execute(sa.select(_models.c.files).where(_models.c.task_id == tid)).scalars():
            files += len(mfiles or [])
            size += sum(int(f["size"]) for f in mfiles or [])
        n, b = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(_items.c.size), 0))
            .select_from(_items.join(_projects, _projects.c.id == _items.c.project_id))
            .where(_projects.c.task_id == tid)
        ).one()
        results.update(result_files=files + n, result_bytes=size + int(b))
        conn.execute(_tasks.update().where(_tasks.c.id == tid).values(results=results))


def downgrade() -> None:
    """Back to 0005: the rows go back into each task's `results.artifacts`; the totals go."""
    conn = op.get_bind()
    for tid in conn.execute(sa.select(_tasks.c.id).order_by(_tasks.c.id)).scalars().all():
        results = dict(conn.execute(sa.select(_tasks.c.results).where(_tasks.c.id == tid)).scalar() or {})
        for k in SUMMARY:
            results.pop(k, None)
        results["artifacts"] = [
            {"path": p, "sha256": h, "size": s}
            for p, h, s in conn.execute(
                sa.select(_arts.c.path, _arts.c.sha256, _arts.c.size)
                .where(_arts.c.task_id == tid)
                .order_by(_arts.c.path)
            )
        ]
        conn.execute(_tasks.update().where(_tasks.c.id == tid).values(results=results))
    op.drop_index("ix_task_artifacts_task_id_sha256", table_name="task_artifacts")
    op.drop_table("task_artifacts")
