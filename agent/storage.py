"""The agent's local storage layout (DESIGN.md "Local storage") and its start-up cleaning."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.config import Config


def ensure_layout(config: Config) -> None:
    """Create logs/, storage/images, storage/models, tasks/, tmp/ and state/ under the root."""
    for d in (config.logs_dir, config.images_dir, config.models_dir, config.tasks_dir,
              config.tmp_dir, config.state_dir, log_state_dir(config)):
        d.mkdir(parents=True, exist_ok=True)
    # The token is part of the default root's name; keep the tree private to this user.
    try:
        os.chmod(config.root, 0o700)
    except OSError:
        pass


def wipe_tmp(config: Config) -> None:
    """Remove everything under tmp/ (partial downloads of a previous run)."""
    tmp = config.tmp_dir
    if not tmp.is_dir():
        return
    for entry in tmp.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:
                pass


def log_state_dir(config: Config) -> Path:
    """state/logs: the log-shipper's acked cursors and the task processes' closed markers."""
    return config.state_dir / "logs"


def task_logs_dir(config: Config, task_id: int) -> Path:
    return config.task_dir(task_id) / "logs"
