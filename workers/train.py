"""`train`: run the container; each CHECKPOINT becomes a model while it runs (workers/checkpoints.py);
after exit 0 the task's model is results/model/ when the task wrote one, else the last
checkpoint; neither fails the task."""

from __future__ import annotations

from workers.base import Outcome
from workers.docker_task import run_container_task
from workers.results import finish_train


def upload(ctx, live) -> None:
    finish_train(ctx, live)


def run(ctx) -> Outcome:
    return run_container_task(ctx, upload)
