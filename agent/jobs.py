"""Thread `jobs`: the supervisor's blocking work, off its main thread.

Final states of dead task processes (with retries), FATAL reports, disk checks and orphan
container reaping run here. A job may return a callback; callbacks run back in the main thread
(`run_callbacks`, from `loop_once`), so the supervisor's state has one writer.
"""

from __future__ import annotations

import logging
import queue

log = logging.getLogger("agent.supervisor")


class Jobs:
    def __init__(self, wake):
        self.wake = wake
        self._jobs: queue.Queue = queue.Queue()  # main -> jobs thread (callables)
        self._done: queue.Queue = queue.Queue()  # jobs thread -> main (callbacks)

    def submit(self, job) -> None:
        self._jobs.put(job)

    def pending(self) -> int:
        return self._jobs.qsize()

    def run_one(self, job) -> None:
        try:
            callback = job()
        except Exception:  # noqa: BLE001 - one failed job must not end the thread
            log.exception("background job failed")
            callback = None
        if callback is not None:
            self._done.put(callback)
            self.wake()

    def run(self) -> None:
        while True:
            self.run_one(self._jobs.get())

    def run_pending(self) -> int:
        """Run the queued jobs in the calling thread (tests drive the thread's work this way)."""
        n = 0
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return n
            self.run_one(job)
            n += 1

    def run_callbacks(self) -> None:
        while True:
            try:
                callback = self._done.get_nowait()
            except queue.Empty:
                return
            callback()
