"""The Docker and disk questions the supervisor asks, behind four functions.

The supervisor reaches them through one name (`docker_engine` in agent/supervisor.py), so
pointing it at another module with the same four functions is a one-line change; tests pass
their own object instead.
"""
from __future__ import annotations

import logging

log = logging.getLogger("agent.supervisor")


def container_running(config, task_id: int) -> bool:
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


def reap_orphans(config, keep_task_ids: list[int]) -> None:
    """Remove labelled containers of tasks the server did not hand back (workers.docker_task)."""
    try:
        from workers.docker_task import reap_orphan_containers
    except Exception:  # noqa: BLE001 - no Docker SDK
        return None
    try:
        reap_orphan_containers(config, keep_task_ids)
    except Exception as e:  # noqa: BLE001
        log.warning("could not reap orphan containers: %s", e)
    return None


def disk_status(config) -> dict:
    """{free_mb, ok, reason}: whether there is room for a new task."""
    from workers import cache
    return cache.disk_status(config)


def free_disk(config) -> dict:
    """Evict least-recently-used cache entries until enough disk is free; a summary ({} if it cannot)."""
    from workers import cache
    try:
        return cache.ensure_space(config)
    except cache.DiskError:
        return {}
