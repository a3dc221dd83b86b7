"""Result files -> the server, and what one task's results may cost.

Files up to protocol.bulk.SMALL_BLOB go BULK_FILES at a time (hashed, asked about in one check,
the missing ones sent in one bulk upload); larger ones one by one (HEAD, then PUT). Each file is
hashed and sent from the same open file; the server checks the hash.

What a task's results cost the agent is bounded (`Budget`): TASK_RESULTS_MAX_FILES files and
TASK_RESULTS_MAX_MB read to hash or copy them over the task's life.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from protocol import bulk
from protocol.backoff import backoff_delay
from protocol.errors import APIError
from workers import cache
from workers.errors import TaskError

UPLOAD_TRIES = 4
CHUNK = 1 << 20
POST_FILES = 1000  # artifacts in one POST (each post costs the server per entry)
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
