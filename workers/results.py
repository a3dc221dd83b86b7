"""Upload what a task wrote under results/: files as blobs (skipped when the server has them),
then a `results` record (model, project or artifacts). `CheckpointUploader` uploads checkpoints
and files closed under results/ while the container still runs (watchdog, inotify)."""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers.errors import TaskError

UPLOAD_TRIES = 4
CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(CHUNK)
            if not b:
                return h.hexdigest(), size
            h.update(b)
            size += len(b)


def check_inside(root: Path, path: Path) -> None:
    """Refuse symlinks and anything whose real path leaves `root`."""
    root_real = os.path.realpath(root)
    cur = path
    while True:
        if cur.is_symlink():
            raise TaskError(f"results: {cur.relative_to(root) if root in cur.parents else cur} is a symlink; "
                            f"refused (results must be plain files under results/)")
        if cur == root or root not in cur.parents:
            break
        cur = cur.parent
    real = os.path.realpath(path)
    if os.path.commonpath([root_real, real]) != root_real:
        raise TaskError(f"results: {path} leaves results/; refused")


def collect(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under root as (posix relative path, path); symlinks refused."""
    if not root.exists():
        return []
    check_inside(root.parent, root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in dirnames + filenames:
            p = d / name
            if p.is_symlink():
                raise TaskError(f"results: {p.relative_to(root).as_posix()} is a symlink; refused "
                                f"(results must be plain files under results/)")
        for name in filenames:
            p = d / name
            if not p.is_file():
                raise TaskError(f"results: {p.relative_to(root).as_posix()} is not a regular file; refused")
            files.append((p.relative_to(root).as_posix(), p))
    files.sort()
    return files


def upload_blob(api, path: Path) -> dict:
    """PUT one file unless the server has its sha256; retried. Returns {sha256, size}."""
    sha, size = sha256_file(path)
    last = None
    for attempt in range(UPLOAD_TRIES):
        try:
            if not api.blob_exists(sha):
                api.put_blob(sha, path)
            return {"sha256": sha, "size": size}
        except APIError as e:
            last = e
            time.sleep(backoff_delay(attempt + 1, base=0.2, cap=5.0))
    raise TaskError(f"upload of {path.name} failed after {UPLOAD_TRIES} tries: {last}")


def upload_files(ctx, files: list[tuple[str, Path]], workers: int = 4) -> list[dict]:
    """Upload (path, file) pairs in a small pool; returns the results `files` list."""
    def one(item):
        rel, p = item
        return {"path": rel, **upload_blob(ctx.api, p)}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="up") as pool:
        return list(pool.map(one, files))


def upload_tree(ctx, root: Path, kind: str, name: str) -> dict | None:
    """Upload everything under root as one result of `kind`; None when there is nothing."""
    files = collect(root)
    if not files:
        ctx.log(f"results: nothing under {root.relative_to(ctx.task_dir).as_posix()}/ to upload as a {kind}",
                level="warning")
        return None
    total = sum(p.stat().st_size for _, p in files)
    ctx.log(f"uploading {len(files)} files ({total / 1048576:.1f} MB) as {kind} {name!r}")
    entries = upload_files(ctx, files)
    try:
        answer = ctx.api.post_results(ctx.task_id, kind, name, entries)
    except APIError as e:
        raise TaskError(f"results: the server refused the {kind}: {e}") from None
    ctx.log(f"uploaded {kind} {name!r}: {len(entries)} files")
    return answer


class CheckpointUploader:
    """While the container runs: files closed under results/ and `checkpoint` events -> artifacts.

    Created in the handler (threads and the inotify watch belong to the task process). A file is
    uploaded again only when its size or mtime changed.
    """

    def __init__(self, ctx, results_dir: Path):
        self.ctx, self.root = ctx, results_dir
        self.q: queue.Queue = queue.Queue()
        self.seen: dict[str, tuple] = {}
        self.uploaded = 0
        self.errors: list[str] = []
        self.observer = None
        self.thread = threading.Thread(target=self._run, name="checkpoints", daemon=True)

    def start(self) -> "CheckpointUploader":
        uploader = self

        class Handler(FileSystemEventHandler):
            def on_closed(self, event):
                if not event.is_directory:
                    uploader.q.put(("file", Path(os.fsdecode(event.src_path))))

        self.root.mkdir(parents=True, exist_ok=True)
        self.observer = Observer()
        self.observer.schedule(Handler(), str(self.root), recursive=True)
        self.observer.start()
        self.thread.start()
        return self

    def on_event(self, line: dict) -> None:
        """A parsed log line with an event_type (called from the log reader)."""
        if line.get("event_type") != "checkpoint":
            return
        rel = line.get("path") or line.get("subdir")
        if isinstance(rel, str) and rel:
            self.q.put(("checkpoint", rel))

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)
        self.q.put(None)
        self.thread.join(60)

    def _run(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            kind, what = job
            try:
                if kind == "file":
                    self._upload_paths([what], what.relative_to(self.root).as_posix())
                else:
                    target = (self.root / what.lstrip("/")) if not what.startswith("/sly_task_data/results") \
                        else self.root / os.path.relpath(what, "/sly_task_data/results")
                    check_inside(self.root, target)
                    paths = [p for _, p in collect(target)] if target.is_dir() else [target]
                    self._upload_paths(paths, f"checkpoint {what}")
            except TaskError as e:
                self.errors.append(str(e))
                self.ctx.log(str(e), level="error")
            except Exception as e:  # noqa: BLE001 - a checkpoint upload failing does not fail the task
                self.ctx.log(f"checkpoint upload failed: {type(e).__name__}: {e}", level="warning")

    def _upload_paths(self, paths: list[Path], name: str) -> None:
        todo = []
        for p in paths:
            try:
                check_inside(self.root, p)
                st = p.stat()
            except FileNotFoundError:
                continue
            if not p.is_file():
                continue
            rel = p.relative_to(self.root).as_posix()
            key = (st.st_size, st.st_mtime_ns)
            if self.seen.get(rel) == key:
                continue
            self.seen[rel] = key
            todo.append((rel, p))
        if not todo:
            return
        entries = upload_files(self.ctx, todo, workers=2)
        self.ctx.api.post_results(self.ctx.task_id, "artifacts", name, entries)
        self.uploaded += len(entries)
        self.ctx.log(f"uploaded {name}: {len(entries)} files as artifacts")
