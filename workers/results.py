"""Upload what a task wrote under results/, as the real Supervisely agent turns it into results.

    train      every CHECKPOINT event's `subdir` -> a model, stored in the node's model cache and
               uploaded while the container runs; the task's model is the last checkpoint (a
               `results/model/` folder wins); neither -> failed
    inference  results/<project>/ (a Supervisely project) -> a new project with meta and anns
    custom     results/ -> the task's artifacts; files closed while the container runs are
               uploaded at once (watchdog, inotify)

Everything is read through workers/safefs.py: from a directory fd, without following links, each
file checked with fstat and hashed and uploaded from that same fd. A symlink, fifo, socket or
device anywhere under results/ is skipped with a line in the task log.
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

from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache, safefs
from workers.errors import TaskError

UPLOAD_TRIES = 4
CHUNK = 1 << 20
IN_FLIGHT = 8                       # files open at once while uploading
MAX_JSON_BYTES = 64 << 20           # a result's meta.json or annotation
CONTAINER_RESULTS = "/sly_task_data/results"
CHECKPOINTS_FILE = "checkpoints.json"   # tasks/<id>/, not mounted: what this task uploaded so far


def hash_file(f) -> tuple[str, int]:
    """sha256 and size of an open binary file, read from its start."""
    f.seek(0)
    h = hashlib.sha256()
    size = 0
    while b := f.read(CHUNK):
        h.update(b)
        size += len(b)
    return h.hexdigest(), size


def upload_blob(api, f, label: str) -> dict:
    """PUT one open file unless the server has its sha256; retried. Returns {sha256, size}.

    The server checks the hash: a file changed between hashing and sending is refused, and sent
    again hashed anew."""
    last = None
    for attempt in range(UPLOAD_TRIES):
        sha, size = hash_file(f)
        try:
            if not api.blob_exists(sha):
                api.put_blob(sha, f)
            return {"sha256": sha, "size": size}
        except APIError as e:
            last = e
            time.sleep(backoff_delay(attempt + 1, base=0.2, cap=5.0))
    raise TaskError(f"upload of {label} failed after {UPLOAD_TRIES} tries: {last}")


def upload_open_files(api, files, workers: int = 4) -> list[dict]:
    """Upload (relative path, open file) pairs (closing each); returns [{path, sha256, size}] by path."""
    out: list[dict] = []
    gate = threading.BoundedSemaphore(IN_FLIGHT)

    def one(rel, f):
        try:
            return {"path": rel, **upload_blob(api, f, rel)}
        finally:
            f.close()
            gate.release()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="up") as pool:
        futures = []
        for rel, f in files:
            gate.acquire()
            futures.append(pool.submit(one, rel, f))
        out = [fu.result() for fu in futures]
    return sorted(out, key=lambda e: e["path"])


def container_rel(path: str) -> str:
    """A results path as a task names it (`00000002`, `/sly_task_data/results/x`) -> relative."""
    if path == CONTAINER_RESULTS or path.startswith(CONTAINER_RESULTS + "/"):
        path = path[len(CONTAINER_RESULTS):]
    return path.strip("/")


class ResultsDir:
    """results/ of one task, opened once without following links; skips are logged once each."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.path = ctx.task_dir / "results"
        self.skipped: set[str] = set()
        self.lock = threading.Lock()
        self.fd: int | None = None

    def open(self) -> "ResultsDir":
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

    def skip(self, rel: str, reason: str) -> None:
        with self.lock:
            if rel in self.skipped:
                return
            self.skipped.add(rel)
        self.ctx.log(f"results: {rel} {reason}; skipped (only regular files and folders are read)",
                     level="warning")

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

def upload_artifacts(ctx, name: str) -> dict | None:
    """Everything under results/ as the task's artifacts; None when there is nothing."""
    res = ResultsDir(ctx).open()
    try:
        entries = upload_open_files(ctx.api, res.files())
    finally:
        res.close()
    if not entries:
        ctx.log("results: nothing under results/ to upload as artifacts", level="warning")
        return None
    try:
        answer = ctx.api.post_results(ctx.task_id, "artifacts", name, entries)
    except APIError as e:
        raise TaskError(f"results: the server refused the artifacts: {e}") from None
    ctx.log(f"uploaded {len(entries)} files ({sum(e['size'] for e in entries) / 1048576:.1f} MB) as artifacts")
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
            raise TaskError("inference: the task wrote no project (a folder results/<project name>/ with "
                            "meta.json, <dataset>/img/ and <dataset>/ann/)")
        pfd = safefs.open_rel_dir(res.fd, folder)
        try:
            meta = res.read_json(pfd, "meta.json", f"{folder}/meta.json")
            if not isinstance(meta, dict):
                raise TaskError(f"results: {folder}/meta.json is not a project meta (a JSON object)")
            entries = upload_open_files(ctx.api, _project_items(res, pfd, folder, anns))
        finally:
            os.close(pfd)
    finally:
        res.close()
    if not entries:
        raise TaskError(f"inference: the result project {folder!r} has no items")
    for e in entries:
        if anns.get(e["path"]) is not None:
            e["ann"] = anns[e["path"]]
    ctx.log(f"uploading project {name!r} from results/{folder}/: {len(entries)} items, "
            f"{sum(1 for a in anns.values() if a is not None)} annotations")
    try:
        answer = ctx.api.post_results(ctx.task_id, "project", name, entries, meta=meta)
    except APIError as e:
        raise TaskError(f"results: the server refused the project: {e}") from None
    ctx.log(f"uploaded project {name!r}: {len(entries)} items")
    return answer


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
            for rel, f in safefs.walk_files(ifd, lambda r, why: res.skip(f"{folder}/{ds}/img/{r}", why)):
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

def store_and_upload_model(ctx, res: ResultsDir, rel: str, name: str, **extra) -> dict | None:
    """results/<rel> (a folder, or one file) -> the model cache -> the server as a model.

    Returns {"subdir", "hash", "files", "name", "model_id", ...extra} or None when there was
    nothing to store (missing, empty, or skipped: logged)."""
    label = rel
    dir_fd = None
    try:
        try:
            dir_fd = safefs.open_rel_dir(res.fd, rel)
            files = safefs.walk_files(dir_fd, lambda r, why: res.skip(f"{rel}/{r}", why))
        except safefs.Skipped as s:
            if "regular file" not in str(s):
                raise
            files = iter([(rel.rsplit("/", 1)[-1], safefs.open_rel_file(res.fd, rel))])
        try:
            mhash, entries, entry = cache.store_model(ctx.config, files)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
    except FileNotFoundError:
        ctx.log(f"results: {label} does not exist; no model made of it", level="warning")
        return None
    except safefs.Skipped as s:
        res.skip(label, str(s))
        return None
    if not entries:
        ctx.log(f"results: {label} holds no regular file; no model made of it", level="warning")
        return None
    for e in entries:
        with open(entry / e["path"], "rb") as f:     # the cache's own copy: the bytes hashed above
            upload_blob(ctx.api, f, f"{label}/{e['path']}")
    checkpoint = extra.get("checkpoint")
    try:
        answer = ctx.api.post_results(ctx.task_id, "model", name, entries, checkpoint=checkpoint)
    except APIError as e:
        raise TaskError(f"results: the server refused the model {name!r}: {e}") from None
    model_id = (answer.get("results") or {}).get("model_id")
    ctx.log(f"model {name!r} from results/{label}: {len(entries)} files, "
            f"{sum(e['size'] for e in entries) / 1048576:.1f} MB, hash {mhash[:12]}, cached; id {model_id}")
    return {"subdir": rel, "hash": mhash, "files": entries, "name": name, "model_id": model_id, **extra}


def checkpoint_info(line: dict) -> dict:
    """`checkpoint` for the server from an SDK CHECKPOINT event: epoch and numeric metrics."""
    optional = line.get("optional") if isinstance(line.get("optional"), dict) else {}
    out: dict = {}
    epoch = optional.get("epoch", line.get("epoch"))
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        out["epoch"] = epoch
    metrics = {k: v for k, v in optional.items()
               if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        out["metrics"] = metrics
    return out


class CheckpointUploader:
    """While the container runs: `checkpoint` events and (custom tasks) files closed under results/.

    train: each checkpoint's folder becomes a model (cached, uploaded, listed on the task); the
    list is kept in tasks/<id>/checkpoints.json so that a task process that re-attaches after a
    restart still knows the last one. custom: checkpoints and closed files become artifacts (a
    file again only when its size or mtime changed). Created in the handler (threads and the
    inotify watch belong to the task process).
    """

    def __init__(self, ctx, results_dir: Path | None = None):
        self.ctx = ctx
        self.kind = str(ctx.task.get("type") or "custom")
        self.res = ResultsDir(ctx)
        self.q: queue.Queue = queue.Queue()
        self.seen: dict[str, tuple] = {}
        self.uploaded = 0
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.checkpoints: list[dict] = self._load()
        self.observer = None
        self.thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)

    @property
    def state_path(self) -> Path:
        return self.ctx.task_dir / CHECKPOINTS_FILE

    def _load(self) -> list[dict]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def _save(self) -> None:
        tmp = self.state_path.with_name(CHECKPOINTS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.checkpoints))
        tmp.replace(self.state_path)

    def last_checkpoint(self) -> dict | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def start(self) -> "CheckpointUploader":
        self.res.open()
        if self.kind == "custom":
            self._watch()
        self.thread.start()
        return self

    def _watch(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        uploader, root = self, str(self.res.path)

        class Handler(FileSystemEventHandler):
            def on_closed(self, event):
                if not event.is_directory:
                    rel = os.path.relpath(os.fsdecode(event.src_path), root)
                    if not rel.startswith(".."):
                        uploader.q.put(("file", rel, None))

        self.observer = Observer()
        self.observer.schedule(Handler(), root, recursive=True)
        self.observer.start()

    def on_event(self, line: dict) -> None:
        """A parsed log line with an event_type (called from the log reader)."""
        if line.get("event_type") != "checkpoint" or self.kind == "inference":
            return
        rel = line.get("subdir") or line.get("path")
        if isinstance(rel, str) and rel:
            self.q.put(("checkpoint", container_rel(rel), line))

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)
        self.q.put(None)
        if self.thread.is_alive():
            self.thread.join(600)
        self.res.close()

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            kind, rel, line = job
            try:
                if not rel:
                    self.ctx.log("results: a checkpoint event names no folder under results/; ignored",
                                 level="warning")
                elif kind == "file":
                    self._upload_artifact_file(rel)
                elif self.kind == "train":
                    self._checkpoint_model(rel, line)
                else:
                    self._checkpoint_artifacts(rel)
            except TaskError as e:
                self.failed.append(rel)
                self.ctx.log(str(e), level="error")
            except Exception as e:  # noqa: BLE001 - one checkpoint failing does not stop the task
                self.failed.append(rel)
                self.ctx.log(f"checkpoint {rel}: upload failed: {type(e).__name__}: {e}", level="warning")

    def _checkpoint_model(self, rel: str, line: dict) -> None:
        info = checkpoint_info(line)
        done = store_and_upload_model(self.ctx, self.res, rel, f"{model_name(self.ctx)} checkpoint {rel.replace('/', '-')}",
                                      checkpoint=info or None)
        if done is None:
            return
        done["checkpoint"] = info
        self.checkpoints.append(done)
        self._save()

    def _checkpoint_artifacts(self, rel: str) -> None:
        try:
            d = safefs.open_rel_dir(self.res.fd, rel)
        except FileNotFoundError:
            return
        except safefs.Skipped as s:
            if "regular file" in str(s):
                self._upload_artifact_file(rel)
            else:
                self.res.skip(rel, str(s))
            return
        try:
            files = safefs.walk_files(d, lambda r, why: self.res.skip(f"{rel}/{r}", why))
            self._post_artifacts(((f"{rel}/{r}", f) for r, f in files), f"checkpoint {rel}")
        finally:
            os.close(d)

    def _upload_artifact_file(self, rel: str) -> None:
        try:
            f = safefs.open_rel_file(self.res.fd, rel)
        except FileNotFoundError:
            return
        except safefs.Skipped as s:
            self.res.skip(rel, str(s))
            return
        self._post_artifacts([(rel, f)], rel)

    def _changed(self, files):
        """Only the files whose size or mtime differ from when they were last uploaded."""
        for rel, f in files:
            st = os.fstat(f.fileno())
            key = (st.st_size, st.st_mtime_ns)
            if self.seen.get(rel) == key:
                f.close()
                continue
            self.seen[rel] = key
            yield rel, f

    def _post_artifacts(self, files, name: str) -> None:
        entries = upload_open_files(self.ctx.api, self._changed(files), workers=2)
        if not entries:
            return
        self.ctx.api.post_results(self.ctx.task_id, "artifacts", name, entries)
        self.uploaded += len(entries)
        self.ctx.log(f"uploaded {name}: {len(entries)} files as artifacts")


def model_name(ctx) -> str:
    name = str((ctx.task.get("config") or {}).get("model_name") or f"task {ctx.task_id} model")
    # The server takes a model name as one path component (it names a folder on download).
    return name.replace("/", "-").replace("\\", "-").strip(". ")[:200] or f"task {ctx.task_id} model"


def finish_train(ctx, live: CheckpointUploader) -> dict:
    """After exit 0: results/model/ (when the task wrote one) or the last checkpoint is the task's model."""
    res = ResultsDir(ctx).open()
    try:
        own = None
        try:
            os.stat("model", dir_fd=res.fd, follow_symlinks=False)
            own = store_and_upload_model(ctx, res, "model", model_name(ctx))
        except FileNotFoundError:
            pass
    finally:
        res.close()
    if own is not None:
        return own
    last = live.last_checkpoint()
    if last is None:
        failed = f" ({len(live.failed)} failed to upload: {', '.join(live.failed[:3])})" if live.failed else ""
        raise TaskError("train: no checkpoint was produced: no CHECKPOINT event named a folder under results/ "
                        f"with files, and the task wrote no results/model/{failed}")
    try:
        ctx.api.post_results(ctx.task_id, "model", last["name"], last["files"],
                             checkpoint={**(last.get("checkpoint") or {}), "final": True})
    except APIError as e:
        raise TaskError(f"results: the server refused the final model: {e}") from None
    ctx.log(f"the task's model is its last checkpoint, results/{last['subdir']} (model id {last.get('model_id')})")
    return last
