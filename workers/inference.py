"""`inference`: run the container; after exit 0 upload results/project/ (`<dataset>/<item>`) as a
new project."""
from __future__ import annotations

from workers.base import Outcome
from workers.docker_task import run_container_task
from workers.errors import TaskError
from workers.results import upload_tree


def upload(ctx) -> None:
    name = (ctx.task.get("config") or {}).get("project_name") or f"task {ctx.task_id} predictions"
    if upload_tree(ctx, ctx.task_dir / "results" / "project", "project", str(name)) is None:
        raise TaskError("inference: the task wrote no project (results/project/ is empty)")


def run(ctx) -> Outcome:
    return run_container_task(ctx, upload)
