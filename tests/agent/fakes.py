"""A fake spawner, engine and API for the supervisor's unit tests (supervisor's `DummyOptions`).

The supervisor's real loop runs against these: no fork, no signal, no sleep. The test owns the
clock and decides when a child beats or dies; SIGKILL (`kill`) kills at once, as it does for real,
while SIGTERM (`terminate`) only records the ask.
"""

from __future__ import annotations

import itertools
import os
import signal


class FakeChild:
    def __init__(self, name: str, pid: int, role, target, args, now: float):
        self.name, self.pid, self.role, self.target, self.args = name, pid, role, target, args
        self.code: int | None = None
        self.beat = now
        self.reaped = False
        self.signals: list[str] = []
        self.stop_r: int | None = None  # a copy of the task process's stop pipe (read end)
        if getattr(role, "stop_fd", None) is not None:
            self.stop_r = os.dup(role.stop_fd)
            os.set_blocking(self.stop_r, False)

    def stop_bytes(self) -> bytes:
        """What the supervisor wrote to this task process's stop pipe so far."""
        try:
            return os.read(self.stop_r, 64)
        except BlockingIOError:
            return b""


class FakeSpawner:
    def __init__(self, now: float = 1000.0):
        self.t = now
        self.children: list[FakeChild] = []
        self.calls: list[tuple[str, str]] = []
        self._pids = itertools.count(40000)

    # --- the Spawner interface
    def now(self) -> float:
        return self.t

    def spawn(self, name, role, target, args=()):
        child = FakeChild(name, next(self._pids), role, target, args, self.t)
        self.children.append(child)
        self.calls.append(("spawn", name))
        return child

    def exitcode(self, child):
        return child.code

    def sentinel(self, child):
        raise AssertionError("unit tests call loop_once, never wait()")

    def last_beat(self, child) -> float:
        return child.beat

    def terminate(self, child) -> None:
        self.calls.append(("terminate", child.name))
        child.signals.append("TERM")

    def kill(self, child) -> None:
        self.calls.append(("kill", child.name))
        child.signals.append("KILL")
        if child.code is None:
            child.code = -signal.SIGKILL

    def reap(self, child) -> None:
        assert child.code is not None and not child.reaped, "reaped a live or already reaped child"
        child.reaped = True
        if child.stop_r is not None:
            os.close(child.stop_r)
            child.stop_r = None

    # --- what the test does
    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

    def live(self, name: str) -> FakeChild:
        """The one unreaped child called `name`."""
        found = [c for c in self.children if c.name == name and not c.reaped]
        assert len(found) == 1, (name, found)
        return found[0]

    def spawned(self, name: str) -> list[FakeChild]:
        return [c for c in self.children if c.name == name]

    def signals_sent(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] != "spawn"]


class FakeEngine:
    """The supervisor's Docker and disk questions, answered by the test."""

    def __init__(self):
        self.running_containers: set[int] = set()
        self.reaped: list[list[int]] = []
        self.free_mb = 10**6

    def container_running(self, config, task_id: int) -> bool:
        return task_id in self.running_containers

    def reap_orphans(self, config, keep) -> None:
        self.reaped.append(list(keep))

    def disk_status(self, config) -> dict:
        ok = self.free_mb >= config.min_free_disk_mb
        return {"free_mb": self.free_mb, "ok": ok, "reason": "" if ok else "not enough disk (test)"}

    def free_disk(self, config) -> dict:
        return {}


class FakeAPI:
    def __init__(self):
        self.states: list[tuple[int, str, str | None]] = []
        self.telemetry_posts: list[dict] = []
        self.releases: list[int] = []  # every release call, failed ones included
        self.release_errors: list[Exception] = []  # raised by the next release calls, in order

    def release(self, task_id):
        self.releases.append(task_id)
        if self.release_errors:
            raise self.release_errors.pop(0)
        return {"id": task_id, "state": "queued", "progress": None, "stop_requested": False}

    def set_state(self, task_id, state, error=None, **kw):
        self.states.append((task_id, state, error))

    def telemetry(self, body):
        self.telemetry_posts.append(body)
