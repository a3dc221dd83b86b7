"""What every child of the supervisor does first after the fork: defend itself."""

from __future__ import annotations

import os
import signal
import threading
import time

from agent.proctitle import set_title


class ChildBase:
    """Common start of a child: title, own process group, signals, parent-death check.

    `__init__` holds config only (built before the fork); `start_in_child()` runs after it.
    """

    title = "child"

    def __init__(self):
        self.parent_pid = os.getpid()  # set before the fork: the supervisor's pid
        self.stopping = threading.Event()
        self.heartbeat = None  # a shared double (RawValue) the supervisor watches

    def start_in_child(self, title: str | None = None) -> None:
        # The supervisor's wakeup fd and handlers came along with the fork; drop them first.
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's business
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        set_title(title or self.title)

    def _on_sigterm(self, signum, frame):  # only sets a flag
        self.stopping.set()

    def beat(self) -> None:
        """Tell the supervisor this process is not hung (CLOCK_MONOTONIC is system-wide)."""
        if self.heartbeat is not None:
            self.heartbeat.value = time.monotonic()

    def parent_alive(self) -> bool:
        """False once the supervisor is gone (we were re-parented)."""
        return os.getppid() == self.parent_pid
