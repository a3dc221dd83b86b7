"""A task container's output -> the task log, in batches, while the container runs.

The output is read from the container's json-file log when this process can read it, else from
the Engine's log endpoint (`follow=1&timestamps=1`) in large socket reads; our own frame decoder
(workers/logparse.py) gives every line its container timestamp `cts`, so a re-attaching task
process resumes right after the last line in the durable log.
"""

from __future__ import annotations

import collections
import os
import threading
import time

import docker

from workers.http_stream import body_chunks
from workers.logparse import FrameDecoder

BATCH_LINES = 1000
BATCH_INTERVAL_S = 0.05
READ_SIZE = 1 << 20
LOG_SOURCE_ENV = "SLY_LOG_SOURCE"  # "api": always read the log through the Engine (tests, debugging)
FILE_POLL_S = 0.01
FILE_QUIET_READS = 2  # empty reads 10 ms apart after the exit: the log is complete


class LogPump(threading.Thread):
    """Thread: the container's output -> ctx.emit batches (<= BATCH_LINES lines, <= 50 ms old)."""

    def __init__(self, ctx, client, container, since_ns: int | None = None, on_event=None, tail_lines: int = 20):
        super().__init__(name="log-pump", daemon=True)
        self.ctx, self.client, self.container = ctx, client, container
        self.since_ns = since_ns
        self.on_event = on_event
        self.tail = collections.deque(maxlen=tail_lines)
        self.lines = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()  # the batch; emits happen under it, so lines stay in order
        self.batch: list = []
        self.first_pending = 0.0
        self.done = False

    def _open(self, since_ns: int | None, follow: bool):
        api = self.client.api
        params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow)}
        if since_ns:
            params["since"] = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        r = api._get(api._url("/containers/{0}/logs", self.container.id), params=params, stream=True, timeout=None)
        api._raise_for_status(r)
        return r

    def run(self) -> None:
        try:
            self._pump()
        except BaseException as e:  # noqa: BLE001 - the handler reports it
            self.error = e

    def _pump(self) -> None:
        ctx = self.ctx

        def on_event(line):
            if line.get("event_type") == "progress":
                cur, tot = line.get("current"), line.get("total")
                if isinstance(cur, (int, float)) and isinstance(tot, (int, float)):
                    ctx.progress(cur, tot)
            if self.on_event is not None:
                self.on_event(line)

        decoder = FrameDecoder(skip_until_ns=self.since_ns, on_event=on_event)
        ticker = threading.Thread(target=self._tick, name="log-flush", daemon=True)
        ticker.start()
        follow = True
        try:
            path = self._log_file() if os.environ.get(LOG_SOURCE_ENV) != "api" else None
            if path is not None:
                decoder.resume_since()
                self._read_file(path, decoder)
                return
            while True:
                self._read(self._open(decoder.resume_since(), follow), decoder)
                if not follow:
                    break
                # The engine (20.10, json-file) may end a follow stream when the container exits
                # before it has sent everything: once the container is down, read the rest plainly.
                try:
                    self.container.reload()
                except docker.errors.NotFound:
                    break
                if self.container.status not in ("running", "paused", "restarting"):
                    follow = False
        finally:
            rest: list = []
            decoder.finish(rest)
            with self.lock:
                self.batch.extend(rest)
                self._flush_locked()
                self.done = True

    def _log_file(self) -> str | None:
        """The container's json-file log, when this process can read it and it never rotates.

        Reading it directly spares the Engine the cost of serving the log over its API (about
        2 CPU-seconds per 300,000 lines on the test box) and keeps each line's stamp. An agent in
        a container without the Engine's data dir mounted reads through the API instead."""
        try:
            self.container.reload()
        except docker.errors.APIError:
            return None
        attrs = self.container.attrs
        log_config = (attrs.get("HostConfig") or {}).get("LogConfig") or {}
        path = attrs.get("LogPath") or ""
        if log_config.get("Type") != "json-file" or (log_config.get("Config") or {}).get("max-size"):
            return None
        if not path or not os.access(path, os.R_OK):
            return None
        return path

    def _read_file(self, path: str, decoder: FrameDecoder) -> None:
        """Follow the log file until the container has exited and the file has stopped growing."""
        exited = threading.Event()

        def wait_exit():
            try:
                self.container.wait()
            except Exception:  # noqa: BLE001 - the container is gone: nothing more comes
                pass
            exited.set()

        threading.Thread(target=wait_exit, name="log-exit", daemon=True).start()
        quiet_after_exit = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(READ_SIZE)
                if data:
                    quiet_after_exit = 0
                    out: list = []
                    decoder.feed_jsonfile(data, out)
                    if out:
                        self._push(out)
                    continue
                if exited.is_set():
                    # The Engine writes the last lines while it handles the exit: read until
                    # the file has been quiet for a while.
                    quiet_after_exit += 1
                    if quiet_after_exit >= FILE_QUIET_READS:
                        return
                    time.sleep(FILE_POLL_S)
                else:
                    exited.wait(FILE_POLL_S)  # the exit wakes this at once (the quiet reads start)

    def _push(self, out: list) -> None:
        with self.lock:
            if not self.batch:
                self.first_pending = time.monotonic()
            self.batch.extend(out)
            if len(self.batch) >= BATCH_LINES:
                self._flush_locked()

    def _read(self, r, decoder: FrameDecoder) -> None:
        try:
            for data in body_chunks(r, READ_SIZE):
                out: list = []
                decoder.feed(data, out)
                if out:
                    self._push(out)
        finally:
            r.close()

    def _tick(self) -> None:
        """Thread: a line never waits more than about BATCH_INTERVAL_S for its batch to fill."""
        while True:
            time.sleep(BATCH_INTERVAL_S / 2)
            with self.lock:
                if self.done:
                    return
                if self.batch and time.monotonic() - self.first_pending >= BATCH_INTERVAL_S:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        self.lines += len(batch)
        self.tail.extend(line["message"] for line in batch[-self.tail.maxlen :])
        self.ctx.emit(batch)
