"""`inference`: run the container; after exit 0 upload results/<project name>/ (a Supervisely
project: meta.json, <ds>/img/, <ds>/ann/) as a new project with its meta and annotations.

The real agent starts this upload on the MODEL_APPLIED event; here it starts when the container
has exited (exit 0), so nothing the task still writes after the event is missed."""

from __future__ import annotations

from workers.base import Outcome
from workers.docker_task import run_container_task
from workers.results import upload_project


def project_name(ctx) -> str:
    config = ctx.task.get("config") or {}
    source = (ctx.task.get("project") or {}).get("name")
    return str(
        config.get("project_name")
        or (f"{source} (task {ctx.task_id})" if source else f"task {ctx.task_id} predictions")
    )


def upload(ctx, live) -> None:
    upload_project(ctx, project_name(ctx))


def run(ctx) -> Outcome:
    return run_container_task(ctx, upload)
