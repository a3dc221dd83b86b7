"""The models' request body, and a model's manifest hash."""

from __future__ import annotations

import hashlib

from server.http.fields import SafeName, UserFileRef, UserIn


class ModelIn(UserIn):
    name: SafeName
    files: list[UserFileRef]


def model_hash(files: list[dict]) -> str:
    """sha256 of the manifest: lines '<path> <sha256>\\n' sorted by path."""
    manifest = "".join(f"{f['path']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(manifest.encode()).hexdigest()
