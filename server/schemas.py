"""Request bodies of protocol v1 (pydantic) and the checks on names, blob references and manifests.

The user API's bodies (`UserIn`) refuse a field they do not know (400 `unknown_field`): a typo such
as `projcet_id` would otherwise be dropped and the task run without it. The agent protocol's
bodies ignore unknown fields, so an agent and a server of neighbouring versions still talk.
Numbers are bounded by what their column holds (server/db/__init__.py: Integer is int4 on PostgreSQL).
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from protocol.errors import APIError
from protocol.names import CONTROL_RE
from server.http.strict import ID_MAX, INT64_MAX

MEMORY_RE = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")


NAME_MAX = 255  # bytes of one path component (Linux NAME_MAX): an agent makes a directory of it
PATH_MAX = 1024  # bytes of a relative path in a manifest
# Documented bounds of a task's numbers (docs/protocol.md "Tasks").
TIMEOUT_MAX_S = 366 * 24 * 3600
CPUS_MAX = 4096
GPUS_MAX = 1024
MEMORY_MAX = 1 << 50  # 1 PiB, for memory and shm_size
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


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


def _plain_name(v: str) -> str:
    if CONTROL_RE.search(v):
        raise PydanticCustomError("bad_name", "{name} holds a control character", {"name": repr(v[:100])})
    return v


# A name shown to people only (an agent's): any text but control characters.
PlainName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_plain_name)]


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


class ItemRef(BaseModel):
    name: SafePath
    sha256: str
    size: Size
    ann: Any = None  # Supervisely annotation JSON, checked by protocol.sly_format (errors name the item)


class DatasetIn(BaseModel):
    name: SafeName
    items: list[ItemRef] = []


# The user API's forms of the three above (the agent's results use the tolerant ones).
class UserFileRef(FileRef, UserIn):
    pass


class UserItemRef(ItemRef, UserIn):
    pass


class UserDatasetIn(DatasetIn, UserIn):
    # pydantic validates the narrower item type; mypy's list invariance does not model a field re-declared
    items: list[UserItemRef] = []  # type: ignore[assignment]


class ProjectIn(UserIn):
    name: SafeName
    meta: Any = None  # Supervisely project meta; absent: the empty meta
    datasets: list[UserDatasetIn] = []


# Items in one POST /api/v1/projects/{id}/items: a page is checked and inserted in one request.
PAGE_MAX = 5000


class ProjectItemsIn(UserIn):
    """A page of items added to one dataset of a stored project (the dataset is made if new)."""

    dataset: SafeName
    items: list[UserItemRef] = Field(min_length=1, max_length=PAGE_MAX)


class ModelIn(UserIn):
    name: SafeName
    files: list[UserFileRef]


class AgentIn(UserIn):
    name: PlainName
    allowed_task_types: list[str] | None = None
    gpus: bool = False  # the node has GPUs: its docker run command gets `--gpus all`


class AgentPatch(UserIn):
    name: PlainName | None = None
    allowed_task_types: list[str] | None = None


class Resources(UserIn):
    # None (or absent): the node's default (DEFAULT_TASK_GPUS: all its free GPUs, as the real agent);
    # a number: exactly that many, exclusively (0: none).
    gpus: int | None = Field(default=None, ge=0, le=GPUS_MAX)
    cpus: float | None = Field(default=None, gt=0, le=CPUS_MAX, allow_inf_nan=False)
    memory: str | int | None = None
    shm_size: str | int | None = None

    @field_validator("memory", "shm_size")
    @classmethod
    def _size(cls, v):
        if v is None:
            return v
        if isinstance(v, int):
            n = v
        elif MEMORY_RE.match(v):
            num, unit = re.match(r"^([\d.]+)(\w?)$", v).groups()
            n = float(num) * _UNITS[unit.lower()]
        else:
            raise ValueError("must be bytes or a size like '512m' / '2g'")
        if not 0 < n <= MEMORY_MAX:
            raise ValueError(f"must be more than 0 and at most {MEMORY_MAX} bytes (1 PiB)")
        return v


RETRY_MAX = 100  # continuations one chain may have
RETRY_AGENTS_MAX = 100  # nodes one policy may list


class RetryIn(UserIn):
    """A task's retry policy: when it is `lost`, continue it (at most `max` times in its chain) on
    the first of `agent_ids` online that allows its type (absent: the task's own node)."""

    max: int = Field(ge=0, le=RETRY_MAX)
    agent_ids: list[Annotated[int, Field(ge=0, le=ID_MAX)]] | None = Field(
        default=None, min_length=1, max_length=RETRY_AGENTS_MAX
    )


class TaskIn(UserIn):
    agent_id: int = Field(ge=0, le=ID_MAX)
    type: str
    image: str | None = Field(default=None, min_length=1, max_length=500)
    command: list[str] | str | None = None
    config: dict | None = None
    project_id: int | None = Field(default=None, ge=0, le=ID_MAX)
    dataset_id: int | None = Field(default=None, ge=0, le=ID_MAX)  # `app` tasks: DATASET_ID
    model_id: int | None = Field(default=None, ge=0, le=ID_MAX)
    resources: Resources | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=TIMEOUT_MAX_S, allow_inf_nan=False)
    retry: RetryIn | None = None


class Progress(BaseModel):
    current: float = Field(ge=0, allow_inf_nan=False)
    total: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class StateIn(BaseModel):
    state: str
    progress: Progress | None = None
    exit_code: int | None = Field(default=None, ge=-ID_MAX, le=ID_MAX)
    error: str | None = Field(default=None, max_length=20000)


RowIdInt = Annotated[int, Field(ge=0, le=ID_MAX)]


class PollIn(BaseModel):
    free_slots: int = Field(default=0, ge=0, le=ID_MAX)
    free_gpus: list[RowIdInt] = []  # GPU indices
    running: list[RowIdInt] = []  # task ids
    refusing: str = Field(default="", max_length=1000)  # why the agent takes no task now


class ResultFileRef(FileRef):
    ann: Any = None  # kind=project, files form: the item's annotation


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class CheckpointIn(BaseModel):
    epoch: FiniteFloat | None = Field(default=None, ge=0)
    metrics: dict[str, FiniteFloat] | None = Field(default=None, max_length=100)
    final: bool = False


class ResultsIn(BaseModel):
    kind: Literal["model", "project", "artifacts"]
    name: Annotated[str, AfterValidator(_plain_name)] = Field(default="", max_length=500)
    files: list[ResultFileRef] = []
    meta: Any = None  # kind=project
    datasets: list[DatasetIn] | None = None  # kind=project: the POST /api/v1/projects form, instead of files
    checkpoint: CheckpointIn | None = None  # kind=model: this model is a checkpoint of the task
    # kind=project, in pages: the first page (with `meta`) has `paged: true`; each further page
    # names the project the first one made (`project_id`) and carries no meta.
    paged: bool = False
    project_id: int | None = Field(default=None, ge=0, le=ID_MAX)


class SessionIn(UserIn):
    token: str


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


def model_hash(files: list[dict]) -> str:
    """sha256 of the manifest: lines '<path> <sha256>\\n' sorted by path."""
    manifest = "".join(f"{f['path']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(manifest.encode()).hexdigest()
