"""`cleanup`: clear the cache and old task dirs on demand, without a container.

task.config: {"cache": true, "task_dirs": true, "older_than_h": 0}
  cache         remove cache entries (images and models) not used for older_than_h hours
  task_dirs     remove the data of task dirs (logs kept) not touched for older_than_h hours,
                except this task's and those whose container still exists
"""

from __future__ import annotations

import time

from workers import cache
from workers.base import Outcome
from workers.container import docker_client, find_container
from workers.docker_task import remove_task_data


def run(ctx) -> Outcome:
    cfg = ctx.config
    opts = ctx.task.get("config") or {}
    older = float(opts.get("older_than_h") or 0) * 3600
    now = time.time()
    ctx.set_phase("running")
    removed, freed = 0, 0
    if opts.get("cache", True):
        for mtime, size, path in cache.cache_entries(cfg):
            if now - mtime >= older:
                cache.remove_entry(cfg, path)
                removed += 1
                freed += size
        ctx.log(f"cleanup: removed {removed} cache entries ({freed / cache.MB:.1f} MB)")
    dirs, dfreed = 0, 0
    if opts.get("task_dirs", True) and cfg.tasks_dir.is_dir():
        client = None
        for d in sorted(cfg.tasks_dir.iterdir()):
            if not d.is_dir() or not d.name.isdigit() or int(d.name) == ctx.task_id:
                continue
            if now - d.stat().st_mtime < older:
                continue
            if client is None:
                client = docker_client()
            if find_container(client, int(d.name), cfg.identity) is not None:
                continue  # its task is still running (or being adopted)
            dfreed += remove_task_data(d)
            dirs += 1
        ctx.log(f"cleanup: cleared {dirs} task dirs ({dfreed / cache.MB:.1f} MB; logs kept)")
    ctx.progress(1, 1)
    return Outcome("finished", exit_code=0)
