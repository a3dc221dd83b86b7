"""Task types, log streams and log levels."""

from __future__ import annotations

# `cleanup`: the agent's cache and task-dir cleanup, run in the task process, no container.
# `app`: a Supervisely App, an image whose code talks to the server through the SDK's `sly.Api`
# (the public API, server/public) with a per-task API token; no command: the image's own.
TASK_TYPES: tuple[str, ...] = ("train", "inference", "custom", "app", "cleanup")
# Types that run a container (the rest run inside the agent's task process).
CONTAINER_TYPES = frozenset({"train", "inference", "custom", "app"})
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
