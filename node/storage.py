"""The agent's local storage layout (DESIGN.md "Local storage") and its start-up cleaning."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from node.config import Config


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
        remove_path(entry)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a whole folder; already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def log_state_dir(config: Config) -> Path:
    """state/logs: the log-shipper's acked cursors and the task processes' closed markers."""
    return config.state_dir / "logs"


def task_logs_dir(config: Config, task_id: int) -> Path:
    return config.task_dir(task_id) / "logs"
