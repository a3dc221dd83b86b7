"""The tasks' request bodies: a task created by a user (its resources and retry policy), and what
its node reports: state, progress, results (a model or checkpoint, a project, artifacts)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator

from server.http.fields import FileRef, UserIn, plain_name
from server.http.strict import ID_MAX
from server.projects.schemas import DatasetIn

MEMORY_RE = re.compile(r"^\d+(\.\d+)?[bkmgBKMG]?$")
# Documented bounds of a task's numbers (docs/protocol.md "Tasks").
TIMEOUT_MAX_S = 366 * 24 * 3600
CPUS_MAX = 4096
GPUS_MAX = 1024
MEMORY_MAX = 1 << 50  # 1 PiB, for memory and shm_size
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


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


class ResultFileRef(FileRef):
    ann: Any = None  # kind=project, files form: the item's annotation


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class CheckpointIn(BaseModel):
    epoch: FiniteFloat | None = Field(default=None, ge=0)
    metrics: dict[str, FiniteFloat] | None = Field(default=None, max_length=100)
    final: bool = False


class ResultsIn(BaseModel):
    kind: Literal["model", "project", "artifacts"]
    name: Annotated[str, AfterValidator(plain_name)] = Field(default="", max_length=500)
    files: list[ResultFileRef] = []
    meta: Any = None  # kind=project
    datasets: list[DatasetIn] | None = None  # kind=project: the POST /api/v1/projects form, instead of files
    checkpoint: CheckpointIn | None = None  # kind=model: this model is a checkpoint of the task
    # kind=project, in pages: the first page (with `meta`) has `paged: true`; each further page
    # names the project the first one made (`project_id`) and carries no meta.
    paged: bool = False
    project_id: int | None = Field(default=None, ge=0, le=ID_MAX)
