"""Upload what a task wrote under results/, as the real Supervisely agent turns it into results.

    train      every CHECKPOINT event's `subdir` -> a model, stored in the node's model cache and
               uploaded while the container runs; the task's model is the last checkpoint (a
               `results/model/` folder wins); neither -> failed
    inference  results/<project>/ (a Supervisely project) -> a new project with meta and anns
    custom     results/ -> the task's artifacts; files closed while the container runs are
               uploaded in batches (inotify on a capped number of folders, else a periodic scan:
               workers/results_watch.py)

Everything is read through workers/safefs.py: from a directory fd, without following links, each
file checked with fstat and hashed and uploaded from that same fd. A symlink, fifo, socket or
device anywhere under results/ is skipped with a line in the task log, and so is a sparse file
(its size on the server would be what its holes pretend, not what the node holds).

What a task's results cost the agent is bounded (`Budget`): TASK_RESULTS_MAX_FILES files and
TASK_RESULTS_MAX_MB read to hash or copy them over the task's life. A file or checkpoint folder
unchanged since its upload (same paths, sizes, mtimes, inodes) is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from protocol import bulk
from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache, safefs
from workers.errors import TaskError
from workers.results_watch import WATCH_DIRS, ResultsWatch

UPLOAD_TRIES = 4
CHUNK = 1 << 20
MAX_JSON_BYTES = 64 << 20  # a result's meta.json or annotation
CONTAINER_RESULTS = "/sly_task_data/results"
CHECKPOINTS_FILE = "checkpoints.json"  # tasks/<id>/, not mounted: what this task uploaded so far
POST_FILES = 1000  # artifacts in one POST (each post costs the server per entry)
# A result project goes up in pages of at most this many items and about this much annotation
# JSON (the server takes a body of 64 MiB at most and checks a page in one go).
RESULT_PAGE_ITEMS = 5000
RESULT_PAGE_BYTES = 16 * 1024 * 1024
BATCH_S = 1.0  # a closed file waits at most this long for others to share its post
SCAN_S = 5.0  # results/ is walked this often once it has too many folders to watch
PENDING_MAX = 10000  # closed files remembered before the next post; past it: one walk
SKIP_LOG_MAX = 100  # skipped paths logged one by one; the rest are counted
SPARSE_MIN = 1 << 20  # a file is sparse when over this and less than half of it is on disk
NO_RETRY = (401, 403, 413)  # blob uploads the server will refuse again
BULK_FILES = 100  # small files hashed, checked and sent per bulk request (each held open meanwhile)
BULK_BYTES = 64 << 20  # and at most this many of their bytes


class ResultsLimit(TaskError):
    """A task's results went past TASK_RESULTS_MAX_FILES / _MB, or the server's limit (413)."""


class Budget:
    """What one task's results may cost the agent: files uploaded, bytes read to hash or copy them.
    Once past a limit every later charge fails at once, so uploads in flight stop quickly."""

    def __init__(self, config):
        self.max_files = int(getattr(config, "task_results_max_files", 0) or 0)
        self.max_bytes = int(getattr(config, "task_results_max_mb", 0) or 0) * cache.MB
        self.files = 0
        self.bytes = 0
        self.exceeded: str | None = None
        self.lock = threading.Lock()

    def refuse(self, why: str) -> None:
        with self.lock:
            self.exceeded = self.exceeded or why
        raise ResultsLimit(self.exceeded)

    def check(self) -> None:
        if self.exceeded:
            raise ResultsLimit(self.exceeded)

    def add_files(self, n: int = 1) -> None:
        with self.lock:
            self.files += n
            over = self.max_files and self.files > self.max_files
        self.check()
        if over:
            self.refuse(f"results: more than {self.max_files} files (TASK_RESULTS_MAX_FILES); upload refused")

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            over = self.max_bytes and self.bytes > self.max_bytes
        self.check()
        if over:
            self.refuse(
                f"results: more than {self.max_bytes // cache.MB} MB read from results/ "
                f"(TASK_RESULTS_MAX_MB); upload refused"
            )


def server_refused(e: APIError, what: str) -> TaskError:
    if e.status == 413:
        return ResultsLimit(f"results: the server refused {what}: over its limit ({e.code}: {e.detail})")
    return TaskError(f"results: the server refused {what}: {e}")


def hash_file(f, charge=None) -> tuple[str, int]:
    """sha256 and size of an open binary file, read from its start; `charge(n)` for every chunk."""
    f.seek(0)
    h = hashlib.sha256()
    size = 0
    while b := f.read(CHUNK):
        if charge is not None:
            charge(len(b))
        h.update(b)
        size += len(b)
    return h.hexdigest(), size


def upload_blob(api, f, label: str, charge=None) -> dict:
    """PUT one open file unless the server has its sha256; retried. Returns {sha256, size}.

    The server checks the hash: a file changed between hashing and sending is refused, and sent
    again hashed anew."""
    last = None
    for attempt in range(UPLOAD_TRIES):
        sha, size = hash_file(f, charge)
        try:
            if not api.blob_exists(sha):
                api.put_blob(sha, f)
            return {"sha256": sha, "size": size}
        except APIError as e:
            if e.status in NO_RETRY:
                raise server_refused(e, label) from None
            last = e
            time.sleep(backoff_delay(attempt + 1, base=0.2, cap=5.0))
    raise TaskError(f"upload of {label} failed after {UPLOAD_TRIES} tries: {last}")


def upload_open_files(api, files, workers: int = 4, charge=None) -> list[dict]:
    """Upload (relative path, open file) pairs (closing each); returns [{path, sha256, size}] by path.

    Files up to protocol.bulk.SMALL_BLOB go BULK_FILES at a time (`upload_small`: hashed, asked
    about in one check, the missing ones sent in one bulk upload); larger ones one by one
    (`upload_blob`). At most `workers` groups are in flight, so the files open at once stay
    bounded (workers x BULK_FILES)."""
    gate = threading.BoundedSemaphore(workers)
    failed = threading.Event()  # a group failed: no more are read

    def run(group: list) -> list[dict]:
        try:
            if failed.is_set():
                return []
            if len(group) == 1 and _size(group[0][1]) > bulk.SMALL_BLOB:
                rel, f = group[0]
                return [{"path": rel, **upload_blob(api, f, rel, charge)}]
            return upload_small(api, group, charge)
        except BaseException:
            failed.set()
            raise
        finally:
            for _, f in group:
                f.close()
            gate.release()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="up") as pool:
        futures = []
        for group in _groups(files, failed):
            try:
                gate.acquire()
            except BaseException:
                for _, f in group:
                    f.close()
                raise
            futures.append(pool.submit(run, group))
        out = [e for fu in futures for e in fu.result()]
    return sorted(out, key=lambda e: e["path"])


def _groups(files, failed: threading.Event):
    """The (relative path, open file) pairs in groups: each file over SMALL_BLOB alone, the others
    BULK_FILES (or BULK_BYTES) at a time. Stops reading once `failed` is set; a group not handed
    on (an exception) has its files closed."""
    group: list = []
    nbytes = 0
    try:
        for rel, f in files:
            if failed.is_set():
                f.close()
                break
            size = _size(f)
            if size > bulk.SMALL_BLOB:
                yield [(rel, f)]
                continue
            group.append((rel, f))
            nbytes += size
            if len(group) >= BULK_FILES or nbytes >= BULK_BYTES:
                out, group, nbytes = group, [], 0
                yield out
    except BaseException:
        for _, f in group:
            f.close()
        raise
    if group:
        yield group


def _size(f) -> int:
    return os.fstat(f.fileno()).st_size


def upload_small(api, group: list, charge=None) -> list[dict]:
    """(relative path, open file) pairs, each up to SMALL_BLOB: hashed, the ones the server lacks
    (or this node may not read) sent in one bulk upload; a request that fails is sent again with
    backoff. A file that changed after it was hashed (the server finds the hash wrong) goes again
    by itself, hashed anew. Returns [{path, sha256, size}] in order."""
    hashed = [(rel, f, *hash_file(f, charge)) for rel, f in group]
    last = None
    for attempt in range(UPLOAD_TRIES):
        try:
            missing = api.check_blobs(sha for _, _, sha, _ in hashed)
            send = {sha: (rel, f) for rel, f, sha, _ in hashed if sha in missing}  # each blob once
            answers = api.upload_blobs((sha, f) for sha, (_, f) in send.items()) if send else []
            break
        except APIError as e:
            if e.status in NO_RETRY:
                raise server_refused(e, f"{len(group)} files (e.g. {group[0][0]})") from None
            if e.status is not None and e.status < 500 and e.status not in (408, 429):
                raise TaskError(f"results: the server refused {len(group)} files (e.g. {group[0][0]}): {e}") from None
            last = e
            time.sleep(backoff_delay(attempt + 1, base=0.2, cap=5.0))
    else:
        raise TaskError(f"upload of {len(group)} files (e.g. {group[0][0]}) failed after {UPLOAD_TRIES} tries: {last}")
    mismatched = set()
    for answer in answers:
        if "error" not in answer:
            continue
        rel, _ = send[answer["sha256"]]
        if answer["error"] != "hash_mismatch":
            raise TaskError(f"results: the server refused {rel}: {answer.get('detail')} ({answer['error']})")
        mismatched.add(answer["sha256"])
    # A file that changed since it was hashed: it, and any file that had its hash (not sent), one by one.
    return [
        {"path": rel, **upload_blob(api, f, rel, charge)}
        if sha in mismatched
        else {"path": rel, "sha256": sha, "size": size}
        for rel, f, sha, size in hashed
    ]


def post_artifacts(api, task_id: int, name: str, entries: list[dict]) -> dict | None:
    """Artifacts in posts of at most POST_FILES entries (the server merges them by path)."""
    answer = None
    for i in range(0, len(entries), POST_FILES):
        answer = api.post_results(task_id, "artifacts", name, entries[i : i + POST_FILES])
    return answer


def stamp(st) -> int:
    """A compact fingerprint of a file's state: what says it is unchanged since it was read."""
    return hash((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))


def is_sparse(st) -> bool:
    return st.st_size > SPARSE_MIN and st.st_blocks * 512 < st.st_size // 2


def container_rel(path: str) -> str:
    """A results path as a task names it (`00000002`, `/sly_task_data/results/x`) -> relative."""
    if path == CONTAINER_RESULTS or path.startswith(CONTAINER_RESULTS + "/"):
        path = path[len(CONTAINER_RESULTS) :]
    return path.strip("/")


class ResultsDir:
    """results/ of one task, opened once without following links; skips are logged once each
    (the first SKIP_LOG_MAX of them: a task making a million links gets no million log lines)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.path = ctx.task_dir / "results"
        self.skipped: set[str] = set()
        self.unnamed_skips = 0
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.walked = self.unchanged = 0

    def open(self) -> ResultsDir:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.fd = safefs.open_dir(self.path)
        except safefs.Skipped as s:
            raise TaskError(f"results/ {s}; refused") from None
        return self

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def skip(self, rel: str, reason: str, rule: str = "only regular files and folders are read") -> None:
        with self.lock:
            if rel in self.skipped:
                return
            if len(self.skipped) >= SKIP_LOG_MAX:
                self.unnamed_skips += 1
                if self.unnamed_skips > 1:
                    return
                message = f"results: more than {SKIP_LOG_MAX} paths skipped; the others are not named"
            else:
                self.skipped.add(rel)
                message = f"results: {rel} {reason}; skipped ({rule})"
        self.ctx.log(message, level="warning")

    def admit(self, files, budget: Budget, seen: dict | None = None, staged: dict | None = None):
        """The files worth reading, each new one counted against `budget`: a sparse file is
        skipped; with `seen` (path -> stamp() of what was posted), so is a file unchanged since.
        `staged` gets the stamp of every file let through (posted, they go into `seen`)."""
        for rel, f in files:
            self.walked += 1
            try:
                st = os.fstat(f.fileno())
                if is_sparse(st):
                    self.skip(
                        rel,
                        f"is sparse ({st.st_size} bytes, {st.st_blocks * 512} on disk)",
                        "its holes would be uploaded as bytes",
                    )
                    f.close()
                    continue
                key = stamp(st)
                old = None if seen is None else seen.get(rel)
                if old == key or (staged is not None and rel in staged):  # or twice in one batch
                    self.unchanged += 1
                    f.close()
                    continue
                if old is None:
                    budget.add_files()
                if staged is not None:
                    staged[rel] = key
            except BaseException:
                f.close()
                raise
            yield rel, f

    def files(self, rel: str = ""):
        """(path relative to `rel`, open file) for every regular file under results/<rel>."""
        if not rel:
            yield from safefs.walk_files(self.fd, self.skip)
            return
        d = safefs.open_rel_dir(self.fd, rel)
        try:
            yield from safefs.walk_files(d, lambda r, why: self.skip(f"{rel}/{r}", why))
        finally:
            os.close(d)

    def read_json(self, dir_fd: int, name: str, label: str):
        """A JSON file inside dir_fd; None when absent or skipped; TaskError when not JSON."""
        try:
            f = safefs.open_file(dir_fd, name)
        except FileNotFoundError:
            return None
        except safefs.Skipped as s:
            self.skip(label, str(s))
            return None
        with f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise TaskError(f"results: {label} is larger than {MAX_JSON_BYTES >> 20} MB")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise TaskError(f"results: {label} is not JSON ({e})") from None


# --- custom ---------------------------------------------------------------------------------


def upload_artifacts(ctx, name: str, live: CheckpointUploader | None = None) -> dict | None:
    """Everything under results/ as the task's artifacts; None when there is nothing. With `live`
    (the uploader that ran alongside the container) the files it posted and that have not changed
    since are not read again, and its budget goes on."""
    budget = live.budget if live is not None else Budget(ctx.config)
    budget.check()
    seen = live.seen if live is not None else None
    res = ResultsDir(ctx).open()
    try:
        entries = upload_open_files(ctx.api, res.admit(res.files(), budget, seen), charge=budget.add_bytes)
    finally:
        res.close()
    if not res.walked:
        ctx.log("results: nothing under results/ to upload as artifacts", level="warning")
        return None
    try:
        answer = post_artifacts(ctx.api, ctx.task_id, name, entries)
    except APIError as e:
        raise server_refused(e, "the artifacts") from None
    kept = f"; {res.unchanged} unchanged since uploaded while the task ran" if res.unchanged else ""
    ctx.log(f"uploaded {len(entries)} files ({sum(e['size'] for e in entries) / 1048576:.1f} MB) as artifacts{kept}")
    return answer


# --- inference ------------------------------------------------------------------------------


def _has_meta(dir_fd: int, name: str) -> bool:
    try:
        fd = safefs.open_dir(None, name, dir_fd=dir_fd)
    except (OSError, safefs.Skipped):
        return False
    try:
        os.stat("meta.json", dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def find_result_project(ctx, res: ResultsDir) -> str | None:
    """The folder of results/ that is the result project: results/<input project name>/ when it
    has a meta.json (what legacy plugins write), else the only folder with a meta.json."""
    wanted = (ctx.task.get("project") or {}).get("name")
    with os.scandir(res.fd) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    candidates = [n for n in names if _has_meta(res.fd, n)]
    if wanted in candidates:
        return wanted
    return candidates[0] if len(candidates) == 1 else None


def upload_project(ctx, name: str) -> dict:
    """results/<project>/ (meta.json, <ds>/img/<item>, <ds>/ann/<item>.json) as a new project.

    Each item is `{path: "<ds>/<item>", sha256, size, ann}` (ann: the item's annotation JSON, absent
    when the task wrote none), and the body carries the project's `meta`."""
    res = ResultsDir(ctx).open()
    anns: dict[str, object] = {}
    try:
        folder = find_result_project(ctx, res)
        if folder is None:
            raise TaskError(
                "inference: the task wrote no project (a folder results/<project name>/ with "
                "meta.json, <dataset>/img/ and <dataset>/ann/)"
            )
        pfd = safefs.open_rel_dir(res.fd, folder)
        try:
            meta = res.read_json(pfd, "meta.json", f"{folder}/meta.json")
            if not isinstance(meta, dict):
                raise TaskError(f"results: {folder}/meta.json is not a project meta (a JSON object)")
            budget = Budget(ctx.config)
            entries = upload_open_files(
                ctx.api, res.admit(_project_items(res, pfd, folder, anns), budget), charge=budget.add_bytes
            )
        finally:
            os.close(pfd)
    finally:
        res.close()
    if not entries:
        raise TaskError(f"inference: the result project {folder!r} has no items")
    for e in entries:
        if anns.get(e["path"]) is not None:
            e["ann"] = anns[e["path"]]
    ctx.log(
        f"uploading project {name!r} from results/{folder}/: {len(entries)} items, "
        f"{sum(1 for a in anns.values() if a is not None)} annotations"
    )
    pages = list(project_pages(entries))
    try:
        if len(pages) == 1:
            answer = ctx.api.post_results(ctx.task_id, "project", name, entries, meta=meta)
        else:
            # The first page makes the project; the others are added to it, so no request holds a
            # whole project of 10^5 annotations (the server takes a body of 64 MiB at most).
            answer = ctx.api.post_results(ctx.task_id, "project", name, pages[0], meta=meta, paged=True)
            pid = answer["id"]
            for i, page in enumerate(pages[1:], 2):
                answer = ctx.api.post_results(ctx.task_id, "project", "", page, project_id=pid)
                ctx.log(f"project {name!r}: page {i}/{len(pages)} uploaded")
    except APIError as e:
        raise server_refused(e, "the project") from None
    ctx.log(f"uploaded project {name!r}: {len(entries)} items" + (f" in {len(pages)} pages" if len(pages) > 1 else ""))
    return answer


def project_pages(entries: list[dict], max_items: int | None = None, max_bytes: int | None = None):
    """The project's entries in pages of at most RESULT_PAGE_ITEMS items and about
    RESULT_PAGE_BYTES of annotation JSON each (a page holds at least one item)."""
    max_items = RESULT_PAGE_ITEMS if max_items is None else max_items
    max_bytes = RESULT_PAGE_BYTES if max_bytes is None else max_bytes
    page: list[dict] = []
    size = 0
    for e in entries:
        n = 200 + (len(json.dumps(e["ann"], separators=(",", ":"))) if e.get("ann") is not None else 0)
        if page and (len(page) >= max_items or size + n > max_bytes):
            yield page
            page, size = [], 0
        page.append(e)
        size += n
    if page:
        yield page


def _open_sub(res: ResultsDir, dir_fd: int, name: str, label: str) -> int | None:
    try:
        return safefs.open_dir(None, name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except safefs.Skipped as s:
        if "regular file" not in str(s):
            res.skip(label, str(s))
        return None


def _project_items(res: ResultsDir, pfd: int, folder: str, anns: dict):
    """(<ds>/<item>, open image) for every item; each item's annotation goes into `anns`."""
    with os.scandir(pfd) as it:
        datasets = sorted(e.name for e in it if e.name != "meta.json")
    for ds in datasets:
        dfd = _open_sub(res, pfd, ds, f"{folder}/{ds}")
        if dfd is None:
            continue
        ifd = afd = None
        try:
            ifd = _open_sub(res, dfd, "img", f"{folder}/{ds}/img")
            afd = _open_sub(res, dfd, "ann", f"{folder}/{ds}/ann")
            if ifd is None:
                continue
            for rel, f in safefs.walk_files(ifd, lambda r, why, ds=ds: res.skip(f"{folder}/{ds}/img/{r}", why)):
                if "/" in rel:
                    f.close()
                    res.skip(f"{folder}/{ds}/img/{rel}", "is inside a sub-folder of img/")
                    continue
                try:
                    ann = None if afd is None else res.read_json(afd, rel + ".json", f"{folder}/{ds}/ann/{rel}.json")
                except BaseException:
                    f.close()
                    raise
                anns[f"{ds}/{rel}"] = ann
                yield f"{ds}/{rel}", f
        finally:
            for fd in (ifd, afd, dfd):
                if fd is not None:
                    os.close(fd)


# --- train: checkpoints -> models -----------------------------------------------------------


def checkpoint_files(res: ResultsDir, rel: str):
    """(path inside, open file) for results/<rel>: each file of a folder, or the one file."""
    try:
        dir_fd = safefs.open_rel_dir(res.fd, rel)
    except safefs.Skipped as s:
        if "regular file" not in str(s):
            raise
        yield rel.rsplit("/", 1)[-1], safefs.open_rel_file(res.fd, rel)
        return
    try:
        yield from safefs.walk_files(dir_fd, lambda r, why: res.skip(f"{rel}/{r}", why))
    finally:
        os.close(dir_fd)


def _printed(files, h):
    """The files, each one's path, size, mtime and inode added to the hash `h` on the way."""
    for rel, f in files:
        st = os.fstat(f.fileno())
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}\n".encode())
        yield rel, f


def checkpoint_print(res: ResultsDir, rel: str) -> str:
    """What results/<rel> looks like (paths, sizes, mtimes, inodes), no file's content read."""
    h = hashlib.sha256()
    for _, f in _printed(checkpoint_files(res, rel), h):
        f.close()
    return h.hexdigest()


def store_and_upload_model(
    ctx, res: ResultsDir, rel: str, name: str, budget: Budget | None = None, **extra
) -> dict | None:
    """results/<rel> (a folder, or one file) -> the model cache -> the server as a model.

    Returns {"subdir", "hash", "files", "name", "model_id", "print", ...extra} or None when there
    was nothing to store (missing, empty, or skipped: logged). `print`: checkpoint_print() of
    what was stored."""
    label = rel
    budget = budget or Budget(ctx.config)
    budget.check()
    printed = hashlib.sha256()
    try:
        files = res.admit(_printed(checkpoint_files(res, rel), printed), budget)
        mhash, entries, entry = cache.store_model(ctx.config, files, charge=budget.add_bytes)
    except FileNotFoundError:
        ctx.log(f"results: {label} does not exist; no model made of it", level="warning")
        return None
    except safefs.Skipped as s:
        res.skip(label, str(s))
        return None
    if not entries:
        ctx.log(f"results: {label} holds no regular file; no model made of it", level="warning")
        return None
    # the cache's own copy: the bytes hashed above
    upload_open_files(ctx.api, ((f"{label}/{e['path']}", open(entry / e["path"], "rb")) for e in entries))
    checkpoint = extra.get("checkpoint")
    try:
        answer = ctx.api.post_results(ctx.task_id, "model", name, entries, checkpoint=checkpoint)
    except APIError as e:
        raise server_refused(e, f"the model {name!r}") from None
    model_id = (answer.get("results") or {}).get("model_id")
    ctx.log(
        f"model {name!r} from results/{label}: {len(entries)} files, "
        f"{sum(e['size'] for e in entries) / 1048576:.1f} MB, hash {mhash[:12]}, cached; id {model_id}"
    )
    return {
        "subdir": rel,
        "hash": mhash,
        "files": entries,
        "name": name,
        "model_id": model_id,
        "print": printed.hexdigest(),
        **extra,
    }


def checkpoint_info(line: dict) -> dict:
    """`checkpoint` for the server from an SDK CHECKPOINT event: epoch and numeric metrics."""
    optional = line.get("optional") if isinstance(line.get("optional"), dict) else {}
    out: dict = {}
    epoch = optional.get("epoch", line.get("epoch"))
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        out["epoch"] = epoch
    metrics = {
        k: v for k, v in optional.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if metrics:
        out["metrics"] = metrics
    return out


class CheckpointUploader:
    """While the container runs: `checkpoint` events and (custom tasks) files closed under results/.

    train: each checkpoint's folder becomes a model (cached, uploaded, listed on the task); the
    last one is kept in tasks/<id>/checkpoints.json so that a task process that re-attaches after
    a restart still knows it. A folder announced again unchanged is not copied again: it just
    becomes the last checkpoint again. custom: checkpoints and closed files become artifacts,
    posted in batches (a file closed waits up to BATCH_S for others); a file is read again only
    when it changed. What is kept per file is one int (`seen`). Created in the handler (threads
    and the inotify watch belong to the task process).
    """

    def __init__(self, ctx, results_dir: Path | None = None):
        self.ctx = ctx
        self.kind = str(ctx.task.get("type") or "custom")
        self.res = ResultsDir(ctx)
        self.q: queue.Queue = queue.Queue()
        self.budget = Budget(ctx.config)
        self.seen: dict[str, int] = {}  # path -> stamp() of what was posted
        self.pending: dict[str, bool] = {}  # closed (False) or new folders (True) not posted yet
        self.pending_since = 0.0
        self.rescan = False
        self.scan_said = False
        self.last_scan = 0.0
        self.watch: ResultsWatch | None = None
        self.uploaded = 0
        self.posts = 0
        self.failed: list[str] = []
        self.stored: dict[str, dict] = {r["subdir"]: r for r in self._load()}  # subdir -> model record
        self.thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)

    @property
    def checkpoints(self) -> list[dict]:
        return list(self.stored.values())

    @property
    def state_path(self) -> Path:
        return self.ctx.task_dir / CHECKPOINTS_FILE

    def _load(self) -> list[dict]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return []
        return (
            [r for r in data if isinstance(r, dict) and isinstance(r.get("subdir"), str)]
            if isinstance(data, list)
            else []
        )

    def _save(self) -> None:
        # Only the last: writing every checkpoint each time would cost the square of their number.
        tmp = self.state_path.with_name(CHECKPOINTS_FILE + ".tmp")
        tmp.write_text(json.dumps([self.last_checkpoint()]))
        tmp.replace(self.state_path)

    def last_checkpoint(self) -> dict | None:
        return next(reversed(self.stored.values()), None)

    def start(self) -> CheckpointUploader:
        self.res.open()
        if self.kind == "custom":
            self.watch = ResultsWatch(self.res.fd)
        self.thread.start()
        return self

    def on_event(self, line: dict) -> None:
        """A parsed log line with an event_type (called from the log reader)."""
        # An App writes its checkpoints through the public API (team files): none are taken here.
        if line.get("event_type") != "checkpoint" or self.kind in ("inference", "app"):
            return
        rel = line.get("subdir") or line.get("path")
        if isinstance(rel, str) and rel:
            self.q.put(("checkpoint", container_rel(rel), line))

    def stop(self) -> None:
        self.q.put(None)
        if self.thread.is_alive():
            self.thread.join(600)
        if self.watch is not None:
            self.watch.close()
        self.res.close()

    # --- the thread ---
    def _run(self) -> None:
        while True:
            try:
                job = self.q.get(timeout=min(BATCH_S, 0.2))
            except queue.Empty:
                job = ()
            if job is None:
                return
            self._guard("results/", self._collect)
            if job:
                self._guard("results/", self._flush)  # what was closed before the event goes first
                self._guard(job[1], self._checkpoint, job)
            elif self._due():
                self._guard("results/", self._flush)

    def _guard(self, rel: str, fn, *args) -> None:
        """One upload failing does not stop the task; past a limit nothing more is uploaded."""
        if self.budget.exceeded:
            return
        try:
            fn(*args)
        except ResultsLimit as e:
            with self.budget.lock:
                self.budget.exceeded = self.budget.exceeded or str(e)
            self.ctx.log(f"{self.budget.exceeded}; nothing more is uploaded while the task runs", level="error")
        except TaskError as e:
            self._failed(rel)
            self.ctx.log(str(e), level="error")
        except Exception as e:  # noqa: BLE001
            self._failed(rel)
            self.ctx.log(f"results: upload of {rel} failed: {type(e).__name__}: {e}", level="warning")

    def _failed(self, rel: str) -> None:
        if len(self.failed) < 10:
            self.failed.append(rel)

    def _collect(self) -> None:
        """Closed files from the watch into `pending` (bounded: past PENDING_MAX, one walk instead)."""
        if self.watch is None:
            return
        changes = [] if self.watch.scanning else self.watch.changes()
        if self.watch.overflowed:  # events were lost: walk everything once
            self.watch.overflowed, self.rescan = False, True
        if self.watch.scanning and not self.scan_said:
            self.scan_said = True
            self.ctx.log(
                f"results: {self.watch.why} under results/ (at most {WATCH_DIRS} are watched); "
                f"results/ is scanned every {SCAN_S:g} s instead",
                level="warning",
            )
        for rel, is_dir in changes:
            if self.rescan or len(self.pending) >= PENDING_MAX:
                self.rescan = True
                self.pending.clear()
                break
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending[rel] = self.pending.get(rel, False) or is_dir

    def _due(self) -> bool:
        now = time.monotonic()
        if self.rescan or (self.watch is not None and self.watch.scanning):
            return now - self.last_scan >= (BATCH_S if self.rescan else SCAN_S)
        return bool(self.pending) and (now - self.pending_since >= BATCH_S or len(self.pending) >= POST_FILES)

    def _flush(self) -> None:
        if self.rescan or (self.watch is not None and self.watch.scanning):
            self.rescan, self.last_scan = False, time.monotonic()
            self.pending.clear()
            self._post_artifacts(self.res.files())
            return
        if self.pending:
            items, self.pending = self.pending, {}
            self._post_artifacts(self._pending_files(items))

    def _pending_files(self, items: dict[str, bool]):
        for rel, is_dir in items.items():
            if is_dir:
                try:
                    yield from ((f"{rel}/{r}", f) for r, f in self.res.files(rel))
                except (FileNotFoundError, safefs.Skipped):
                    pass
                continue
            try:
                yield rel, safefs.open_rel_file(self.res.fd, rel)
            except FileNotFoundError:
                pass
            except safefs.Skipped as s:
                if "a folder" not in str(s):
                    self.res.skip(rel, str(s))

    def _checkpoint(self, job) -> None:
        _, rel, line = job
        if not rel:
            self.ctx.log("results: a checkpoint event names no folder under results/; ignored", level="warning")
        elif self.kind == "train":
            self._checkpoint_model(rel, line)
        else:
            self._checkpoint_artifacts(rel)

    def _checkpoint_model(self, rel: str, line: dict) -> None:
        info = checkpoint_info(line)
        old = self.stored.get(rel)
        if old is not None and old.get("print"):
            try:
                same = checkpoint_print(self.res, rel) == old["print"]
            except (OSError, safefs.Skipped):
                same = False
            if same:
                self.stored[rel] = self.stored.pop(rel)  # the last checkpoint again
                self._save()
                self.ctx.log(
                    f"results: checkpoint {rel} is unchanged since its upload (model id "
                    f"{old.get('model_id')}); not copied again"
                )
                return
        done = store_and_upload_model(
            self.ctx,
            self.res,
            rel,
            f"{model_name(self.ctx)} checkpoint {rel.replace('/', '-')}",
            self.budget,
            # Always sent, even empty: an event without an epoch or metrics still names a
            # checkpoint, which the server lists in results.checkpoints only when this is set.
            checkpoint=info,
        )
        if done is None:
            return
        done["checkpoint"] = info
        self.stored.pop(rel, None)
        self.stored[rel] = done
        self._save()

    def _checkpoint_artifacts(self, rel: str) -> None:
        try:
            files = ((f"{rel}/{r}", f) for r, f in self.res.files(rel))
            self._post_artifacts(files, f"checkpoint {rel}")
        except FileNotFoundError:
            return
        except safefs.Skipped as s:
            if "regular file" in str(s):
                self._post_artifacts(self._pending_files({rel: False}), rel)
            else:
                self.res.skip(rel, str(s))

    def _post_artifacts(self, files, name: str = "live results") -> None:
        staged: dict[str, int] = {}
        entries = upload_open_files(
            self.ctx.api, self.res.admit(files, self.budget, self.seen, staged), workers=2, charge=self.budget.add_bytes
        )
        for i in range(0, len(entries), POST_FILES):
            part = entries[i : i + POST_FILES]
            try:
                self.ctx.api.post_results(self.ctx.task_id, "artifacts", name, part)
            except APIError as e:
                raise server_refused(e, "the artifacts") from None
            self.posts += 1
            self.seen.update((e["path"], staged[e["path"]]) for e in part)
            self.uploaded += len(part)
        if entries:
            self.ctx.log(f"uploaded {name}: {len(entries)} files as artifacts")


def model_name(ctx) -> str:
    name = str((ctx.task.get("config") or {}).get("model_name") or f"task {ctx.task_id} model")
    # The server takes a model name as one path component (it names a folder on download).
    return name.replace("/", "-").replace("\\", "-").strip(". ")[:200] or f"task {ctx.task_id} model"


def finish_train(ctx, live: CheckpointUploader) -> dict:
    """After exit 0: results/model/ (when the task wrote one) or the last checkpoint is the task's model."""
    live.budget.check()
    res = ResultsDir(ctx).open()
    try:
        own = None
        try:
            os.stat("model", dir_fd=res.fd, follow_symlinks=False)
            own = store_and_upload_model(ctx, res, "model", model_name(ctx), live.budget)
        except FileNotFoundError:
            pass
    finally:
        res.close()
    if own is not None:
        return own
    last = live.last_checkpoint()
    if last is None:
        failed = f" ({len(live.failed)} failed to upload: {', '.join(live.failed[:3])})" if live.failed else ""
        raise TaskError(
            "train: no checkpoint was produced: no CHECKPOINT event named a folder under results/ "
            f"with files, and the task wrote no results/model/{failed}"
        )
    try:
        ctx.api.post_results(
            ctx.task_id,
            "model",
            last["name"],
            last["files"],
            checkpoint={**(last.get("checkpoint") or {}), "final": True},
        )
    except APIError as e:
        raise server_refused(e, "the final model") from None
    ctx.log(f"the task's model is its last checkpoint, results/{last['subdir']} (model id {last.get('model_id')})")
    return last
