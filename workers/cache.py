"""The content-addressed cache under storage/: where a blob lives, its last use, disk space, eviction.

    storage/images/<h[0:2]>/<h[2:5]>/<h><.ext>    one file per blob (h = its sha256)
    storage/models/<h[0:2]>/<h[2:5]>/<h>/...      one folder per model (h = the model's hash)

A cache entry's last use is its mtime (touched each time it is linked into a task dir; atime is
unreliable under relatime/noatime). Evicting an entry never breaks a running task: its files are
hard links (or copies) in the task dir, so the bytes stay until the task dir goes.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from node.config import Config
from node.storage import remove_path

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MB = 1024 * 1024


class DiskError(RuntimeError):
    """Not enough disk for a task, even after evicting the cache."""


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return sha


def image_path(config: Config, sha: str, name: str) -> Path:
    """Cache path of an item blob: the extension of the item's name is kept (tools look at it)."""
    check_sha(sha)
    ext = os.path.splitext(name)[1].lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,10}", ext):
        ext = ""
    return config.images_dir / sha[0:2] / sha[2:5] / (sha + ext)


def model_dir(config: Config, model_hash: str) -> Path:
    check_sha(model_hash)
    return config.models_dir / model_hash[0:2] / model_hash[2:5] / model_hash


def touch(path: Path) -> None:
    """Mark a cache entry as used now (LRU)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_mb(config: Config) -> float:
    return shutil.disk_usage(_existing(config.root)).free / MB


def disk_status(config: Config) -> dict:
    """{free_mb, ok, reason}: whether there is room for a new task (the supervisor asks this)."""
    free = free_mb(config)
    ok = free >= config.min_free_disk_mb
    reason = "" if ok else (f"not enough disk: {free:.0f} MB free under {config.root}, "
                            f"{config.min_free_disk_mb} MB required (MIN_FREE_DISK_MB)")
    return {"free_mb": round(free, 1), "ok": ok, "reason": reason}


def _entry_size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def cache_entries(config: Config) -> list[tuple[float, int, Path]]:
    """Every cache entry as (last use, bytes, path), least recently used first."""
    entries = []
    for p in config.images_dir.glob("??/???/*"):
        try:
            entries.append((p.stat().st_mtime, _entry_size(p), p))
        except OSError:
            pass
    for p in config.models_dir.glob("??/???/*"):
        try:
            entries.append((p.stat().st_mtime, _entry_size(p), p))
        except OSError:
            pass
    entries.sort(key=lambda e: e[0])
    return entries


def remove_entry(path: Path) -> None:
    """Remove one cache entry (an image file or a model folder)."""
    remove_path(path)


def ensure_space(config: Config, need_bytes: int = 0, log=None, keep: set | None = None) -> dict:
    """Evict least-recently-used entries until MIN_FREE_DISK_MB (+ need) is free and the cache,
    with `need_bytes` more, fits CACHE_QUOTA_MB. Raises DiskError if it cannot. Returns a summary."""
    keep = keep or set()
    need_mb = need_bytes / MB
    entries = None
    evicted, freed = 0, 0

    def short() -> str:
        free = free_mb(config)
        if free < config.min_free_disk_mb + need_mb:
            return (f"not enough disk: {free:.0f} MB free under {config.root}, {config.min_free_disk_mb} MB "
                    f"(MIN_FREE_DISK_MB) + {need_mb:.0f} MB for this task's downloads required")
        if config.cache_quota_mb > 0:
            used = sum(e[1] for e in entries) / MB
            if used + need_mb > config.cache_quota_mb:
                return (f"cache quota exceeded: {used:.0f} MB cached + {need_mb:.0f} MB to download "
                        f"> CACHE_QUOTA_MB={config.cache_quota_mb}")
        return ""

    if config.cache_quota_mb <= 0 and free_mb(config) >= config.min_free_disk_mb + need_mb:
        return {"evicted": 0, "freed_bytes": 0}       # the usual case: no need to scan the cache
    entries = cache_entries(config)
    reason = short()
    while reason:
        victims = [e for e in entries if e[2] not in keep]
        if not victims:
            raise DiskError(reason)
        victim = victims[0]
        entries.remove(victim)
        remove_entry(victim[2])
        evicted += 1
        freed += victim[1]
        reason = short()
    if evicted and log:
        log(f"cache: evicted {evicted} least recently used entries ({freed / MB:.1f} MB)")
    return {"evicted": evicted, "freed_bytes": freed}
