"""Task states and their checked transitions, as the server stores them and the agent reports them."""

from __future__ import annotations

import enum


class TaskState(enum.StrEnum):
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


FINAL = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.STOPPED, TaskState.LOST})
# A task in one of these is leased to its agent (handed out, not final).
LEASED = frozenset({TaskState.ASSIGNED, TaskState.PREPARING, TaskState.RUNNING, TaskState.UPLOADING})
# Not final: queued or leased.
LIVE = frozenset({TaskState.QUEUED, *LEASED})

# target state -> the states it may be entered from.
EDGES: dict[TaskState, frozenset[TaskState]] = {
    # QUEUED -> ASSIGNED: handed out in a poll answer; PREPARING/RUNNING/UPLOADING -> ASSIGNED:
    # handed out again because the agent's poll no longer lists it as running (restarted agent,
    # lost answer).
    TaskState.ASSIGNED: frozenset({TaskState.QUEUED, TaskState.PREPARING, TaskState.RUNNING, TaskState.UPLOADING}),
    # ASSIGNED -> PREPARING: the agent took it and downloads inputs / pulls the image
    TaskState.PREPARING: frozenset({TaskState.ASSIGNED}),
    # PREPARING -> RUNNING: container started; ASSIGNED -> RUNNING: a restarted agent re-adopts
    # its container, or a task without a container (cleanup) starts at once
    TaskState.RUNNING: frozenset({TaskState.ASSIGNED, TaskState.PREPARING}),
    # RUNNING -> UPLOADING: exit 0, results go up
    TaskState.UPLOADING: frozenset({TaskState.RUNNING}),
    # UPLOADING -> FINISHED: results stored; RUNNING -> FINISHED: nothing to upload
    TaskState.FINISHED: frozenset({TaskState.RUNNING, TaskState.UPLOADING}),
    # any live state -> FAILED: the agent (or the server, for a removed agent) gives up with an error
    TaskState.FAILED: LIVE,
    # QUEUED -> STOPPED: a user's stop before hand-out; leased -> STOPPED: the agent stopped it
    TaskState.STOPPED: LIVE,
    # leased -> LOST: the agent was silent past the lease
    TaskState.LOST: LEASED,
    # ASSIGNED -> QUEUED: a draining agent hands the task back (its lease is returned)
    TaskState.QUEUED: frozenset({TaskState.ASSIGNED}),
}

# Entering the state one is in: a no-op (taken as a progress update).
SAME_STATE_OK = frozenset({TaskState.PREPARING, TaskState.RUNNING, TaskState.UPLOADING})
# States an agent may report (the others are the server's to set).
AGENT_REPORTABLE = frozenset({*SAME_STATE_OK, TaskState.FINISHED, TaskState.FAILED, TaskState.STOPPED})


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
