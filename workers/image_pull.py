"""A task's image on this node, as PULL_POLICY wants it (if-not-present, always, never), pulled
with the credentials workers/registry_auth.py chooses for its registry."""

from __future__ import annotations

import time

import docker

from workers.errors import TaskError
from workers.registry_auth import credentials_for, refusal_error, refused

PULL_LOG_EVERY_S = 1.0


def ensure_image(client, image: str, policy: str, log, config=None) -> dict | None:
    """Apply the pull policy (if-not-present, always, never); pull progress goes to `log`.
    Returns the image's `Config` (Cmd, Entrypoint, ...) as the engine inspects it, or None when
    it cannot be read. `config`: the agent's settings, for pull credentials (None: anonymous)."""
    if not image:
        raise TaskError("the task has no image")
    found = _inspect(client, image)
    if policy == "never" or (policy == "if-not-present" and found is not None):
        if found is None:
            raise TaskError(f"image {image} is not on this node and PULL_POLICY=never forbids pulling it")
        return _config_of(found)
    if not _pull(client, image, found is not None and policy == "always", log, config):
        return _config_of(found)  # `always` fell back to the local copy
    pulled = _inspect(client, image)
    return _config_of(pulled) if pulled is not None else None


def _inspect(client, image: str):
    try:
        return client.images.get(image)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as e:
        raise TaskError(f"image {image}: {e.explanation or e}") from None


def _config_of(img) -> dict:
    return (img.attrs or {}).get("Config") or {}


def _pull(client, image: str, have_local: bool, log, config) -> bool:
    """Pull `image`; False when it failed but a local copy is used instead (`always`)."""
    repo, tag = _split_image(image)
    creds = credentials_for(image, config) if config is not None else None
    log(f"pulling image {image}" + (f" (credentials for {creds.registry} from {creds.source})" if creds else ""))
    last = 0.0
    try:
        stream = client.api.pull(
            repo, tag=tag, stream=True, decode=True, auth_config=creds.auth_config if creds else None
        )
        for ev in stream:
            if "error" in ev:
                raise TaskError(_pull_error(image, creds, str(ev["error"])))
            now = time.monotonic()
            if now - last >= PULL_LOG_EVERY_S:
                last = now
                log(f"pull {image}: {ev.get('id', '')} {ev.get('status', '')} {ev.get('progress', '')}".rstrip())
    except docker.errors.APIError as e:
        detail = str(e.explanation or e)
        if have_local:
            log(f"pull of {image} failed ({detail}); using the local image", level="warning")
            return False
        raise TaskError(_pull_error(image, creds, detail)) from None
    log(f"pulled image {image}")
    return True


def _pull_error(image: str, creds, detail: str) -> str:
    if refused(detail):
        return refusal_error(image, creds, detail)
    return f"cannot pull image {image}: {detail}"


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        return image, None
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"
