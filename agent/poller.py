"""Thread `poller`: the long-poll. It offers the latest snapshot, hands each answer to the main
thread and waits until that answer is handled, so the next poll carries the running list the
answer produced (the server never hands a task out twice)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import NamedTuple

from protocol.backoff import backoff_delay

log = logging.getLogger("agent.supervisor")

POLL_BACKOFF_BASE_S, POLL_BACKOFF_CAP_S = 0.5, 30.0
BUSY_WAIT_S = 1.0  # no free slot: poll with at most this wait, so a freed slot is announced soon


class Snapshot(NamedTuple):
    """What the next poll tells the server; published by the main thread."""

    free_slots: int
    free_gpus: list[int]
    running: list[int]
    refusing: str


class Poller:
    def __init__(self, api, config_fn, wake, stop: threading.Event):
        self.api = api
        self.config_fn = config_fn  # the current Config (SIGHUP replaces it)
        self.wake = wake  # wakes the main thread's wait
        self.stop = stop
        self._lock = threading.Lock()
        self._snapshot = Snapshot(0, [], [], "")
        self._answers: queue.Queue = queue.Queue()
        self._answered = threading.Event()

    # --- main thread side
    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    @property
    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def next_answer(self) -> dict | None:
        try:
            return self._answers.get_nowait()
        except queue.Empty:
            return None

    def answered(self) -> None:
        """The answer is handled and the snapshot published: the next poll may go."""
        self._answered.set()

    # --- the thread
    def run(self) -> None:
        from protocol.errors import APIError, AuthError

        failures = 0
        while not self.stop.is_set():
            snap = self.snapshot
            config = self.config_fn()
            wait = config.poll_wait_s if snap.free_slots > 0 else min(config.poll_wait_s, BUSY_WAIT_S)
            try:
                answer = self.api.poll(snap.free_slots, snap.free_gpus, snap.running, wait=wait, refusing=snap.refusing)
            except APIError as e:
                failures += 1
                delay = backoff_delay(failures, POLL_BACKOFF_BASE_S, POLL_BACKOFF_CAP_S)
                if failures == 1 or isinstance(e, AuthError):
                    log.error("poll failed: %s; retrying in %.1fs", e, delay)
                self.stop.wait(delay)
                continue
            if failures:
                log.info("poll works again after %d failures", failures)
            failures = 0
            self._answered.clear()
            self._answers.put(answer)
            self.wake()
            while not self._answered.wait(0.5):
                if self.stop.is_set():
                    return
