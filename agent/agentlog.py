"""The agent's own log: `logs/log_<YYYY-MM-DD_HH:MM:SS>.txt` plus stderr, masked, all processes.

The supervisor opens the file (O_APPEND) and stderr before forking; every child inherits both
handlers and writes its records itself, one write() per record, which O_APPEND places at the
end of the file whole. No lock is shared between processes, so a child killed at any moment
cannot leave the others stuck. multiprocessing-logging is NOT used: its queue's cross-process
write lock, held by a child that is killed with SIGKILL, makes every later child hang at exit
(tests/agent/test_agentlog.py shows it; docs/architecture.md explains).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from node.config import Config
from node.masking import Masker

FORMAT = "%(asctime)s %(levelname)s %(processName)s[%(process)d] %(name)s: %(message)s"


class MaskingFormatter(logging.Formatter):
    """Formats a record, then masks the token and secret-looking values in the whole text."""

    def __init__(self, masker: Masker, fmt: str = FORMAT):
        super().__init__(fmt)
        self.masker = masker

    def format(self, record: logging.LogRecord) -> str:
        return self.masker(super().format(record))


class StderrGate(logging.Filter):
    """Keeps stderr quiet until the agent has connected: a start-up failure is one line there."""

    open = False

    def filter(self, record: logging.LogRecord) -> bool:
        return StderrGate.open


def open_stderr() -> None:
    StderrGate.open = True


def _acquire_handlers() -> None:
    for h in logging.getLogger().handlers:
        h.acquire()


def _release_handlers() -> None:
    for h in logging.getLogger().handlers:
        h.release()


_fork_hook_installed = False


def install_fork_hook() -> None:
    """Fork only while no thread is inside a handler's write.

    logging re-creates its handler locks in a forked child, but not the lock inside the handler's
    stream (an io.BufferedWriter): a thread of the supervisor caught mid-write at fork time leaves
    it taken, and the child hangs on its first log record (tests/agent/test_agentlog.py shows 17
    of 20 children hung without this). Holding every root handler's lock across the fork makes
    the forking thread wait for a write in progress to end.
    """
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_acquire_handlers, after_in_parent=_release_handlers)
        _fork_hook_installed = True


def setup_logging(config: Config, masker: Masker) -> Path:
    """Log to the agent's log file and (once connected) stderr; return the file's path."""
    path = config.logs_dir / time.strftime("log_%Y-%m-%d_%H:%M:%S.txt", time.localtime())
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = MaskingFormatter(masker)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.addFilter(StderrGate())
    for h in (logging.FileHandler(path, encoding="utf-8"), stderr):
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(getattr(logging, str(config.log_level).upper(), logging.INFO))
    install_fork_hook()
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path
