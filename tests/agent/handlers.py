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
    pylog = int(cfg.get("pylog", 0))  # agent-log records per batch (multiprocessing-logging)
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
        ctx.emit(
            [
                {"ts": now, "level": "info", "stream": "stdout", "message": f"line {j}", "cts": j}
                for j in range(i, i + k)
            ]
        )
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
    ctx.emit(
        [
            {"ts": time.time(), "level": "info", "stream": "stdout", "message": f"token is {ctx.config.access_token}"},
            {"ts": time.time(), "level": "info", "stream": "stdout", "message": "db password=hunter2 connected"},
        ]
    )
    return Outcome("finished", exit_code=0)


# Lines that are not log lines, appended straight to the task's durable log between its own lines.
GARBAGE = (
    b"garbage-without-seq",
    b'{"seq":',
    b'{"seq":"3"}',
    b'{"seq":1x}',
    b"\xff\xfe not utf-8",
    b'{"seq":999999,"message":"a seq from nowhere"}',
    b'{"seq":0,"message":"a repeated seq"}',
)


def garbler(ctx) -> Outcome:
    """Like `counter` (config: lines, rate), but after every `every`-th line it appends a line that is
    not a log line to its own durable log, and halfway it emits an empty line dict (`emit([{}])`)."""
    from node import tasklog

    cfg = ctx.task.get("config") or {}
    n, rate, every = int(cfg.get("lines", 40)), float(cfg.get("rate", 50)), int(cfg.get("every", 3))
    path = tasklog.find_log_file(ctx.config, ctx.task_id)
    ctx.set_phase("running")
    bad = 0
    for i in range(n):
        ctx.emit([{"ts": time.time(), "level": "info", "stream": "stdout", "message": f"line {i}", "cts": i}])
        if i % every == every - 1:
            with open(path, "ab") as f:  # O_APPEND, one write: lands between two whole lines
                f.write(GARBAGE[bad % len(GARBAGE)] + b"\n")
            bad += 1
        if i == n // 2:
            ctx.emit([{}])
        if rate > 0:
            ctx.stop_event.wait(1 / rate)
    ctx.log(f"appended {bad} bad lines")
    return Outcome("finished", exit_code=0)


def dispatch(ctx) -> Outcome:
    """Runs the handler of this module that the task's config names (`handler`), so that tasks of one
    agent can run different placeholders."""
    name = (ctx.task.get("config") or {}).get("handler", "counter")
    return globals()[name](ctx)
