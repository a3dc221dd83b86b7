"""A task's project and model files: planned from the task, fetched when the cache lacks them,
laid out in the task dir as the real Supervisely agent lays it out:

    data/<project name>/meta.json, <ds>/img/<item>, <ds>/ann/<item>.json
    model/<path>                     the model's files at model/'s root

Every name from the server is path-checked here. Storing, verifying and linking cached files is
workers/cache.py's: this module calls the cache, never the other way round.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from protocol import sly_format
from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache
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
        self.ann = ann  # a project item: the annotation JSON the server sent (None: none)


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
                jobs.append(
                    Job(
                        sha,
                        int(item.get("size") or 0),
                        cache.image_path(cfg, sha, iname),
                        pdir / dname / sly_format.IMG_DIR / iname,
                        f"{dname}/{iname}",
                        ann=item.get("ann"),
                    )
                )
    model = task.get("model")
    if model:
        mhash = _sha(model.get("hash"), "model hash")
        mdir = cache.model_dir(cfg, mhash)
        for f in model.get("files") or []:
            fpath = safe_relpath(f.get("path"), "model file path")
            sha = _sha(f.get("sha256"), fpath)
            jobs.append(
                Job(sha, int(f.get("size") or 0), mdir / fpath, ctx.task_dir / "model" / fpath, f"model/{fpath}")
            )
    return jobs


def write_project_files(ctx, jobs: list[Job]) -> int:
    """meta.json and every item's ann/<item>.json; returns how many items got an empty annotation."""
    pdir = project_dir(ctx)
    if pdir is None:
        return 0
    pdir.mkdir(parents=True, exist_ok=True)
    meta = ctx.task["project"].get("meta")
    meta = meta if isinstance(meta, dict) else sly_format.empty_meta()
    _write_text(pdir / sly_format.META_FILE, sly_format.dumps(meta))
    for ds in ctx.task["project"].get("datasets") or []:
        (pdir / ds["name"] / sly_format.IMG_DIR).mkdir(parents=True, exist_ok=True)
        (pdir / ds["name"] / sly_format.ANN_DIR).mkdir(parents=True, exist_ok=True)
    unknown, empty = [], 0
    for job in jobs:
        ann_path = job.dest.parent.parent / sly_format.ANN_DIR / sly_format.ann_name(job.dest.name)
        if job.ann is not None or not job.dest.is_relative_to(pdir):
            if job.ann is not None:
                _write_text(ann_path, sly_format.dumps(job.ann))
            continue
        size = sly_format.read_image_size(job.dest)
        if size is None:
            unknown.append(job.label)
        empty += 1
        ann = sly_format.empty_ann(*(size or (None, None)))
        _write_text(ann_path, sly_format.dumps(ann))
    if unknown:
        ctx.log(
            f"{len(unknown)} items without an annotation are not images whose size could be read "
            f"(e.g. {unknown[0]}); their empty annotations have no size",
            level="warning",
        )
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


class Downloader:
    """Fetch the planned blobs of one task (bounded pool) and link them into its task dir."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config
        self.lock = threading.Lock()
        self.done_files = 0
        self.done_bytes = 0  # bytes fetched over the network by this task
        self.total_files = 0
        self.last_report = 0.0
        self.made_dirs: set = set()  # folders known to exist (saves a mkdir per file)

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
                keep.add(cache.entry_of(self.cfg, job.cache_path))
            else:
                missing.append(job)
        if changed:
            ctx.log(
                f"cache: {len(changed)} cached files changed since they were stored or have no record "
                f"(e.g. {changed[0]}); downloading them again",
                level="warning",
            )
        need = sum(j.size for j in {j.cache_path: j for j in missing}.values())
        cache.ensure_space(self.cfg, need, log=ctx.log, keep=keep)
        cached = len(jobs) - len(missing)
        if missing:
            ctx.log(f"downloading {len(missing)} of {len(jobs)} files ({need / cache.MB:.1f} MB); {cached} cached")
        # Cached files first, in this thread: a link costs less than a pool hand-off.
        touched = set()
        missing_ids = {id(j) for j in missing}
        for job in jobs:
            if id(job) not in missing_ids:
                cache.link_to_task(self.cfg, job.cache_path, job.dest, touched, self.made_dirs)
        self.done_files = cached
        if missing:
            self._fetch_all(missing, touched)
        self._report(force=True)
        return {"files": len(jobs), "cached": cached, "fetched": len(missing), "bytes": self.done_bytes}

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
                    cache.link_to_task(self.cfg, job.cache_path, job.dest, touched, self.made_dirs)
                with self.lock:
                    self.done_files += len(group)
                self._report()
            except BaseException as e:  # noqa: BLE001 - reported once, below
                errors.append(e)

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
        part = cache.part_path(self.cfg, sha)
        with cache.blob_lock(self.cfg, sha):
            if cache.verify(self.cfg, final, sha, job.size):
                return  # another task fetched it while we waited
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
                    continue  # the .part is kept: the next try resumes with Range
                if digest == sha:
                    break
                part.unlink(missing_ok=True)
                mismatches += 1
                if mismatches >= BLOB_TRIES:
                    raise TaskError(
                        f"download of {job.label} failed: the server's bytes do not match "
                        f"sha256 {sha} ({BLOB_TRIES} tries); nothing was cached"
                    )
            cache.store_blob(self.cfg, part, final, sha)

    def _download(self, sha: str, part: Path, size: int) -> str:
        """GET the blob into `part` (resuming what is there with Range); returns the file's sha256."""

        def count(n: int) -> None:
            with self.lock:
                self.done_bytes += n

        try:
            return self.ctx.api.get_blob(sha, part, size=size, on_bytes=count)
        except APIError as e:
            if e.status == 416:  # cannot resume: start over
                part.unlink(missing_ok=True)
            raise
