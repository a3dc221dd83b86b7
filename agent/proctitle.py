"""The one setproctitle wrapper: every agent process is `sly-agent: <role>`."""

from __future__ import annotations

PREFIX = "sly-agent: "


def set_title(role: str) -> None:
    """Set this process's title to `sly-agent: <role>` (best effort)."""
    try:
        import setproctitle

        setproctitle.setproctitle(PREFIX + role)
    except Exception:  # noqa: BLE001 - a missing title never stops the agent
        pass


def task_title(task_id: int, task_type: str, phase: str) -> str:
    """The role string of a task process, e.g. `task 14 train [downloading]`."""
    return f"task {task_id} {task_type} [{phase}]"
