"""Dead and hung are different: heartbeat deadlines and the ask -> grace -> SIGKILL escalation.

Every child beats a shared cell (`ChildBase.beat`): helpers from their loop, a task process from
its `watch` thread (its handler may block on a container for hours, the process must not). A
child silent past its deadline is asked to go (SIGTERM) and killed if still alive after a grace
(gunicorn `murder_workers`); its death then takes the usual path (a helper restarts, a task
process is replaced and re-attaches to its container). A stop asked through a task's stop pipe
escalates the same way.
"""

from __future__ import annotations

HUNG_KILL_AFTER_S = 5.0  # a hung child's grace between SIGTERM and SIGKILL


class Escalation:
    """A child asked to go at `since`; SIGKILL is due `grace_s` later if it still lives."""

    def __init__(self, since: float, grace_s: float, why: str):
        self.since, self.grace_s, self.why = since, grace_s, why
        self.killed = False

    @property
    def deadline(self) -> float:
        return self.since + self.grace_s

    def kill_due(self, now: float) -> bool:
        return not self.killed and now >= self.deadline


def silent_for(spawner, child, now: float) -> float:
    """Seconds since the child's last heartbeat."""
    return now - spawner.last_beat(child)


def escalate(spawner, child, escalation: Escalation | None, now: float, log, label: str) -> None:
    """SIGKILL the child once its escalation is due (once only)."""
    if child is None or escalation is None or not escalation.kill_due(now):
        return
    escalation.killed = True
    log.warning(
        "%s (pid %s) still alive %.0fs after %s; killing it", label, child.pid, escalation.grace_s, escalation.why
    )
    spawner.kill(child)
