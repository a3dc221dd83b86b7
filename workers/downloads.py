"""A task's project and model files: planned from the task, fetched when the cache lacks them,
laid out in the task dir as the real Supervisely agent lays it out:

    data/<project name>/meta.json, <ds>/img/<item>, <ds>/ann/<item>.json
    model/<path>                     the model's files at model/'s root

The project's items come in pages from the server (GET .../tasks/{id}/project/items; the poll
answer lists the datasets and their `items_count` only), or inline in the poll answer (`items`:
older servers, tests). Planning writes each page's annotations as the page arrives and keeps one
small `Job` per file: a project of 10^5 items costs the agent its file list, not its annotations.

Fetching: blobs up to protocol.bulk.SMALL_BLOB go many per request (a tar stream, BULK_COUNT
blobs per request, several requests at once); each entry is hashed while it streams into a part
file of its own and stored only when it matches. Larger blobs go one per request, resumable with
Range. Every name from the server is path-checked here. Storing, verifying and linking cached
files is workers/cache.py's: this module calls the cache, never the other way round.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol import bulk, sly_format
from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache
from workers.errors import StopRequested, TaskError

BLOB_TRIES = 3  # wrong bytes for one blob this many times: the task fails
FETCH_TRIES = BLOB_TRIES + 2  # failed requests (connection, cut stream) in a row for one blob or batch
BULK_COUNT = 2000  # blobs per bulk request: a project's batches run in parallel on the download threads
PROGRESS_EVERY_S = 1.0
INLINE_PAGE = 5000  # inline items (an older server's poll answer) planned and fetched per page
# A bulk request that fails with one of these is asked again; any other answer is the server's word.
RETRY_STATUS = frozenset({None, 408, 429, 500, 502, 503, 504})
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)


def safe_relpath(name, what: str) -> str:
    """A relative POSIX path that stays where it is put, or TaskError."""
    if not isinstance(name, str) or not name:
        raise TaskError(f"unsafe {what} {name!r}: empty")
    if "\x00" in name or "\\" in name:
        raise TaskError(f"unsafe {what} {name!r}: NUL or backslash")
    if name.startswith("/") or any(part in ("..", ".", "") for part in name.split("/")):
        raise TaskError(f"unsafe {what} {name!r}: absolute, empty, '.' or '..' component")
    return name


def safe_name(name, what: str) -> str:
    safe_relpath(name, what)
    if "/" in name:
        raise TaskError(f"unsafe {what} {name!r}: contains '/'")
    return name


class Job:
    """One file the task needs: its blob, where it is cached, where it goes in the task dir.
    Paths are plain strings (a large project holds 10^5 of these)."""

    __slots__ = ("sha", "size", "cache_path", "dest", "label", "needs_ann")

    def __init__(self, sha: str, size: int, cache_path, dest, label: str, needs_ann: bool = False):
        self.sha, self.size, self.label = sha, size, label
        self.cache_path, self.dest = os.fspath(cache_path), os.fspath(dest)
        # a project item the server sent no annotation for: its empty one is written once the
        # image is here (its size is read from the image's header)
        self.needs_ann = needs_ann


def project_dir(ctx) -> Path | None:
    """tasks/<id>/data/<project name>, or None when the task has no project."""
    project = ctx.task.get("project")
    if not project:
        return None
    return ctx.task_dir / "data" / safe_name(project.get("name"), "project name")


def plan(ctx) -> list[Job]:
    """Every file of the task's project and model, with its paths checked (`plan_pages` whole)."""
    return [job for page in plan_pages(ctx) for job in page]


def plan_pages(ctx) -> Iterator[list[Job]]:
    """The task's files a page at a time, as the server lists them: the model's files first (the
    largest, fetched one by one), then the project's items, each page's folders made before it is
    yielded and its annotations written once the next page is asked for. `Downloader.prepare`
    fetches a page's missing blobs while its annotations are written and the next page is listed
    and planned."""
    task, cfg = ctx.task, ctx.config
    model = task.get("model")
    if model:
        mhash = _sha(model.get("hash"), "model hash")
        mdir = cache.model_dir(cfg, mhash)
        jobs: list[Job] = []
        for f in model.get("files") or []:
            fpath = safe_relpath(f.get("path"), "model file path")
            sha = _sha(f.get("sha256"), fpath)
            jobs.append(
                Job(sha, int(f.get("size") or 0), mdir / fpath, ctx.task_dir / "model" / fpath, f"model/{fpath}")
            )
        if jobs:
            yield jobs
    if task.get("project"):
        yield from _plan_project(ctx)


def _plan_project(ctx) -> Iterator[list[Job]]:
    """The project's items, a page at a time: inline datasets first, then the paged ones, each
    dataset's items capped at the `items_count` the poll answer gave (items appended to the
    project after the task was handed out are not the task's)."""
    project = ctx.task["project"]
    pdir = os.fspath(ctx.task_dir / "data" / safe_name(project.get("name"), "project name"))
    layout = cache.Layout(ctx.config)
    inline: dict[str, list] = {}
    paged: dict[str, int | None] = {}  # dataset -> items_count (None: not given)
    for ds in project.get("datasets") or []:
        dname = safe_name(ds.get("name"), "dataset name")
        if dname in inline or dname in paged:
            raise TaskError(f"dataset {dname!r} appears twice in project {project.get('name')!r}")
        for sub in (sly_format.IMG_DIR, sly_format.ANN_DIR):
            os.makedirs(f"{pdir}/{dname}/{sub}", exist_ok=True)
        items = ds.get("items")
        if isinstance(items, list):
            inline[dname] = items
        else:
            count = ds.get("items_count")
            paged[dname] = count if isinstance(count, int) and not isinstance(count, bool) else None

    anns: list[tuple[str, object]] = []  # (task-dir path, annotation) of the page being planned

    def job(dname: str, item: dict) -> Job:
        iname = safe_name(item.get("name"), "item name")
        sha = _sha(item.get("sha256"), iname)
        ann = item.get("ann")
        if ann is not None:
            anns.append((f"{pdir}/{dname}/{sly_format.ANN_DIR}/{sly_format.ann_name(iname)}", ann))
        return Job(
            sha,
            int(item.get("size") or 0),
            layout.image(sha, iname),
            f"{pdir}/{dname}/{sly_format.IMG_DIR}/{iname}",
            f"{dname}/{iname}",
            needs_ann=ann is None,
        )

    def pages() -> Iterator[list[Job]]:
        for dname, items in inline.items():
            for start in range(0, len(items), INLINE_PAGE):
                yield [job(dname, item) for item in items[start : start + INLINE_PAGE]]
        if paged:
            yield from _paged_jobs(ctx, paged, inline, job)

    for page in pages():
        yield page
        # Asked for the next page: this one's missing blobs are on their way, and its annotations
        # are written while they come (before, the first download waited for 5,000 writes).
        for dest, ann in anns:
            layout.link_text(cache.text_key(ann), lambda ann=ann: sly_format.dumps(ann), dest)
        anns.clear()


def _paged_jobs(ctx, paged: dict[str, int | None], inline: dict, job) -> Iterator[list[Job]]:
    """The jobs of the paged datasets, a page of the listing at a time."""
    got = dict.fromkeys(paged, 0)
    for page in _item_pages(ctx):
        jobs = []
        for item in page:
            dname = item.get("dataset") if isinstance(item, dict) else None
            if dname not in paged:
                if dname in inline:
                    continue
                raise TaskError(
                    f"the server listed an item of dataset {dname!r}, which is not one of the task's project's datasets"
                )
            cap = paged[dname]
            if cap is not None and got[dname] >= cap:
                continue
            got[dname] += 1
            jobs.append(job(dname, item))
        yield jobs
    short = [d for d, n in paged.items() if n is not None and got[d] < n]
    if short:
        d = short[0]
        raise TaskError(
            f"the server listed {got[d]} of the {paged[d]} items of dataset {d!r} of project "
            f"{ctx.task['project'].get('name')!r}; the project changed while the task was prepared"
        )


def _item_pages(ctx) -> Iterator[list]:
    """The pages of the task's project items; the next page is asked for while one is planned."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pages") as pool:
        ahead = pool.submit(ctx.api.project_items, ctx.task_id, None)
        while True:
            try:
                items, cursor = ahead.result()
            except APIError as e:
                raise TaskError(f"the project's items could not be listed: {e}") from None
            if ctx.stop_event.is_set():
                raise StopRequested()
            if cursor:
                ahead = pool.submit(ctx.api.project_items, ctx.task_id, cursor)
            yield items
            if not cursor:
                return


def write_project_files(ctx, jobs: list[Job]) -> int:
    """meta.json, and the empty annotation of every item the server sent none for (its size read
    from the image); returns how many items got an empty annotation."""
    pdir = project_dir(ctx)
    if pdir is None:
        return 0
    pdir.mkdir(parents=True, exist_ok=True)
    meta = ctx.task["project"].get("meta")
    meta = meta if isinstance(meta, dict) else sly_format.empty_meta()
    write_text(os.fspath(pdir / sly_format.META_FILE), sly_format.dumps(meta))
    layout = cache.Layout(ctx.config)
    unknown, empty = [], 0
    for job in jobs:
        if not job.needs_ann:
            continue
        size = sly_format.read_image_size(job.dest)
        if size is None:
            unknown.append(job.label)
        empty += 1
        img_dir, name = os.path.split(job.dest)
        ann_path = f"{os.path.dirname(img_dir)}/{sly_format.ANN_DIR}/{sly_format.ann_name(name)}"
        ann = sly_format.empty_ann(*(size or (None, None)))
        layout.link_text(cache.text_key(ann), lambda ann=ann: sly_format.dumps(ann), ann_path)
    if unknown:
        ctx.log(
            f"{len(unknown)} items without an annotation are not images whose size could be read "
            f"(e.g. {unknown[0]}); their empty annotations have no size",
            level="warning",
        )
    return empty


def write_text(path: str, text: str) -> None:
    """Write a file whose folder exists (open, write, close: nothing more)."""
    data = text.encode()
    fd = os.open(path, _WRITE_FLAGS, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _sha(value, what) -> str:
    try:
        return cache.check_sha(value)
    except ValueError:
        raise TaskError(f"{what}: {value!r} is not a sha256") from None


class _Aborted(Exception):
    """Another batch failed or the task is stopping: this one ends between two entries."""


class Downloader:
    """Fetch the planned blobs of one task (bounded pool) and link them into its task dir, page by
    page: a page's cached files are checked and linked, and its missing blobs handed to the pool,
    while the next page is planned."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.cfg = ctx.config
        self.layout = cache.Layout(self.cfg)
        self.lock = threading.Lock()
        self.jobs: list[Job] = []  # every job planned, in order (write_project_files reads them)
        self.done_files = 0
        self.done_bytes = 0  # bytes fetched over the network by this task
        self.total_files = 0
        self.last_report = 0.0
        self.touched: set = set()  # cache entries this task uses (marked used, never evicted for it)
        self.abort = threading.Event()
        # sha256 -> cache path -> the jobs waiting for that blob, from when it is handed to the pool
        # until every job of it is linked (a job of a later page finds its blob on the way here)
        self.waiting: dict[str, dict[str, list[Job]]] = {}
        self.fetched = 0  # jobs whose file was not in the cache (planning thread only)
        self.errors: list[BaseException] = []

    def prepare(self, pages: Iterable[list[Job]]) -> dict:
        """Plan, check, fetch and link every page's jobs (`plan_pages`, or one list of jobs given
        as [jobs]). Returns {"files", "cached", "fetched", "bytes"}."""
        ctx = self.ctx
        changed: list[str] = []
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.download_workers), thread_name_prefix="dl")
        try:
            small = self._missing(pages, changed, pool)
            for batch in bulk.batches(small, max_count=BULK_COUNT, max_bytes=bulk.MAX_BYTES):
                if self.abort.is_set():
                    break
                pool.submit(self._work, self._fetch_batch, dict(batch))
        except BaseException:
            self.abort.set()
            raise
        finally:
            pool.shutdown(wait=True)
        if changed:
            ctx.log(
                f"cache: {len(changed)} cached files changed since they were stored or have no record "
                f"(e.g. {changed[0]}); downloaded again",
                level="warning",
            )
        if self.errors:
            raise self.errors[0]
        if ctx.stop_event.is_set():
            raise StopRequested()
        if self.jobs:  # a task with no files reports no download
            self._report(force=True)
        return {
            "files": len(self.jobs),
            "cached": len(self.jobs) - self.fetched,
            "fetched": self.fetched,
            "bytes": self.done_bytes,
        }

    def _missing(self, pages: Iterable[list[Job]], changed: list[str], pool) -> Iterator[tuple[str, int]]:
        """(sha256, size) of each small blob the pages lack, as each page is planned and checked;
        room is made for a page's blobs first, and a large blob goes to the pool by itself here."""
        for page in pages:
            if self.abort.is_set():
                return
            if self.ctx.stop_event.is_set():
                raise StopRequested()
            new = self._check_page(page, changed)
            if not new:
                continue
            with self.lock:
                keep = set(self.touched)
            cache.ensure_space(self.cfg, sum(j.size for j in new), log=self.ctx.log, keep=keep)
            for job in new:
                if job.size > bulk.SMALL_BLOB:
                    pool.submit(self._work, self._fetch_one, job)
                else:
                    yield job.sha, job.size

    def _check_page(self, page: list[Job], changed: list[str]) -> list[Job]:
        """Link the page's cached files (in this thread: a link costs less than a pool hand-off,
        and their entries are marked used, kept by any eviction); the jobs whose blob is already
        on its way join it. Returns one job per blob to fetch."""
        layout = self.layout
        new: list[Job] = []
        linked = 0
        self.jobs.extend(page)
        self.total_files = len(self.jobs)
        for job in page:
            with self.lock:
                paths = self.waiting.get(job.sha)
                if paths is not None:  # asked for already (an item of a page before, or of this one)
                    paths.setdefault(job.cache_path, []).append(job)
                    continue
            cached = layout.check(job.cache_path, job.sha, job.size)
            if cached:
                layout.link_to_task(job.cache_path, job.dest, self.touched)
                linked += 1
                continue
            if cached is False:
                changed.append(job.label)
            with self.lock:
                self.waiting[job.sha] = {job.cache_path: [job]}
            new.append(job)
        self.fetched += len(page) - linked
        with self.lock:
            self.done_files += linked
        self._report()
        return new

    def _work(self, fn, arg) -> None:
        """Run one pool unit; the first error stops the others (between two entries) and planning."""
        if self.abort.is_set() or self.ctx.stop_event.is_set():
            return
        try:
            fn(arg)
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - reported once, by prepare
            self.errors.append(e)
            self.abort.set()

    def _fetch_one(self, job: Job) -> None:
        """A large blob by itself (resumable), then given to every job waiting for it."""
        self.fetch(job)
        self._settle(job.sha, job.cache_path, job.size)

    def _settle(self, sha: str, stored: str, size: int, written: str | None = None) -> None:
        """Blob `sha` is in the cache at `stored`: each other cache path waiting for it (an item
        name with another extension) gets a link to the same file, stored and recorded, and every
        waiting job is linked into the task dir (but the file `written` there already). Jobs that
        join meanwhile are served before the blob leaves `waiting`."""
        done = {stored}
        while True:
            with self.lock:
                paths = self.waiting[sha]
                if not paths:
                    del self.waiting[sha]
                    return
                self.waiting[sha] = {}
            for path, group in paths.items():
                if path not in done:
                    part = cache.link_part(self.layout, stored, sha)
                    self.layout.store_fetched(part, path, sha, size)
                    done.add(path)
                self._link(group, written)

    def _link(self, group: list[Job], written: str | None = None) -> None:
        """Link a just-fetched cache file to its jobs' places in the task dir (but `written`, the
        file it was written as)."""
        for job in group:
            if job.dest != written:
                cache.link_into(job.cache_path, job.dest)
        entry = self.layout.entry(group[0].cache_path)
        with self.lock:
            new = entry not in self.touched
            self.touched.add(entry)
            self.done_files += len(group)
        if new:
            self.layout.touch(entry)  # a model's folder (a file's link just set its ctime, its last use)
        self._report()

    def _fetch_batch(self, want: dict[str, int]) -> None:
        """Fetch the blobs `want` (sha -> size) in bulk requests until every one is stored: a
        request that fails or is cut short is made again for what is still missing (with backoff,
        up to FETCH_TRIES in a row); a blob whose bytes are wrong BLOB_TRIES times, or that the
        server leaves out twice, fails the task."""
        failures = 0
        mismatches: dict[str, int] = {}
        left_out: set[str] = set()
        while want:
            try:
                received = self._bulk_once(want, mismatches)
            except (APIError, bulk.BadBatch, OSError) as e:
                if isinstance(e, APIError) and e.status not in RETRY_STATUS:
                    raise TaskError(f"download of {len(want)} blobs failed: {e}") from None
                failures += 1
                if failures >= FETCH_TRIES:
                    label = self._label(next(iter(want)))
                    raise TaskError(
                        f"download of {len(want)} blobs (e.g. {label}) failed {failures} times: {e}"
                    ) from None
                time.sleep(backoff_delay(failures, base=0.2, cap=2.0))
                continue
            failures = 0
            for sha in want:
                if sha in received:
                    continue  # its bytes were wrong: asked again
                if sha in left_out:
                    raise TaskError(
                        f"download of {self._label(sha)} failed: the server does not have blob {sha} "
                        f"or does not let this node read it"
                    )
                left_out.add(sha)
            if want:
                time.sleep(backoff_delay(1, base=0.2, cap=2.0))

    def _bulk_once(self, want: dict[str, int], mismatches: dict[str, int]) -> set[str]:
        """One bulk request for `want`: each entry that matches its sha256 is stored, linked and
        taken out of `want`. Returns the sha256s the stream held."""
        received: set[str] = set()
        with self.ctx.api.download_blobs(list(want)) as dl:
            for sha, _size, chunks in dl.entries:
                if self.abort.is_set():
                    raise _Aborted()
                if self.ctx.stop_event.is_set():
                    raise StopRequested()
                if sha not in want or sha in received:
                    continue  # not asked for: skipped (iter_entries reads past it)
                received.add(sha)
                with self.lock:  # the first cache path waiting for it, and the first job of that path
                    final, group = next(iter(self.waiting[sha].items()))
                dest = group[0].dest
                sealed = self._receive(sha, dest, chunks)
                if sealed is None:
                    mismatches[sha] = mismatches.get(sha, 0) + 1
                    if mismatches[sha] >= BLOB_TRIES:
                        raise TaskError(
                            f"download of {self._label(sha)} failed: the server's bytes do not match "
                            f"sha256 {sha} ({BLOB_TRIES} tries); nothing was cached"
                        )
                    continue
                # into the cache too, then given to every other job waiting
                self.layout.store_written(dest, final, sha, want[sha], sealed)
                self._settle(sha, final, want[sha], written=dest)
                del want[sha]
        return received

    def _receive(self, sha: str, dest: str, chunks) -> bool | None:
        """Stream one entry straight into `dest`, the task-dir file of the first job waiting for it
        (a new file, read-only from the start), hashing it on the way. When the bytes match
        `sha`, its record is set through the open descriptor (`Layout.seal`) and whether that
        could be done is returned; else None, and no file left. Whatever goes wrong midway (a
        cut stream, a full disk), the file is removed. The cache gets it as a link
        (`Layout.store_written`): a blob costs one new file, and no part file, rename or second
        path walk."""
        fd = cache.create_file(dest)
        h = hashlib.sha256()
        n = 0
        try:
            try:
                for b in chunks:
                    h.update(b)
                    view = memoryview(b)
                    while view:
                        view = view[os.write(fd, view) :]
                    n += len(b)
                ok = h.hexdigest() == sha
                sealed = ok and self.layout.seal(fd, sha)
            finally:
                os.close(fd)
                with self.lock:
                    self.done_bytes += n
            if not ok:
                os.unlink(dest)
                return None
        except BaseException:
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass
            raise
        return sealed

    def _label(self, sha: str) -> str:
        """The task-dir name of one file made of blob `sha` (for an error message)."""
        with self.lock:
            paths = self.waiting.get(sha) or {}
            group = next(iter(paths.values()), None)
        return group[0].label if group else sha

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
        """One blob by itself: -> tmp -> verified -> cache path, under the blob's lock (so that
        another task fetching it waits and finds it stored). A failed try keeps the part file,
        and the next one resumes it with Range."""
        sha, final = job.sha, job.cache_path
        part = cache.part_path(self.cfg, sha)
        with cache.blob_lock(self.cfg, sha):
            if self.layout.verify(final, sha, job.size):
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
                    if failures >= FETCH_TRIES:
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
