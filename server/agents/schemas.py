"""The nodes' request bodies: a node added or changed by a user, a node's long-poll."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from server.http.fields import PlainName, UserIn
from server.http.strict import ID_MAX


class AgentIn(UserIn):
    name: PlainName
    allowed_task_types: list[str] | None = None
    gpus: bool = False  # the node has GPUs: its docker run command gets `--gpus all`


class AgentPatch(UserIn):
    name: PlainName | None = None
    allowed_task_types: list[str] | None = None


RowIdInt = Annotated[int, Field(ge=0, le=ID_MAX)]


class PollIn(BaseModel):
    free_slots: int = Field(default=0, ge=0, le=ID_MAX)
    free_gpus: list[RowIdInt] = []  # GPU indices
    running: list[RowIdInt] = []  # task ids
    refusing: str = Field(default="", max_length=1000)  # why the agent takes no task now
