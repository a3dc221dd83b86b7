"""What every request body of the server shares: safe names and paths, the user API's strict base
model (`UserIn`: an unknown field is 400 `unknown_field`, a typo such as `projcet_id` is never
dropped), sizes, file references and their check against the blob store. The bodies themselves are
in each feature package's `schemas`. The agent protocol's bodies ignore unknown fields, so an agent
and a server of neighbouring versions still talk. Numbers are bounded by their columns
(server/db/__init__.py: Integer is int4 on PostgreSQL)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from protocol.errors import APIError
from protocol.names import CONTROL_RE
from server.http.strict import INT64_MAX

NAME_MAX = 255  # bytes of one path component (Linux NAME_MAX): an agent makes a directory of it
PATH_MAX = 1024  # bytes of a relative path in a manifest


def _path_problem(p: str, single: bool) -> str | None:
    """Why `p` is not a safe relative name (None when it is)."""
    if not p:
        return "empty"
    if "\\" in p:
        return "backslash"
    if CONTROL_RE.search(p):
        return "a control character"
    if p.startswith("/"):
        return "absolute"
    if single and "/" in p:
        return "contains '/'"
    parts = p.split("/")
    if any(c in ("", ".", "..") for c in parts):
        return "an empty, '.' or '..' component"
    if len(p.encode()) > PATH_MAX or any(len(c.encode()) > NAME_MAX for c in parts):
        return f"over {NAME_MAX} bytes in a component or {PATH_MAX} in all"
    return None


def _safe_name(v: str) -> str:
    why = _path_problem(v, single=True)
    if why:
        raise PydanticCustomError("bad_name", "{name} is not a safe name ({why})", {"name": repr(v[:100]), "why": why})
    return v


def _safe_path(v: str) -> str:
    why = _path_problem(v, single=False)
    if why:
        raise PydanticCustomError(
            "bad_name", "{name} is not a safe relative path ({why})", {"name": repr(v[:100]), "why": why}
        )
    return v


# A project, dataset or model name: one path component (the agent makes a directory of it).
SafeName = Annotated[str, AfterValidator(_safe_name)]
# An item name or a file path: a relative path that stays where it is put.
SafePath = Annotated[str, AfterValidator(_safe_path)]


def plain_name(v: str) -> str:
    if CONTROL_RE.search(v):
        raise PydanticCustomError("bad_name", "{name} holds a control character", {"name": repr(v[:100])})
    return v


# A name shown to people only (an agent's): any text but control characters.
PlainName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(plain_name)]


def check_relpath(p: str, what: str, single: bool = False) -> str:
    """A safe relative path (one component when `single`), else a 400 bad_name naming `what`."""
    why = _path_problem(p, single) if isinstance(p, str) else "not a string"
    if why:
        raise APIError(
            400,
            "bad_name",
            f"{what} {p!r} is not a safe relative name ({why}): no '..', '.', "
            f"empty parts, leading '/', backslash or control characters{', no /' if single else ''}",
        )
    return p


class UserIn(BaseModel):
    """A user-API body: an unknown field is refused (server/http/errors.py answers 400 unknown_field)."""

    model_config = ConfigDict(extra="forbid")


# Sizes are BigInteger columns (project_items.size) or JSON numbers: int64 either way.
Size = Annotated[int, Field(ge=0, le=INT64_MAX)]


class FileRef(BaseModel):
    path: str
    sha256: str
    size: Size


class UserFileRef(FileRef, UserIn):
    pass


def check_files(blobs, refs: list, path_attr: str, what: str) -> None:
    """Safe names, valid sha256s, no duplicate paths, every blob present with the stated size."""
    from server.blobs.store import SHA256_RE

    seen: set[str] = set()
    missing: list[str] = []
    for ref in refs:
        p = getattr(ref, path_attr)
        check_relpath(p, what)
        if p in seen:
            raise APIError(400, "duplicate_path", f"{what} {p!r} appears twice")
        seen.add(p)
        if not SHA256_RE.match(ref.sha256):
            raise APIError(400, "bad_sha256", f"{what} {p!r}: sha256 must be 64 lower-case hex digits")
        size = blobs.size(ref.sha256)
        if size is None:
            missing.append(ref.sha256)
        elif size != ref.size:
            raise APIError(400, "size_mismatch", f"{what} {p!r}: blob {ref.sha256} has {size} bytes, not {ref.size}")
    if missing:
        missing = sorted(set(missing))
        raise APIError(
            400,
            "missing_blobs",
            f"{len(missing)} referenced blob(s) are not uploaded: {', '.join(missing[:10])}",
            missing=missing,
        )
