"""What the supervisor asks of the workers' side of the node: the one module it imports from `workers`.

Docker questions (is a task's container running? remove the containers of tasks the server did
not hand back) and the cache's disk questions (room for a new task? evict to make room). Light
to import: the docker SDK is loaded on the first Docker question (the supervisor has it preloaded
by `workers.preload()` anyway). No Docker SDK or no engine is an answer, never an exception.
"""

from __future__ import annotations

import logging

from node.config import Config
from workers.cache import DiskError, disk_status, ensure_space

log = logging.getLogger("workers.engine")

__all__ = [
    "DiskError",
    "container_running",
    "disk_status",
    "ensure_space",
    "free_disk",
    "reap_orphans",
    "recorded_gpus",
]


def container_running(config: Config, task_id: int) -> bool:
    """Is this agent's container of the task running? No Docker: no."""
    try:
        from workers.container import docker_client, find_container

        client = docker_client(timeout=5)
        try:
            container = find_container(client, task_id, config.identity)
            return container is not None and container.status == "running"
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - no SDK, no engine, no container
        return False


def reap_orphans(config: Config, keep_task_ids: list[int]) -> None:
    """Remove this agent's labelled containers whose task is not in `keep_task_ids`.

    Returns None: the supervisor runs it as a job, where a returned value is a callback."""
    try:
        from workers.docker_task import reap_orphan_containers

        removed = reap_orphan_containers(config, keep_task_ids)
    except Exception as e:  # noqa: BLE001 - no SDK or no engine: nothing to reap
        log.warning("could not reap orphan containers: %s", e)
        return None
    if removed:
        log.info("removed %d orphan containers: %s", len(removed), ", ".join(removed))
    return None


def free_disk(config: Config) -> dict:
    """Evict least-recently-used cache entries until enough disk is free; a summary ({} if it cannot)."""
    try:
        return ensure_space(config)
    except DiskError:
        return {}


def recorded_gpus(config: Config, task_id: int) -> tuple[int, ...] | None:
    """The host GPU indices a task's container was prepared with (tasks/<id>/agent.json), or None
    when the task was never prepared here (a task that is re-adopted keeps exactly those)."""
    import json

    try:
        gpus = json.loads((config.task_dir(task_id) / "agent.json").read_text())["gpus"]
        return tuple(int(g) for g in gpus)
    except (OSError, ValueError, KeyError, TypeError):
        return None
