"""The supervisor's one contact with fork, signals and the clock (supervisord's `options`).

Everything the supervisor's loop does to a process goes through a `Spawner`; the loop keeps
only `Child` handles. Tests pass a fake with the same methods (tests/agent/fakes.py) and decide
themselves when a child dies, beats or what time it is, so restart, backoff, FATAL, hang and
stop escalation run without forking.
"""

from __future__ import annotations

import multiprocessing
import time

MP = multiprocessing.get_context("fork")


class Child:
    """One spawned process as the supervisor holds it."""

    def __init__(self, name: str, proc, beat):
        self.name = name
        self.proc = proc  # multiprocessing.Process (the fake: None)
        self.beat = beat  # RawValue("d"): the child's last CLOCK_MONOTONIC heartbeat

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Spawner:
    """Forks children with the "fork" context, from the caller's (the main) thread."""

    def now(self) -> float:
        """The loop's clock. Heartbeats use the same CLOCK_MONOTONIC, which all processes share."""
        return time.monotonic()

    def spawn(self, name: str, role, target, args: tuple = ()) -> Child:
        """Fork `target(*args)`; `role.heartbeat` becomes a shared cell the child beats."""
        beat = MP.RawValue("d", self.now())
        role.heartbeat = beat
        proc = MP.Process(target=target, args=args, name=name, daemon=False)
        proc.start()
        return Child(name, proc, beat)

    def exitcode(self, child: Child) -> int | None:
        """None while it runs; its exit code, or -signal, once it is dead."""
        return child.proc.exitcode

    def sentinel(self, child: Child) -> int:
        """An fd that becomes readable when the child dies (for multiprocessing.connection.wait)."""
        return child.proc.sentinel

    def last_beat(self, child: Child) -> float:
        return child.beat.value

    def terminate(self, child: Child) -> None:
        child.proc.terminate()

    def kill(self, child: Child) -> None:
        child.proc.kill()

    def reap(self, child: Child) -> None:
        """Release a dead child's resources (it is already waited for: exitcode is set)."""
        child.proc.join(0)
        child.proc.close()
