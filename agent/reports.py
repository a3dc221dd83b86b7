"""What the supervisor itself reports to the server, from the jobs thread: the final state of a
task whose task process died, a task handed back while draining, and a helper's FATAL. All are
blocking HTTP calls."""

from __future__ import annotations

import logging
import threading
import time

from protocol.backoff import backoff_delay

log = logging.getLogger("agent.supervisor")

FINAL_BACKOFF_BASE_S, FINAL_BACKOFF_CAP_S = 0.2, 5.0
RELEASE_GIVE_UP_S = 60.0  # a release not through by then is left: the next run's first poll re-hands the task


def report_final(api, task_id: int, state: str, error: str, stop: threading.Event) -> bool:
    """Post the final state, retrying through outages until `stop` is set; a 4xx refusal is final.

    True if the server took it."""
    from protocol.errors import APIError

    failures = 0
    while not stop.is_set():
        try:
            api.set_state(task_id, state, error=error)
            return True
        except APIError as e:
            if e.status is not None and 400 <= e.status < 500:
                log.warning("task %s: server refused %s: %s", task_id, state, e)
                return False
            failures += 1
            stop.wait(backoff_delay(failures, FINAL_BACKOFF_BASE_S, FINAL_BACKOFF_CAP_S))
    return False


def hand_back(api, task_id: int, stop: threading.Event, give_up_s: float = RELEASE_GIVE_UP_S) -> bool:
    """Release a task this agent will not run (assigned -> queued on the server), retrying
    through outages for up to `give_up_s`. A 4xx is final: a 409 means the task moved on
    meanwhile (stopped, deleted, ...), which is fine. True if the server took it back."""
    from protocol.errors import APIError

    failures, until = 0, time.monotonic() + give_up_s
    while not stop.is_set():
        try:
            answer = api.release(task_id)
            log.info("task %s handed back to the server (now %s)", task_id, answer.get("state", "?"))
            return True
        except APIError as e:
            if e.status is not None and 400 <= e.status < 500:
                log.info("task %s not handed back, the server says: %s", task_id, e)
                return False
            failures += 1
            delay = backoff_delay(failures, FINAL_BACKOFF_BASE_S, FINAL_BACKOFF_CAP_S)
            if time.monotonic() + delay > until:
                log.warning(
                    "task %s not handed back after %d tries (%s); it stays assigned to this node, "
                    "whose next run gets it again",
                    task_id,
                    failures,
                    e,
                )
                return False
            stop.wait(delay)
    return False


def report_fatal(api, body_fn) -> bool:
    """One telemetry post with a `fatal` field (`body_fn()` builds it: a fresh sample); True if sent."""
    try:
        api.telemetry(body_fn())
        return True
    except Exception as e:  # noqa: BLE001 - the CRITICAL line in the agent log stays
        log.error("could not report FATAL to the server: %s", e)
        return False
