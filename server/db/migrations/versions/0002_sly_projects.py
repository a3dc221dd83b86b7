"""Supervisely projects: a project's meta, its items (blob + annotation) in project_items, and
checkpoint models.

Existing projects keep their items: each becomes a project_items row with the empty annotation
of an unknown-size image, the project gets the empty meta, and `projects.datasets` becomes the
summary `[{name, items_count}]`. Existing models are not checkpoints (checkpoint NULL).

Revision ID: 0002_sly_projects
Revises: 0001
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0002_sly_projects"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies (a revision must not change when server code does): protocol.sly_format.empty_meta()
# and empty_ann(None, None).
EMPTY_META = {"classes": [], "tags": [], "projectType": "images"}
EMPTY_ANN = {"description": "", "size": {"height": None, "width": None}, "tags": [], "objects": [], "customBigData": {}}


def upgrade() -> None:
    op.create_table(
        "project_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(500), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("ann", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_project_items_project_id_dataset", "project_items", ["project_id", "dataset"])
    with op.batch_alter_table("projects") as batch:
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("checkpoint", sa.JSON(), nullable=True))
        batch.create_index("ix_models_task_id", ["task_id"])

    projects = sa.table(
        "projects", sa.column("id", sa.Integer), sa.column("datasets", sa.JSON), sa.column("meta", sa.JSON)
    )
    items = sa.table(
        "project_items",
        sa.column("project_id", sa.Integer),
        sa.column("dataset", sa.String),
        sa.column("name", sa.String),
        sa.column("sha256", sa.String),
        sa.column("size", sa.BigInteger),
        sa.column("ann", sa.JSON),
    )
    if context.is_offline_mode():
        # SQL output cannot read rows: the meta is filled; moving the items of existing projects
        # into project_items needs an online upgrade (the server runs one at start).
        op.execute(projects.update().values(meta=op.inline_literal(json.dumps(EMPTY_META))))
    else:
        conn = op.get_bind()
        for pid, datasets in conn.execute(sa.select(projects.c.id, projects.c.datasets).order_by(projects.c.id)).all():
            rows, summary = [], []
            for ds in datasets or []:
                ds_items = ds.get("items") or []
                summary.append({"name": ds["name"], "items_count": len(ds_items)})
                rows += [
                    {
                        "project_id": pid,
                        "dataset": ds["name"],
                        "name": it["name"],
                        "sha256": it["sha256"],
                        "size": it["size"],
                        "ann": EMPTY_ANN,
                    }
                    for it in ds_items
                ]
            if rows:
                conn.execute(items.insert(), rows)
            conn.execute(projects.update().where(projects.c.id == pid).values(datasets=summary, meta=EMPTY_META))
    with op.batch_alter_table("projects") as batch:
        batch.alter_column("meta", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    """Back to 0001: items go back into projects.datasets; annotations, metas and checkpoint data are lost."""
    conn = op.get_bind()
    projects = sa.table("projects", sa.column("id", sa.Integer), sa.column("datasets", sa.JSON))
    items = sa.table(
        "project_items",
        sa.column("id", sa.Integer),
        sa.column("project_id", sa.Integer),
        sa.column("dataset", sa.String),
        sa.column("name", sa.String),
        sa.column("sha256", sa.String),
        sa.column("size", sa.BigInteger),
    )
    for pid, datasets in conn.execute(sa.select(projects.c.id, projects.c.datasets)).all():
        by_ds: dict[str, list] = {d["name"]: [] for d in datasets or []}
        for ds, name, sha, size in conn.execute(
            sa.select(items.c.dataset, items.c.name, items.c.sha256, items.c.size)
            .where(items.c.project_id == pid)
            .order_by(items.c.id)
        ).all():
            by_ds.setdefault(ds, []).append({"name": name, "sha256": sha, "size": size})
        conn.execute(
            projects.update()
            .where(projects.c.id == pid)
            .values(datasets=[{"name": k, "items": v} for k, v in by_ds.items()])
        )
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_task_id")
        batch.drop_column("checkpoint")
    with op.batch_alter_table("projects") as batch:
        batch.drop_column("meta")
    op.drop_index("ix_project_items_project_id_dataset", table_name="project_items")
    op.drop_table("project_items")
