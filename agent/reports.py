"""What the supervisor itself reports to the server, from the jobs thread: the final state of a
task whose task process died, and a helper's FATAL. Both are blocking HTTP calls."""
from __future__ import annotations

import logging
import threading

from protocol.backoff import backoff_delay

log = logging.getLogger("agent.supervisor")

FINAL_BACKOFF_BASE_S, FINAL_BACKOFF_CAP_S = 0.2, 5.0


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


def report_fatal(api, body_fn) -> bool:
    """One telemetry post with a `fatal` field (`body_fn()` builds it: a fresh sample); True if sent."""
    try:
        api.telemetry(body_fn())
        return True
    except Exception as e:  # noqa: BLE001 - the CRITICAL line in the agent log stays
        log.error("could not report FATAL to the server: %s", e)
        return False
