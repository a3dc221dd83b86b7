"""Agent-side states and their checked transitions (standard library only).

Two machines:
- `ChildState`: a long-lived helper process (telemetry, log-shipper) as the supervisor sees it.
- `SlotState`: one task as the supervisor sees it (its task process, its slot and GPUs).
Every transition names its allowed source states here; `change_state()` refuses the rest.
The task's own state, as the task process reports it to the server, is `protocol.states.TaskState`
with its edges checked by `protocol.states.check_transition`.
"""

from __future__ import annotations

import enum


class TransitionError(ValueError):
    """A state change that the machine does not allow (a bug, never a runtime condition)."""


class ChildState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


CHILD_EDGES: dict[ChildState, frozenset[ChildState]] = {
    # STOPPED -> STARTING: spawned for the first time, or after a planned stop (SIGHUP)
    # BACKOFF -> STARTING: its backoff delay ran out
    ChildState.STARTING: frozenset({ChildState.STOPPED, ChildState.BACKOFF}),
    # STARTING -> RUNNING: alive past the start grace
    ChildState.RUNNING: frozenset({ChildState.STARTING}),
    # STARTING/RUNNING -> BACKOFF: died unasked; waits before the next spawn
    ChildState.BACKOFF: frozenset({ChildState.STARTING, ChildState.RUNNING}),
    # STARTING/RUNNING -> STOPPING: the supervisor asked it to exit (shutdown, reload)
    ChildState.STOPPING: frozenset({ChildState.STARTING, ChildState.RUNNING}),
    # STOPPING -> STOPPED: it exited as asked; BACKOFF -> STOPPED: shutdown while waiting
    ChildState.STOPPED: frozenset({ChildState.STOPPING, ChildState.BACKOFF, ChildState.STARTING, ChildState.RUNNING}),
    # STARTING/RUNNING -> FATAL: too many quick deaths in the window; given up and reported
    ChildState.FATAL: frozenset({ChildState.STARTING, ChildState.RUNNING}),
}


class SlotState(enum.Enum):
    PENDING = "pending"  # leased to us, waiting for a slot or its GPUs
    RUNNING = "running"  # its task process is alive
    STOPPING = "stopping"  # its stop event is set; the task process winds down
    FINALIZING = "finalizing"  # task process died; final state waits for the log acks
    DONE = "done"  # final state reported; slot and GPUs free


SLOT_EDGES: dict[SlotState, frozenset[SlotState]] = {
    # PENDING -> RUNNING: slot and GPUs free, task process spawned
    # RUNNING -> RUNNING: task process died while its container runs; a new one adopts it
    # STOPPING -> RUNNING: same, while stopping (the new one sees the stop event set)
    SlotState.RUNNING: frozenset({SlotState.PENDING, SlotState.RUNNING, SlotState.STOPPING}),
    # PENDING/RUNNING -> STOPPING: the server or a second SIGTERM asked to stop it
    SlotState.STOPPING: frozenset({SlotState.PENDING, SlotState.RUNNING}),
    # RUNNING/STOPPING -> FINALIZING: task process died without reporting a final state
    # PENDING -> FINALIZING: never ran (stopped first, or asks for more GPUs than the agent has)
    SlotState.FINALIZING: frozenset({SlotState.PENDING, SlotState.RUNNING, SlotState.STOPPING}),
    # RUNNING/STOPPING -> DONE: task process reported the final state itself and exited 0
    # FINALIZING -> DONE: the supervisor reported failed after the log was acked
    # PENDING -> DONE: stopped before it ever ran
    SlotState.DONE: frozenset({SlotState.RUNNING, SlotState.STOPPING, SlotState.FINALIZING, SlotState.PENDING}),
}


def change_state(current: enum.Enum, new: enum.Enum, edges: dict) -> enum.Enum:
    """Return `new` if the machine allows current -> new, else raise TransitionError."""
    allowed = edges.get(new, frozenset())
    if current not in allowed:
        raise TransitionError(f"{type(current).__name__}: {current.value} -> {new.value} is not allowed")
    return new
