"""The agent's local storage layout (DESIGN.md "Local storage") and its start-up cleaning."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from node.config import Config


def ensure_layout(config: Config) -> None:
    """Create logs/, storage/images, storage/models, tasks/, tmp/ and state/ under the root."""
    if config.token_link:
        link_token_root(Path(config.token_link), config.root)
    for d in (
        config.logs_dir,
        config.images_dir,
        config.models_dir,
        config.tasks_dir,
        config.tmp_dir,
        config.state_dir,
        log_state_dir(config),
    ):
        d.mkdir(parents=True, exist_ok=True)
    # Task logs and cursors live here; keep the tree private to this user.
    try:
        os.chmod(config.root, 0o700)
    except OSError:
        pass


def link_token_root(link: Path, root: Path) -> None:
    """Make the documented `~/.supervisely-agent/<token>` a link to the token-free root.

    A real directory there (an older agent's storage) is renamed to the root, keeping its cache
    and task logs; the link is relative, so the pair can be moved together."""
    root.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if os.path.realpath(link) == os.path.realpath(root):
            return
        link.unlink()
    elif link.is_dir():
        if root.exists():
            raise OSError(errno.EEXIST, f"both {link.parent}/<token> and {root} exist; move one away")
        os.rename(link, root)
    elif link.exists():
        raise OSError(errno.ENOTDIR, f"{link.parent}/<token> is a file, not the agent's storage")
    root.mkdir(parents=True, exist_ok=True)
    os.symlink(root.name, link)


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
