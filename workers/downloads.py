"""Fetch a task's project and model into the cache, then lay them out in the task dir.

Each blob is fetched once: into tmp/<sha>.part (resumed with Range after an interruption),
verified against its sha256, made read-only, renamed atomically into storage/ and recorded
(workers/cache.py), then hard-linked (copied across filesystems) into the task dir, as the real
Supervisely agent lays it out:

    data/<project name>/meta.json, <ds>/img/<item>, <ds>/ann/<item>.json
    model/<path>                     the model's files at model/'s root

Hard links go only under data/ and model/, which the container gets read-only. A cached file is
reused only while it matches its record; otherwise it is fetched again. A per-blob lock file
lets two tasks needing the same blob at the same moment fetch it once, with no lock shared by
anything else.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache, sly_format
from workers.errors import StopRequested, TaskError

BLOB_TRIES = 3
PROGRESS_EVERY_S = 1.0


def safe_relpath(name, what: str) -> str:
    """A relative POSIX path that stays where it is put, or TaskError."""
    if not isinstance(name, str) or not name:
        raise TaskError(f"unsafe {what} {name!r}: empty")
    if "\x00" in name or "\\" in name:
        raise TaskError(f"unsafe {what} {name!r}: NUL or backslash")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", ".", "") for part in name.split("/")):
        raise TaskError(f"unsafe {what} {name!r}: absolute, empty, '.' or '..' component")
    return name


def safe_name(name, what: str) -> str:
    safe_relpath(name, what)
    if "/" in name:
        raise TaskError(f"unsafe {what} {name!r}: contains '/'")
    return name


class Job:
    """One file the task needs: its blob, where it is cached, where it goes in the task dir."""
    __slots__ = ("sha", "size", "cache_path", "dest", "label", "ann")

    def __init__(self, sha, size, cache_path, dest, label, ann=None):
        self.sha, self.size, self.cache_path, self.dest, self.label = sha, size, cache_path, dest, label
        self.ann = ann          # a project item: the annotation JSON the server sent (None: none)


def project_dir(ctx) -> Path | None:
    """tasks/<id>/data/<project name>, or None when the task has no project."""
    project = ctx.task.get("project")
    if not project:
        return None
    return ctx.task_dir / "data" / safe_name(project.get("name"), "project name")


def plan(ctx) -> list[Job]:
    """Every file of the task's project and model, with its paths checked."""
    task, cfg = ctx.task, ctx.config
    jobs: list[Job] = []
    project = task.get("project")
    if project:
        pdir = project_dir(ctx)
        seen_ds: set[str] = set()
        for ds in project.get("datasets") or []:
            dname = safe_name(ds.get("name"), "dataset name")
            if dname in seen_ds:
                raise TaskError(f"dataset {dname!r} appears twice in project {project.get('name')!r}")
            seen_ds.add(dname)
            for item in ds.get("items") or []:
                iname = safe_name(item.get("name"), "item name")
                sha = _sha(item.get("sha256"), iname)
                jobs.append(Job(sha, int(item.get("size") or 0), cache.image_path(cfg, sha, iname),
                                pdir / dname / "img" / iname, f"{dname}/{iname}", ann=item.get("ann")))
    model = task.get("model")
    if model:
        mhash = _sha(model.get("hash"), "model hash")
        mdir = cache.model_dir(cfg, mhash)
        for f in model.get("files") or []:
            fpath = safe_relpath(f.get("path"), "model file path")
            sha = _sha(f.get("sha256"), fpath)
            jobs.append(Job(sha, int(f.get("size") or 0), mdir / fpath, ctx.task_dir / "model" / fpath,
                            f"model/{fpath}"))
    return jobs


def write_project_files(ctx, jobs: list[Job]) -> int:
    """meta.json and every item's ann/<item>.json; returns how many items got an empty annotation."""
    pdir = project_dir(ctx)
    if pdir is None:
        return 0
    pdir.mkdir(parents=True, exist_ok=True)
    meta = ctx.task["project"].get("meta")
    _write_text(pdir / "meta.json", sly_format.dumps(meta if isinstance(meta, dict) else sly_format.EMPTY_META))
    for ds in ctx.task["project"].get("datasets") or []:
        (pdir / ds["name"] / "img").mkdir(parents=True, exist_ok=True)
        (pdir / ds["name"] / "ann").mkdir(parents=True, exist_ok=True)
    unknown, empty = [], 0
    for job in jobs:
        if job.ann is not None or not job.dest.is_relative_to(pdir):
            if job.ann is not None:
                _write_text(job.dest.parent.parent / "ann" / (job.dest.name + ".json"), sly_format.dumps(job.ann))
            continue
        with open(job.dest, "rb") as f:
            size = sly_format.image_size(f.read(sly_format.HEADER_BYTES))
        if size is None:
            unknown.append(job.label)
        empty += 1
        ann = sly_format.empty_ann(*(size or (None, None)))
        _write_text(job.dest.parent.parent / "ann" / (job.dest.name + ".json"), sly_format.dumps(ann))
    if unknown:
        ctx.log(f"{len(unknown)} items without an annotation are not images whose size could be read "
                f"(e.g. {unknown[0]}); their empty annotations have no size", level="warning")
    return empty


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _sha(value, what) -> str:
    try:
        return cache.check_sha(value)
    except ValueError:
        raise TaskError(f"{what}: {value!r} is not a sha256") from None


def link_into(src: Path, dest: Path, made_dirs: set | None = None) -> None:
    """Hard link src at dest (replacing what is there); copy when they are on different filesystems."""
    parent = dest.parent
    if made_dirs is None or parent not in made_dirs:
        parent.mkdir(parents=True, exist_ok=True)
        if made_dirs is not None:
            made_dirs.add(parent)
    try:
        os.link(src, dest)
    except FileExistsError:
        os.unlink(dest)
        os.link(src, dest)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(src, dest)
        os.chmod(dest, 0o444)


class Downloader:
    """Fetch the planned blobs of one task (bounded pool) and link them into its task dir."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config
        self.lock = threading.Lock()
        self.done_files = 0
        self.done_bytes = 0          # bytes fetched over the network by this task
        self.total_files = 0
        self.last_report = 0.0
        self.made_dirs: set = set()       # folders known to exist (saves a mkdir per file)

    def prepare(self, jobs: list[Job]) -> dict:
        """Returns {"files", "cached", "fetched", "bytes"}."""
        ctx = self.ctx
        self.total_files = len(jobs)
        missing: list[Job] = []
        keep = set()
        changed = []
        verdicts: dict[Path, bool] = {}
        for job in jobs:
            ok = verdicts.get(job.cache_path)
            if ok is None:
                ok = verdicts[job.cache_path] = cache.verify(self.cfg, job.cache_path, job.sha, job.size)
                if not ok and job.cache_path.exists():
                    changed.append(job.label)
            if ok:
                keep.add(_entry_of(self.cfg, job.cache_path))
            else:
                missing.append(job)
        if changed:
            ctx.log(f"cache: {len(changed)} cached files changed since they were stored or have no record "
                    f"(e.g. {changed[0]}); downloading them again", level="warning")
        need = sum(j.size for j in {j.cache_path: j for j in missing}.values())
        cache.ensure_space(self.cfg, need, log=ctx.log, keep=keep)
        cached = len(jobs) - len(missing)
        if missing:
            ctx.log(f"downloading {len(missing)} of {len(jobs)} files ({need / cache.MB:.1f} MB); "
                    f"{cached} cached")
        # Cached files first, in this thread: a link costs less than a pool hand-off.
        touched = set()
        missing_ids = {id(j) for j in missing}
        for job in jobs:
            if id(job) not in missing_ids:
                self._link(job, touched)
        self.done_files = cached
        if missing:
            self._fetch_all(missing, touched)
        self._report(force=True)
        return {"files": len(jobs), "cached": cached, "fetched": len(missing), "bytes": self.done_bytes}

    def _link(self, job: Job, touched: set) -> None:
        entry = _entry_of(self.cfg, job.cache_path)
        if entry not in touched:
            cache.touch(self.cfg, entry)
            touched.add(entry)
        link_into(job.cache_path, job.dest, self.made_dirs)

    def _fetch_all(self, missing: list[Job], touched: set) -> None:
        errors: list[BaseException] = []
        by_blob: dict[Path, list[Job]] = {}
        for job in missing:
            by_blob.setdefault(job.cache_path, []).append(job)

        def work(group: list[Job]):
            if errors or self.ctx.stop_event.is_set():
                return
            try:
                self.fetch(group[0])
                for job in group:
                    self._link(job, touched)
                with self.lock:
                    self.done_files += len(group)
                self._report()
            except BaseException as e:  # noqa: BLE001 - reported once, below
                errors.append(e)

        self.cfg.tmp_dir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.download_workers), thread_name_prefix="dl") as pool:
            list(pool.map(work, by_blob.values()))
        if errors:
            raise errors[0]
        if self.ctx.stop_event.is_set():
            raise StopRequested()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if not force and now - self.last_report < PROGRESS_EVERY_S:
                return
            self.last_report = now
            files, mb = self.done_files, self.done_bytes / cache.MB
        self.ctx.log(f"downloading {files}/{self.total_files} files, {mb:.1f} MB")
        self.ctx.progress(files, self.total_files)

    def fetch(self, job: Job) -> None:
        """Blob -> tmp -> verified -> cache path. Safe when another task fetches the same blob."""
        sha, final = job.sha, job.cache_path
        tmp_dir = self.cfg.tmp_dir
        part = tmp_dir / f"{sha}.part"
        lock_path = tmp_dir / f"{sha}.lock"
        try:
            lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except FileNotFoundError:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if cache.verify(self.cfg, final, sha, job.size):
                return                      # another task fetched it while we waited
            mismatches = 0
            failures = 0
            while True:
                if self.ctx.stop_event.is_set():
                    raise StopRequested()
                try:
                    digest = self._download(sha, part, job.size)
                except (APIError, OSError) as e:
                    failures += 1
                    if failures >= BLOB_TRIES + 2:
                        raise TaskError(f"download of {job.label} (blob {sha[:12]}) failed: {e}") from None
                    time.sleep(backoff_delay(failures, base=0.2, cap=2.0))
                    continue                # the .part is kept: the next try resumes with Range
                if digest == sha:
                    break
                part.unlink(missing_ok=True)
                mismatches += 1
                if mismatches >= BLOB_TRIES:
                    raise TaskError(f"download of {job.label} failed: the server's bytes do not match "
                                    f"sha256 {sha} ({BLOB_TRIES} tries); nothing was cached")
            if final.parent not in self.made_dirs:
                final.parent.mkdir(parents=True, exist_ok=True)
                self.made_dirs.add(final.parent)
            os.chmod(part, 0o444)
            try:
                os.replace(part, final)     # a new inode: task dirs linking a changed one keep theirs
            except FileNotFoundError:       # its folder was evicted by another task meanwhile
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(part, final)
            cache.write_record(self.cfg, final, sha)
            # Whoever waits on this lock finds the blob in place; a newcomer makes a new lock file.
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(lock_fd)

    def _download(self, sha: str, part: Path, size: int) -> str:
        """GET the blob into `part` (resuming what is there with Range); returns the file's sha256."""
        def count(n: int) -> None:
            with self.lock:
                self.done_bytes += n
        try:
            return self.ctx.api.get_blob(sha, part, size=size, on_bytes=count)
        except APIError as e:
            if e.status == 416:             # cannot resume: start over
                part.unlink(missing_ok=True)
            raise


def _entry_of(cfg, path: Path) -> Path:
    """The cache entry a cached file belongs to: itself, or its model's folder."""
    try:
        rel = path.relative_to(cfg.models_dir)
    except ValueError:
        return path
    return cfg.models_dir.joinpath(*rel.parts[:3])
