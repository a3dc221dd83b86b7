"""Task states and their checked transitions, as the server stores them and the agent reports them."""
from __future__ import annotations

import enum


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    PREPARING = "preparing"
    RUNNING = "running"
    UPLOADING = "uploading"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    LOST = "lost"

    @property
    def final(self) -> bool:
        return self in FINAL


Q, A, P, R, U = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.PREPARING, TaskState.RUNNING, TaskState.UPLOADING
FINAL = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.STOPPED, TaskState.LOST})
# A task in one of these is leased to its agent (handed out, not final).
LEASED = frozenset({A, P, R, U})

# target state -> the states it may be entered from.
EDGES: dict[TaskState, frozenset[TaskState]] = {
    # QUEUED -> ASSIGNED: handed out in a poll answer; P/R/U -> ASSIGNED: handed out again because
    # the agent's poll no longer lists it as running (restarted agent, lost answer).
    TaskState.ASSIGNED: frozenset({Q, P, R, U}),
    # ASSIGNED -> PREPARING: the agent took it and downloads inputs / pulls the image
    TaskState.PREPARING: frozenset({A}),
    # PREPARING -> RUNNING: container started; ASSIGNED -> RUNNING: a restarted agent re-adopts
    # its container, or a task without a container (cleanup) starts at once
    TaskState.RUNNING: frozenset({A, P}),
    # RUNNING -> UPLOADING: exit 0, results go up
    TaskState.UPLOADING: frozenset({R}),
    # UPLOADING -> FINISHED: results stored; RUNNING -> FINISHED: nothing to upload
    TaskState.FINISHED: frozenset({R, U}),
    # any live state -> FAILED: the agent (or the server, for a removed agent) gives up with an error
    TaskState.FAILED: frozenset({Q, A, P, R, U}),
    # QUEUED -> STOPPED: a user's stop before hand-out; leased -> STOPPED: the agent stopped it
    TaskState.STOPPED: frozenset({Q, A, P, R, U}),
    # leased -> LOST: the agent was silent past the lease
    TaskState.LOST: frozenset({A, P, R, U}),
    # ASSIGNED -> QUEUED: a draining agent hands the task back (its lease is returned)
    TaskState.QUEUED: frozenset({A}),
}

# States an agent may report (the others are the server's to set).
AGENT_REPORTABLE = frozenset({P, R, U, TaskState.FINISHED, TaskState.FAILED, TaskState.STOPPED})
# Entering the state one is in: a no-op (taken as a progress update).
SAME_STATE_OK = frozenset({P, R, U})


class IllegalTransition(ValueError):
    """A state change the machine does not allow."""

    def __init__(self, src: TaskState, dst: TaskState):
        self.src, self.dst = src, dst
        super().__init__(f"a task cannot go from {src.value} to {dst.value}")


def allowed(src: TaskState, dst: TaskState) -> bool:
    return (src is dst and dst in SAME_STATE_OK) or src in EDGES[dst]


def check_transition(src: TaskState, dst: TaskState) -> None:
    """Raise IllegalTransition unless src -> dst is an allowed edge (or a same-state progress update)."""
    if not allowed(src, dst):
        raise IllegalTransition(src, dst)
