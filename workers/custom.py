"""`custom`: run the container; after exit 0 upload everything under results/ as artifacts."""

from __future__ import annotations

from workers.base import Outcome
from workers.docker_task import run_container_task
from workers.results import upload_artifacts


def upload(ctx, live) -> None:
    upload_artifacts(ctx, f"task {ctx.task_id} results", live)


def run(ctx) -> Outcome:
    return run_container_task(ctx, upload)
