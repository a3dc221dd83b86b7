"""A task's image on this node, as PULL_POLICY wants it (if-not-present, always, never)."""

from __future__ import annotations

import time

import docker

from workers.errors import TaskError

PULL_LOG_EVERY_S = 1.0


def ensure_image(client, image: str, policy: str, log) -> None:
    """Apply the pull policy (if-not-present, always, never); pull progress goes to `log`."""
    if not image:
        raise TaskError("the task has no image")
    present = True
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        present = False
    except docker.errors.APIError as e:
        raise TaskError(f"image {image}: {e.explanation or e}") from None
    if policy == "never" or (policy == "if-not-present" and present):
        if not present:
            raise TaskError(f"image {image} is not on this node and PULL_POLICY=never forbids pulling it")
        return
    repo, tag = _split_image(image)
    log(f"pulling image {image}")
    last = 0.0
    try:
        for ev in client.api.pull(repo, tag=tag, stream=True, decode=True):
            if "error" in ev:
                raise TaskError(f"cannot pull image {image}: {ev['error']}")
            now = time.monotonic()
            if now - last >= PULL_LOG_EVERY_S:
                last = now
                log(f"pull {image}: {ev.get('id', '')} {ev.get('status', '')} {ev.get('progress', '')}".rstrip())
    except docker.errors.APIError as e:
        if policy == "always" and present:
            log(f"pull of {image} failed ({e.explanation or e}); using the local image", level="warning")
            return
        raise TaskError(f"cannot pull image {image}: {e.explanation or e}") from None
    log(f"pulled image {image}")


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        return image, None
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"
