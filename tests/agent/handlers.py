"""Placeholder task handlers for the agent's own tests (SLY_AGENT_HANDLER=tests.agent.handlers:<name>).

They follow workers/base.py like a real handler but run no container. `counter` is adoptable:
it numbers its lines and stores the number as the line's container timestamp (`cts`), so a
re-spawned task process resumes after ctx.last_log_ts_ns() exactly as the Docker handler
resumes a container's output with logs(since=...).
"""
from __future__ import annotations

import logging
import os
import signal
import time

from workers.base import Outcome

log = logging.getLogger("tests.agent.handlers")


def counter(ctx) -> Outcome:
    """config: lines (N), rate (lines/s), batch (lines per emit), outcome, exit_code, error."""
    cfg = ctx.task.get("config") or {}
    n, rate, batch = int(cfg.get("lines", 20)), float(cfg.get("rate", 100)), int(cfg.get("batch", 1))
    pylog = int(cfg.get("pylog", 0))      # agent-log records per batch (multiprocessing-logging)
    last = ctx.last_log_ts_ns() if ctx.adopt else None
    i = 0 if last is None else last + 1
    if not ctx.adopt:
        ctx.set_phase("preparing")
        ctx.log("placeholder: preparing")
    ctx.set_phase("running")
    t0, start = time.monotonic(), i
    while i < n:
        if ctx.stop_event.is_set():
            return Outcome("stopped", error="stopped on request")
        k = min(batch, n - i)
        now = time.time()
        ctx.emit([{"ts": now, "level": "info", "stream": "stdout", "message": f"line {j}", "cts": j}
                  for j in range(i, i + k)])
        i += k
        for _ in range(pylog):
            log.info("task %s: chatty placeholder at line %d", ctx.task_id, i)
        ctx.progress(i, n)
        if rate > 0:
            delay = t0 + (i - start) / rate - time.monotonic()
            if delay > 0:
                ctx.stop_event.wait(delay)
    state = cfg.get("outcome", "finished")
    return Outcome(state, exit_code=cfg.get("exit_code", 0 if state == "finished" else 1), error=cfg.get("error"))


def sleeper(ctx) -> Outcome:
    """Logs one line, then waits for a stop (or config.seconds)."""
    cfg = ctx.task.get("config") or {}
    ctx.set_phase("running")
    ctx.emit([{"ts": time.time(), "level": "info", "stream": "stdout", "message": "sleeping", "cts": 0}])
    if ctx.stop_event.wait(float(cfg.get("seconds", 3600))):
        return Outcome("stopped", error="stopped on request")
    return Outcome("finished", exit_code=0)


def raiser(ctx) -> Outcome:
    ctx.set_phase("running")
    raise RuntimeError("placeholder handler failed on purpose (db password=hunter2)")


def segfault(ctx) -> Outcome:
    ctx.set_phase("running")
    ctx.emit([{"ts": time.time(), "level": "info", "stream": "stdout", "message": "about to crash", "cts": 0}])
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)
    return Outcome("finished")


def secret_logger(ctx) -> Outcome:
    """Logs the agent token and a password; the server must only ever see them masked."""
    ctx.set_phase("running")
    ctx.emit([{"ts": time.time(), "level": "info", "stream": "stdout", "message": f"token is {ctx.config.access_token}"},
              {"ts": time.time(), "level": "info", "stream": "stdout", "message": "db password=hunter2 connected"}])
    return Outcome("finished", exit_code=0)
