"""A task's container through the docker SDK: create and start it, find it again, stop, kill, remove.

What it is created with is workers/container_spec.py's; its image, workers/image_pull.py's; its
output, workers/log_pump.py's.
"""

from __future__ import annotations

import docker

from workers.container_spec import LABEL_AGENT, LABEL_ROLE, LABEL_TASK, create_kwargs
from workers.errors import TaskError


def docker_client(timeout: float = 120):
    return docker.from_env(timeout=timeout)


def _create(client, kw: dict):
    """containers.create without its follow-up inspect (one round trip less on every pickup)."""
    from docker.models.containers import _create_container_args

    args = _create_container_args(dict(kw, detach=True, version=client.api._version))
    answer = client.api.create_container(**args)
    return client.containers.prepare_model(
        {
            "Id": answer["Id"],
            "Name": "/" + kw["name"],
            "Config": {"Labels": kw["labels"]},
            "State": {"Status": "created"},
        }
    )


def spawn_container(client, ctx, image_config: dict | None = None, extra: dict | None = None):
    """Create and start the task's container. `image_config`: the image's inspected `Config` (a
    custom task's default entry point depends on it); `extra`: create_kwargs()'s."""
    return start_container(client, ctx, create_kwargs(ctx, image_config, extra))


def start_container(client, ctx, kw: dict):
    """Create a container of the task from its create kwargs and start it (the task's own, or one
    beside it). A stale one of ours with the same name is removed first; where another agent on
    this engine (another server's task with the same id) holds the name, ours gets the name with
    this agent's identity appended instead."""
    kw = dict(kw)
    kw.pop("detach", None)
    wanted = kw["name"]
    try:
        for name in (wanted, f"{wanted}_{ctx.config.identity[:8]}"):
            kw["name"] = name
            try:
                container = _create(client, kw)
                break
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise
                stale = client.containers.get(name)
                if stale.labels.get(LABEL_AGENT) == kw["labels"][LABEL_AGENT]:
                    stale.remove(force=True)  # ours, from an attempt that did not get to run it
                    container = _create(client, kw)
                    break
        else:
            raise TaskError(f"containers named {wanted} of other agents exist on this host")
    except docker.errors.ImageNotFound:
        raise TaskError(f"image {kw['image']} is not on this node") from None
    except docker.errors.APIError as e:
        raise TaskError(f"cannot create the container: {e.explanation or e}") from None
    try:
        container.start()
    except docker.errors.APIError as e:
        container.remove(force=True)
        raise TaskError(f"cannot start the container: {e.explanation or e}") from None
    return container


def find_container(client, task_id: int, identity: str, role: str | None = None):
    """This agent's container of the task (found by labels, whatever its name), or None. `role`:
    the one beside it with that LABEL_ROLE (an App's API relay) instead of the task's own."""
    found = client.containers.list(
        all=True, filters={"label": [f"{LABEL_AGENT}={identity}", f"{LABEL_TASK}={task_id}"]}
    )
    return next((c for c in found if c.labels.get(LABEL_ROLE) == role), None)


def stop_container(container, grace_s: float) -> None:
    """SIGTERM, `grace_s`, SIGKILL (the engine does the escalation)."""
    try:
        container.stop(timeout=max(0, int(round(grace_s))))
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError:
        kill_container(container)


def kill_container(container) -> None:
    try:
        container.kill()
    except (docker.errors.NotFound, docker.errors.APIError):
        pass


def remove_container(container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if "already in progress" not in str(e):
            raise
