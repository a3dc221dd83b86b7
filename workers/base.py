"""The contract between the agent's task process and a task-type handler.

The agent's task process (agent/task_process.py) builds a `TaskContext` after the fork and calls
`workers.<type>.run(ctx)`; the handler returns an `Outcome`. The task process then reports the
final state, but only after every log line of the task has been acked by the server.

Handlers never talk to the supervisor directly and never post a final state themselves.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.tasks import AGENT

if TYPE_CHECKING:  # pragma: no cover
    from node.api import AgentAPI
    from node.config import Config


@dataclasses.dataclass
class Outcome:
    """What a handler ended with. `state` is one of finished, failed, stopped."""

    state: str
    exit_code: int | None = None
    error: str | None = None


class TaskContext(abc.ABC):
    """What a handler may use. Implemented by the agent (agent/task_process.py) and by tests."""

    task: (
        dict  # the task as in the poll answer (id, type, image, command, config, project, model, resources, timeout_s)
    )
    config: Config  # agent settings; config.host_path() translates paths for bind mounts
    api: AgentAPI  # HTTP client, created in this process
    gpus: list[int]  # GPU indices assigned to this task alone (may be empty)
    stop_event: threading.Event  # set when the server or the agent asks this task to stop
    adopt: bool  # True: the task's container may already be running (agent restart / task
    # process replaced); attach to it instead of creating a new one

    @property
    def task_id(self) -> int:
        return int(self.task["id"])

    @property
    def task_dir(self) -> Path:
        return self.config.task_dir(self.task_id)

    @abc.abstractmethod
    def emit(self, lines: list[dict]) -> None:
        """Append log lines to the task's durable log; the log-shipper sends them to the server.

        Each line: {"ts": float epoch seconds, "level": "debug|info|warning|error",
        "stream": "stdout|stderr|agent", "message": str, ...extra structured fields}.
        Call with batches for throughput. Thread-safe.
        """

    def log(self, message: str, level: str = "info", **extra) -> None:
        """One line of what the agent itself says about the task (stream "agent")."""
        import time

        self.emit([{"ts": time.time(), "level": level, "stream": AGENT, "message": message, **extra}])

    def before_final(self, fn) -> None:
        """`fn()` must have returned before the task's final state is reported (e.g. the join of
        the container's removal, started in the background). Here it runs at once; the agent's
        task process runs it while the task's last log lines are shipped, then reports."""
        fn()

    @abc.abstractmethod
    def set_phase(self, phase: str) -> None:
        """Enter a phase: preparing, running, uploading. Updates the process title and reports
        the state to the server (preparing/running/uploading are task states)."""

    @abc.abstractmethod
    def progress(self, current: float, total: float) -> None:
        """Report task progress (throttled by the implementation)."""

    @abc.abstractmethod
    def last_log_ts_ns(self) -> int | None:
        """When adopting: the container timestamp (ns since epoch) of the last container line
        already in the durable log, so that reading resumes after it with no gap or duplicate."""
