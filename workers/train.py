"""`train`: run the container; after exit 0 upload results/model/ as a new model."""
from __future__ import annotations

from workers.base import Outcome
from workers.docker_task import run_container_task
from workers.errors import TaskError
from workers.results import upload_tree


def upload(ctx) -> None:
    name = (ctx.task.get("config") or {}).get("model_name") or f"task {ctx.task_id} model"
    if upload_tree(ctx, ctx.task_dir / "results" / "model", "model", str(name)) is None:
        raise TaskError("train: the task wrote no model (results/model/ is empty)")


def run(ctx) -> Outcome:
    return run_container_task(ctx, upload)
