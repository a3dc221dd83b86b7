"""Task types, log streams and log levels."""

from __future__ import annotations

# `cleanup`: the agent's cache and task-dir cleanup, run in the task process, no container.
TASK_TYPES: tuple[str, ...] = ("train", "inference", "custom", "cleanup")
# Types that run a container (the rest run inside the agent's task process).
CONTAINER_TYPES = frozenset({"train", "inference", "custom"})
# A train/inference task without a command runs the real Supervisely agent's entry point.
DEFAULT_ENTRYPOINTS = {
    "train": ["python", "-u", "/workdir/src/train.py"],
    "inference": ["python", "-u", "/workdir/src/inference.py"],
}

# A log line's `stream`. Only the agent writes AGENT; container output never claims it.
STDOUT, STDERR, AGENT = "stdout", "stderr", "agent"
STREAMS = frozenset({STDOUT, STDERR, AGENT})
CONTAINER_STREAMS = frozenset({STDOUT, STDERR})
LEVELS = ("debug", "info", "warning", "error")
