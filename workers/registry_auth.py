"""Pull credentials for a task's image: which registry the image is on, and whose login it gets.

Two sources, in this order (the first that names the image's registry wins):
1. the agent's settings DOCKER_REGISTRY / DOCKER_LOGIN / DOCKER_PASSWORD (the Supervisely
   agent's names; comma lists for several registries);
2. the `auths` of the Docker client's config.json (DOCKER_CONFIG, default ~/.docker): what
   `docker login` wrote on the host.
Neither: no credentials (the engine pulls anonymously). The credentials go to the engine in the
pull's X-Registry-Auth header only: never into a log line, an error or a container.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import NamedTuple

from node.config import Config, registry_lists

DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
# What an engine says when a registry wants credentials or refuses the ones it got.
_REFUSED = re.compile(
    r"unauthori[sz]ed|authentication required|no basic auth credentials|denied|forbidden|\b40[13]\b", re.I
)


class Credentials(NamedTuple):
    registry: str
    auth_config: dict  # username/password (or identitytoken), as docker-py's pull takes it
    source: str  # where they come from, for the task log: "DOCKER_LOGIN" or the config file's path

    def __repr__(self) -> str:  # a stray %r must not print the password
        return f"Credentials(registry={self.registry!r}, source={self.source!r})"


def normalize_registry(name: str) -> str:
    """A registry as written in settings or config.json keys -> host[:port], lower case; Docker
    Hub's many spellings (`https://index.docker.io/v1/`, ``) -> docker.io."""
    name = (name or "").strip().lower()
    name = re.sub(r"^[a-z][a-z0-9+.-]*://", "", name).split("/", 1)[0]
    return DOCKER_HUB if not name or name in _HUB_ALIASES else name


def image_registry(image: str) -> str:
    """The registry an image reference names (`127.0.0.1:5000/a/b:1` -> 127.0.0.1:5000;
    `python:3.11`, `supervisely/base` -> docker.io), by the engine's rule: the first path part
    is a registry when it has a `.` or a `:` or is `localhost`."""
    first, sep, _rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return normalize_registry(first)
    return DOCKER_HUB


def docker_config_path(config: Config) -> str:
    base = config.docker_config or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def from_docker_config(path: str, registry: str) -> dict | None:
    """The auth_config that config.json's `auths` holds for `registry`, or None (no file, no
    entry, or an entry kept by a credential helper: the engine's client then looks itself)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if normalize_registry(key) != registry or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return {"identitytoken": str(entry["identitytoken"])}
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            if sep:
                return {"username": user, "password": password}
        if entry.get("username") and entry.get("password"):
            return {"username": str(entry["username"]), "password": str(entry["password"])}
    return None


def credentials_for(image: str, config: Config) -> Credentials | None:
    """The credentials to pull `image` with, or None (anonymous)."""
    registry = image_registry(image)
    for name, login, password in registry_lists(config.docker_registry, config.docker_login, config.docker_password):
        if normalize_registry(name) == registry:
            return Credentials(registry, {"username": login, "password": password}, "DOCKER_LOGIN")
    path = docker_config_path(config)
    auth = from_docker_config(path, registry)
    return Credentials(registry, auth, path) if auth else None


def refused(message: str) -> bool:
    """Does an engine's pull error say the registry wants credentials or refused them?"""
    return bool(_REFUSED.search(message or ""))


def refusal_error(image: str, creds: Credentials | None, detail: str) -> str:
    """The task's error for a pull the registry refused: whose credentials, or that it needs some."""
    registry = creds.registry if creds else image_registry(image)
    if creds is not None:
        why = f"the registry {registry} refused the credentials from {creds.source} (or has no such image)"
    else:
        why = (
            f"the registry {registry} needs credentials (or has no such image): set DOCKER_REGISTRY, "
            f"DOCKER_LOGIN and DOCKER_PASSWORD, or run `docker login {registry}` on the node"
        )
    return f"cannot pull image {image}: {why}; the engine said: {detail}"
