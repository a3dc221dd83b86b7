"""A TaskContext for testing the handlers directly: lines go into a list, phases and progress
go to the real server through node.api.AgentAPI with a real agent token."""

from __future__ import annotations

import threading

from node.api import AgentAPI
from node.config import Config
from workers.base import TaskContext


class TestContext(TaskContext):
    __test__ = False

    def __init__(self, task: dict, config: Config, gpus=(), adopt: bool = False, last_cts: int | None = None):
        self.task = task
        self.config = config
        self.api = AgentAPI(config.server_address, config.access_token, retries=1)
        self.gpus = list(gpus)
        self.stop_event = threading.Event()
        self.adopt = adopt
        self.lines: list[dict] = []
        self.phases: list[str] = []
        self.progress_values: list[tuple] = []
        self._last_cts = last_cts
        self._lock = threading.Lock()

    def emit(self, lines: list[dict]) -> None:
        with self._lock:
            self.lines.extend(lines)

    def set_phase(self, phase: str) -> None:
        if self.phases and self.phases[-1] == phase:
            return
        self.phases.append(phase)
        self.api.set_state(self.task_id, phase)

    def progress(self, current: float, total: float) -> None:
        self.progress_values.append((current, total))

    def last_log_ts_ns(self) -> int | None:
        return self._last_cts

    # --- test helpers ---
    def messages(self, stream: str | None = None) -> list[str]:
        with self._lock:
            return [ln["message"] for ln in self.lines if stream is None or ln["stream"] == stream]

    def container_lines(self) -> list[dict]:
        with self._lock:
            return [ln for ln in self.lines if ln["stream"] != "agent"]
