"""Slot admission as pure logic: free slots, free GPUs, and which pending tasks start where.

No state and no I/O: the supervisor passes what it holds and applies the answer.

What a pending task wants of the GPU pool (`Want`):
- an int: exactly that many GPUs, exclusively; it waits until they are free (0: none);
- None: it named no count, so DEFAULT_TASK_GPUS decides: every free GPU, at most N, or none;
  it never waits for GPUs (no free one: it runs on the CPU);
- a tuple of indices: a re-adopted task whose container already holds those GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

# Types that get the node's GPUs when they name no count, as the Supervisely agent gives them.
GPU_DEFAULT_TYPES = frozenset({"train", "inference", "custom", "app"})

Want = int | tuple[int, ...] | None


class Admission(NamedTuple):
    start: list[tuple[int, list[int]]]  # (task id, GPU indices), in the order to spawn
    refuse: list[tuple[int, str]]  # (task id, why): can never run on this agent


def free_slots(max_tasks: int, active: int, refusing: bool) -> int:
    """Slots offered to the server: none while draining or refusing (short of disk, exiting)."""
    return 0 if refusing else max(0, max_tasks - active)


def free_gpus(pool: Iterable[int], used: Iterable[int]) -> list[int]:
    used = set(used)
    return [g for g in pool if g not in used]


def gpus_wanted(task: dict) -> Want:
    """A task's `resources.gpus` as a Want: absent or null is "not named" (None) for the types
    that get GPUs by default, and 0 for the rest (cleanup runs no container)."""
    g = (task.get("resources") or {}).get("gpus")
    if g is None:
        return None if str(task.get("type")) in GPU_DEFAULT_TYPES else 0
    return len(g) if isinstance(g, list) else int(g)


def admit(
    pending: Iterable[tuple[int, Want]],
    busy: int,
    max_tasks: int,
    pool: list[int],
    used: Iterable[int],
    default_cap: int | None = None,
) -> Admission:
    """Which pending tasks, given as (task id, Want), start now, lowest id first.

    `busy` counts the slots that hold a task process or wait for its final state; `used` the GPU
    indices they keep; `default_cap` is DEFAULT_TASK_GPUS (None: all free GPUs). Re-adopted tasks
    holding GPUs come first, so what they hold is never handed out again. A task waiting for GPUs
    does not hold back a later one that fits (the free GPUs go to whoever fits, in id order); a
    task wanting more GPUs than the pool has is refused, and takes a slot until its final state
    is reported, like any other finished one.
    """
    used = set(used)
    start: list[tuple[int, list[int]]] = []
    refuse: list[tuple[int, str]] = []
    ordered = sorted(pending, key=lambda p: (not isinstance(p[1], tuple), p[0]))
    for task_id, want in ordered:
        if busy >= max_tasks:
            break
        if isinstance(want, tuple):
            gpus = list(want)
        elif want is None:
            gpus = free_gpus(pool, used)[:default_cap]
        elif want > len(pool):
            refuse.append((task_id, f"the task needs {want} GPU(s); this agent has {len(pool)}"))
            busy += 1
            continue
        else:
            free = free_gpus(pool, used)
            if want > len(free):
                continue
            gpus = free[:want]
        used.update(gpus)
        start.append((task_id, gpus))
        busy += 1
    return Admission(start, refuse)
