"""What a task uploads while its container runs (`CheckpointUploader`), and checkpoint -> model.

    train   every CHECKPOINT event's `subdir` -> a model, stored in the node's model cache and
            uploaded at once (`store_and_upload_model`)
    custom  checkpoints and files closed under results/ -> the task's artifacts, in batches
            (inotify on a capped number of folders, else a periodic scan: workers/results_watch.py)

A file or checkpoint folder unchanged since its upload (same paths, sizes, mtimes, inodes) is not
read again.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path

from protocol.errors import APIError
from workers import cache, safefs
from workers.errors import TaskError
from workers.results_dir import ResultsDir, container_rel
from workers.results_watch import WATCH_DIRS, ResultsWatch
from workers.uploads import POST_FILES, Budget, ResultsLimit, server_refused, upload_open_files

CHECKPOINTS_FILE = "checkpoints.json"  # tasks/<id>/, not mounted: what this task uploaded so far
BATCH_S = 1.0  # a closed file waits at most this long for others to share its post
SCAN_S = 5.0  # results/ is walked this often once it has too many folders to watch
PENDING_MAX = 10000  # closed files remembered before the next post; past it: one walk


def model_name(ctx) -> str:
    name = str((ctx.task.get("config") or {}).get("model_name") or f"task {ctx.task_id} model")
    # The server takes a model name as one path component (it names a folder on download).
    return name.replace("/", "-").replace("\\", "-").strip(". ")[:200] or f"task {ctx.task_id} model"


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
