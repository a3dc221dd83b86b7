"""Task process (`sly-agent: task <id> <type> [<phase>]`): one per running task.

Builds the concrete TaskContext, calls the task type's handler (`workers.<type>.run(ctx)`),
then reports the final state, but only after the log-shipper has acked every line of the task.
A handler that raises is a failed task, not a dead process. The supervisor stops a task by
writing to this process's stop pipe; when the supervisor is gone this process exits at once
(os._exit), leaving any container running for the next agent to adopt.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import select
import sys
import threading
import time
import traceback

from agent.child import ChildBase
from agent.exitcodes import CHILD_OK, CHILD_ORPHANED
from agent.proctitle import set_title, task_title
from node import tasklog
from node.api import AgentAPI
from node.config import Config
from node.masking import Masker
from protocol.backoff import backoff_delay
from protocol.errors import APIError
from protocol.states import AGENT_REPORTABLE, LEASED, TaskState, check_transition
from workers.base import Outcome, TaskContext

log = logging.getLogger("agent.task")

HANDLER_ENV = "SLY_AGENT_HANDLER"  # tests only: package.module:function replaces every type's handler
PROGRESS_MIN_INTERVAL_S = 0.5  # at most 2 progress posts a second, always the last value
ACK_POLL_MIN_S = 0.002  # finish(): the cursor is polled every 2 ms for 0.1 s, then
ACK_POLL_FAST_S = 0.1  # backing off to 50 ms
ACK_POLL_MAX_S = 0.05
# What a handler may end with (LOST is the server's to set).
FINAL_STATES = (TaskState.FINISHED.value, TaskState.FAILED.value, TaskState.STOPPED.value)


def resolve_handler(task_type: str):
    """The callable run(ctx) -> Outcome for a task type."""
    spec = os.environ.get(HANDLER_ENV)
    if spec:
        mod, _, func = spec.partition(":")
        return getattr(importlib.import_module(mod), func or "run")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", task_type or ""):
        raise LookupError(f"invalid task type {task_type!r}")
    try:
        module = importlib.import_module(f"workers.{task_type}")
    except ModuleNotFoundError as e:
        if e.name == f"workers.{task_type}":
            raise LookupError(f"no handler for task type {task_type!r}") from None
        raise
    return module.run


class StateReporter(threading.Thread):
    """Posts phase changes in order and the latest progress (throttled); retries through outages."""

    def __init__(self, api, task_id: int, alive):
        super().__init__(name=f"state-reporter-{task_id}", daemon=True)
        self.api, self.task_id, self.alive = api, task_id, alive
        self.cond = threading.Condition()
        self.phases: list[str] = []
        self.phase: str | None = None  # last phase posted
        self.progress: dict | None = None
        self.progress_dirty = False
        self.last_progress_post = 0.0
        self.busy = False

    def put_phase(self, phase: str) -> None:
        with self.cond:
            self.phases.append(phase)
            self.cond.notify()

    def put_progress(self, current, total) -> None:
        with self.cond:
            self.progress = {"current": current, "total": total}
            self.progress_dirty = True
            self.cond.notify()

    def flush(self) -> None:
        """Wait until every queued phase and the last progress value are posted."""
        with self.cond:
            self.last_progress_post = 0.0
            self.cond.notify()
            while (self.phases or self.progress_dirty and self.phase or self.busy) and self.alive():
                self.cond.wait(0.1)

    def _next(self):
        """Under the lock: (state, progress) to post now, or a timeout to wait."""
        if self.phases:
            return (self.phases[0], self.progress), None
        if self.progress_dirty and self.phase:
            wait = self.last_progress_post + PROGRESS_MIN_INTERVAL_S - time.monotonic()
            if wait <= 0:
                return (self.phase, self.progress), None
            return None, wait
        return None, 1.0

    def run(self) -> None:
        failures = 0
        while self.alive():
            with self.cond:
                job, wait = self._next()
                if job is None:
                    self.cond.wait(wait)
                    continue
                self.busy = True
                is_phase = bool(self.phases)
                if not is_phase:
                    self.progress_dirty = False
                    self.last_progress_post = time.monotonic()
            state, progress = job
            try:
                self.api.set_state(self.task_id, state, progress=progress)
                ok = True
            except APIError as e:
                ok = e.status is not None and 400 <= e.status < 500  # refused: retrying will not help
                if ok:
                    log.warning("task %s: server refused state %s: %s", self.task_id, state, e)
                elif failures == 0:
                    log.warning("task %s: state %s not delivered (%s); retrying", self.task_id, state, e)
            with self.cond:
                self.busy = False
                if ok:
                    failures = 0
                    if is_phase:
                        self.phases.pop(0)
                        self.phase = state
                elif not is_phase:
                    self.progress_dirty = True
                self.cond.notify_all()
            if not ok:
                failures += 1
                time.sleep(backoff_delay(failures, base=0.4, cap=5.0))


class AgentTaskContext(TaskContext):
    """The agent's TaskContext (see workers/base.py for the contract)."""

    def __init__(self, proc: TaskProcess, api, stop_event: threading.Event):
        self.task = proc.task
        self.config = proc.config
        self.api = api
        self.gpus = list(proc.gpus)
        self.stop_event = stop_event
        self.adopt = proc.adopt
        self._proc = proc
        self._state = (
            TaskState(proc.task["state"])
            if proc.adopt and proc.task.get("state") in {s.value for s in LEASED}
            else TaskState.ASSIGNED
        )

    def emit(self, lines: list[dict]) -> None:
        try:
            self._proc.writer.write(lines)
        except tasklog.LogWriteError:
            # The output can no longer be recorded (a full disk): stop the task; finish() fails
            # it with writer.error once the lines that did get in are acked.
            self.stop_event.set()
        self._proc.nudge()

    def set_phase(self, phase: str) -> None:
        new = TaskState(phase)
        if new.final:
            raise ValueError(f"{phase} is a final state: return it as the handler's Outcome")
        if new not in AGENT_REPORTABLE:
            raise ValueError(f"{phase} is not a state an agent reports")
        same = new is self._state
        check_transition(self._state, new)
        self._state = new
        self._proc.set_phase_title(phase)
        if not same:
            self._proc.reporter.put_phase(phase)

    def progress(self, current: float, total: float) -> None:
        self._proc.reporter.put_progress(current, total)

    def last_log_ts_ns(self) -> int | None:
        return tasklog.last_cts(self._proc.writer.path)

    def before_final(self, fn) -> None:
        self._proc.before_final.append(fn)

    @property
    def state(self) -> TaskState:
        return self._state


class TaskProcess(ChildBase):
    """Role object: built in the supervisor (config only), run() after the fork."""

    def __init__(self, config: Config, task: dict, gpus: list[int], adopt: bool, stop_fd: int, ship_now=None):
        super().__init__()
        self.config, self.task, self.gpus, self.adopt = config, task, list(gpus), adopt
        self.task_id = int(task["id"])
        self.task_type = str(task.get("type", "?"))
        self.stop_fd = stop_fd  # read end of the supervisor's stop pipe for this task
        self.ship_now = ship_now
        self.stop_event = threading.Event()
        self._last_nudge = 0.0
        self.before_final: list = []  # the handler's work to wait for before the final state

    def set_phase_title(self, phase: str) -> None:
        set_title(task_title(self.task_id, self.task_type, phase))

    def nudge(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.ship_now is None or (not force and now - self._last_nudge < self.config.log_batch_interval_s):
            return
        self._last_nudge = now
        self.ship_now.send(self.task_id)

    def watch(self) -> None:
        """Thread: stop pipe -> stop_event; supervisor gone -> exit now; the heartbeat.

        The heartbeat comes from here, not from the handler's thread, which may block on a
        container for hours: it says the process is alive and its interpreter not stuck."""
        while True:
            self.beat()
            if not self.parent_alive():
                os._exit(CHILD_ORPHANED)
            try:
                ready, _, _ = select.select([self.stop_fd], [], [], 0.25)
            except (OSError, ValueError):
                ready = []
            if ready:
                try:
                    data = os.read(self.stop_fd, 64)
                except OSError:
                    data = b""
                if data:
                    self.stop_event.set()
                else:  # the supervisor closed its end: it is gone
                    os._exit(CHILD_ORPHANED)

    def run(self) -> int:
        self.start_in_child(task_title(self.task_id, self.task_type, "starting"))
        # The supervisor drives this process through the stop pipe, not through signals.
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        threading.Thread(target=self.watch, name="watch", daemon=True).start()
        if tasklog.is_closed(self.config, self.task_id):
            return CHILD_OK  # the final state was reported by a previous task process
        masker = Masker(*self.config.secrets)
        self.writer = tasklog.TaskLogWriter(self.config, self.task_id, masker)
        tasklog.register_active(self.config, self.task_id)
        self.nudge(force=True)
        api = AgentAPI(self.config.server_address, self.config.access_token, retries=1)
        self.reporter = StateReporter(api, self.task_id, self.parent_alive)
        self.reporter.start()
        ctx = AgentTaskContext(self, api, self.stop_event)
        outcome = self.call_handler(ctx)
        self.finish(api, ctx, outcome)
        return CHILD_OK

    def call_handler(self, ctx: AgentTaskContext) -> Outcome:
        try:
            handler = resolve_handler(self.task_type)
            outcome = handler(ctx)
        except Exception as e:  # noqa: BLE001 - a failing handler fails the task, not the agent
            tb = traceback.format_exc(limit=8)
            log.error("task %s: handler raised %s: %s", self.task_id, type(e).__name__, e)
            ctx.log(f"handler raised {type(e).__name__}: {e}\n{tb}", level="error")
            return Outcome("failed", error=f"handler raised {type(e).__name__}: {e}")
        if not isinstance(outcome, Outcome) or getattr(outcome.state, "value", outcome.state) not in FINAL_STATES:
            return Outcome("failed", error=f"handler returned {outcome!r}, not an Outcome")
        outcome.state = getattr(outcome.state, "value", outcome.state)
        return outcome

    def wait_acked(self, last: int) -> None:
        """Until the log-shipper has had every line up to seq `last` acked by the server."""
        if tasklog.acked_seq(self.config, self.task_id) >= last:
            return
        self.nudge(force=True)  # the last lines go now, not at the shipper's next tick
        delay = ACK_POLL_MIN_S
        nudged = start = time.monotonic()
        while tasklog.acked_seq(self.config, self.task_id) < last:
            if not self.parent_alive():
                os._exit(CHILD_ORPHANED)
            time.sleep(delay)
            if time.monotonic() - start >= ACK_POLL_FAST_S:  # a backlog: no need to look so often
                delay = min(ACK_POLL_MAX_S, delay * 1.5)
            if time.monotonic() - nudged >= self.config.log_batch_interval_s:
                nudged = time.monotonic()
                self.nudge(force=True)

    def finish(self, api, ctx: AgentTaskContext, outcome: Outcome) -> None:
        """Final state after every log line is acked; then the closed marker."""
        if self.writer.error:
            outcome = Outcome("failed", exit_code=outcome.exit_code, error=self.writer.error)
        if outcome.error:
            outcome.error = self.writer.masker(str(outcome.error))  # the error is sent too
        if outcome.state == TaskState.FINISHED and ctx.state in (TaskState.ASSIGNED, TaskState.PREPARING):
            ctx.set_phase(TaskState.RUNNING.value)  # the server finishes only a task that ran
        self.set_phase_title("finishing")
        ctx.log(
            f"task {outcome.state}" + (f": {outcome.error}" if outcome.error else ""),
            level="info" if outcome.state == "finished" else "warning",
        )
        self.reporter.flush()
        self.wait_acked(self.writer.seq)
        # The handler's work still running (the container's removal) ends before the final
        # state; what it logged meanwhile is shipped too.
        while self.before_final:
            self.before_final.pop(0)()
        if self.writer.error:  # the container's removal may have been what failed the writer
            outcome = Outcome("failed", exit_code=outcome.exit_code, error=self.writer.masker(self.writer.error))
        self.writer.close()
        self.wait_acked(self.writer.seq)
        failures = 0
        while True:
            try:
                api.set_state(self.task_id, outcome.state, exit_code=outcome.exit_code, error=outcome.error)
                break
            except APIError as e:
                if e.status is not None and 400 <= e.status < 500:
                    log.warning("task %s: server refused final state %s: %s", self.task_id, outcome.state, e)
                    break
                failures += 1
                if not self.parent_alive():
                    os._exit(CHILD_ORPHANED)
                time.sleep(backoff_delay(failures, base=0.4, cap=5.0))
        tasklog.mark_closed(self.config, self.task_id, outcome.state)
        log.info("task %s: %s", self.task_id, outcome.state)


def run_task_process(role: TaskProcess) -> None:
    """multiprocessing target; the role object was built in the supervisor before the fork."""
    sys.exit(role.run())
