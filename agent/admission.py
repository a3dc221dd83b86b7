"""Slot admission as pure logic: free slots, free GPUs, and which pending tasks start where.

No state and no I/O: the supervisor passes what it holds and applies the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class Admission(NamedTuple):
    start: list[tuple[int, list[int]]]  # (task id, GPU indices), in the order to spawn
    refuse: list[tuple[int, str]]  # (task id, why): can never run on this agent


def free_slots(max_tasks: int, active: int, refusing: bool) -> int:
    """Slots offered to the server: none while draining or refusing (short of disk, exiting)."""
    return 0 if refusing else max(0, max_tasks - active)


def free_gpus(pool: Iterable[int], used: Iterable[int]) -> list[int]:
    used = set(used)
    return [g for g in pool if g not in used]


def admit(
    pending: Iterable[tuple[int, int]], busy: int, max_tasks: int, pool: list[int], used: Iterable[int]
) -> Admission:
    """Which pending tasks, given as (task id, GPUs wanted), start now, lowest id first.

    `busy` counts the slots that hold a task process or wait for its final state; `used` the GPU
    indices they keep. A task waiting for GPUs does not hold back a later one that fits (the
    free GPUs go to whoever fits, in id order); a task wanting more GPUs than the pool has is
    refused, and takes a slot until its final state is reported, like any other finished one.
    """
    used = set(used)
    start: list[tuple[int, list[int]]] = []
    refuse: list[tuple[int, str]] = []
    for task_id, want in sorted(pending):
        if busy >= max_tasks:
            break
        if want > len(pool):
            refuse.append((task_id, f"the task needs {want} GPU(s); this agent has {len(pool)}"))
            busy += 1
            continue
        free = free_gpus(pool, used)
        if want > len(free):
            continue
        gpus = free[:want]
        used.update(gpus)
        start.append((task_id, gpus))
        busy += 1
    return Admission(start, refuse)
