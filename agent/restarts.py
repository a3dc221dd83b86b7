"""The long-lived helpers (telemetry, log-shipper): spawn, start grace, BACKOFF, FATAL, hang, stop.

Each helper follows `ChildState` (agent/states.py). A helper alive `START_GRACE_S` after its
spawn is RUNNING, and its next death backs off from the base delay again. A death backs off
exponentially, in the deaths that are recent (within `window_s`) and quick (no start grace
lived through since), with jitter. `max_deaths` deaths within `window_s`, quick or not (a
helper that keeps dying is flapping), make it FATAL, and so does one exit with `CHILD_CONFIG`
(restarting into the same broken settings cannot help). FATAL is reported through `on_fatal`,
which must not block. Time comes from the caller (`now`), processes from the injected spawner.
"""

from __future__ import annotations

import collections
import logging
import random

from agent.escalation import HUNG_KILL_AFTER_S, Escalation, escalate, silent_for
from agent.exitcodes import CHILD_CONFIG, describe_exit
from agent.states import CHILD_EDGES, ChildState, change_state
from protocol.backoff import backoff_delay

log = logging.getLogger("agent.supervisor")

START_GRACE_S = 1.0  # a helper alive this long is RUNNING
HELPER_STOP_KILL_AFTER_S = 15.0  # SIGTERM -> SIGKILL for a helper asked to stop (the shipper drains <= 10 s)


class RestartPolicy:
    """Exponential backoff with jitter; FATAL after `max_deaths` deaths within `window_s`."""

    def __init__(self, max_deaths: int, window_s: float, base_s: float = 0.1, cap_s: float = 10.0, rng=random.uniform):
        self.max_deaths, self.window_s, self.base_s, self.cap_s = max_deaths, window_s, base_s, cap_s
        self.rng = rng
        self.deaths: collections.deque[float] = collections.deque()
        self.failures = 0  # deaths since it last lived past the start grace

    def record_death(self, now: float) -> float | None:
        """Delay before the next start, or None: give up (FATAL)."""
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - self.window_s:
            self.deaths.popleft()
        self.failures += 1
        if len(self.deaths) >= self.max_deaths:
            return None
        return backoff_delay(min(self.failures, len(self.deaths)), self.base_s, self.cap_s, self.rng)

    def reset(self) -> None:
        """It lived past the start grace: the next death backs off from the base delay."""
        self.failures = 0


class Helper:
    """A long-lived child (telemetry, log-shipper) and its state."""

    def __init__(self, name: str, factory, policy: RestartPolicy):
        self.name, self.factory, self.policy = name, factory, policy
        self.state = ChildState.STOPPED
        self.child = None  # spawner.Child while a process exists
        self.started_at = 0.0
        self.start_at = 0.0  # BACKOFF: when to start again
        self.escalation: Escalation | None = None  # asked to go (hung, stop): SIGKILL when due
        self.restarts = 0

    def change(self, new: ChildState) -> None:
        self.state = change_state(self.state, new, CHILD_EDGES)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None


class Helpers:
    """The helpers' state machine; the supervisor's loop calls one method per step."""

    def __init__(self, spawner, helpers: list[Helper], on_fatal):
        self.spawner = spawner
        self.by_name = {h.name: h for h in helpers}
        self.on_fatal = on_fatal  # (helper, message, now) -> None; must not block
        self.shutting_down = False  # shutdown reached the helpers: no more restarts

    def __getitem__(self, name: str) -> Helper:
        return self.by_name[name]

    def __iter__(self):
        return iter(self.by_name.values())

    def spawn(self, h: Helper, now: float) -> None:
        role = h.factory()
        h.child = self.spawner.spawn(h.name, role, role.run)
        h.started_at = now
        h.escalation = None
        h.change(ChildState.STARTING)
        log.info("%s started (pid %s)", h.name, h.pid)

    def reap(self, now: float) -> None:
        """Notice deaths: a planned stop restarts (unless shutting down), the rest back off or go FATAL."""
        for h in self:
            if h.child is None:
                continue
            code = self.spawner.exitcode(h.child)
            if code is None:
                if h.state == ChildState.STARTING and now - h.started_at >= START_GRACE_S:
                    h.change(ChildState.RUNNING)
                    h.policy.reset()
                continue
            how = describe_exit(code)
            self.spawner.reap(h.child)
            h.child, h.escalation = None, None
            if h.state == ChildState.STOPPING:
                h.change(ChildState.STOPPED)
                if not self.shutting_down:
                    self.spawn(h, now)  # planned restart (SIGHUP)
                continue
            if code == CHILD_CONFIG:
                h.change(ChildState.FATAL)
                self.on_fatal(h, f"{h.name} {how}: its settings are unusable; given up (FATAL)", now)
                continue
            delay = h.policy.record_death(now)
            if delay is None:
                h.change(ChildState.FATAL)
                self.on_fatal(
                    h,
                    f"{h.name} died {h.policy.max_deaths} times within {h.policy.window_s:g}s "
                    f"(last: {how}); given up (FATAL)",
                    now,
                )
                continue
            h.change(ChildState.BACKOFF)
            h.start_at = now + delay
            h.restarts += 1
            log.warning("%s died (%s); restarting in %.2fs", h.name, how, delay)

    def check_hung(self, now: float, hung_s: float) -> None:
        """A helper silent for `hung_s` gets SIGTERM, then SIGKILL; its death then counts as one."""
        for h in self:
            if h.child is None or h.escalation is not None or h.state not in (ChildState.STARTING, ChildState.RUNNING):
                continue
            silent = silent_for(self.spawner, h.child, now)
            if silent > hung_s:
                log.warning("%s (pid %s) sent no heartbeat for %.0fs: hung; stopping it", h.name, h.pid, silent)
                h.escalation = Escalation(now, HUNG_KILL_AFTER_S, "SIGTERM for a missed heartbeat")
                self.spawner.terminate(h.child)

    def restart_due(self, now: float) -> None:
        for h in self:
            if h.state == ChildState.BACKOFF and now >= h.start_at:
                if self.shutting_down:
                    h.change(ChildState.STOPPED)
                else:
                    self.spawn(h, now)

    def stop(self, h: Helper, now: float) -> None:
        """SIGTERM (it exits cleanly; the shipper drains first), SIGKILL if it outlives the grace."""
        if h.state not in (ChildState.STARTING, ChildState.RUNNING):
            return
        h.change(ChildState.STOPPING)
        self.spawner.terminate(h.child)
        if h.escalation is None:
            h.escalation = Escalation(now, HELPER_STOP_KILL_AFTER_S, "SIGTERM")

    def stop_in_order(self, names: tuple[str, ...], now: float) -> bool:
        """Stop the helpers one after the other; True once none is left."""
        for name in names:
            h = self[name]
            if h.state in (ChildState.STARTING, ChildState.RUNNING):
                self.stop(h, now)
                return False
            if h.state == ChildState.STOPPING:
                return False
            if h.state == ChildState.BACKOFF:
                h.change(ChildState.STOPPED)
        return True

    def escalate(self, now: float) -> None:
        for h in self:
            escalate(self.spawner, h.child, h.escalation, now, log, h.name)

    def deadlines(self):
        """Times at which the loop has something to do for a helper."""
        for h in self:
            if h.state == ChildState.BACKOFF:
                yield h.start_at
            elif h.state == ChildState.STARTING:
                yield h.started_at + START_GRACE_S
            if h.escalation is not None and not h.escalation.killed:
                yield h.escalation.deadline
