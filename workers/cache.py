"""The content-addressed cache under storage/: where a blob lives, storing it, handing it to a task, eviction.

    storage/images/<h[0:2]>/<h[2:5]>/<h><.ext>    one file per blob (h = its sha256)
    storage/models/<h[0:2]>/<h[2:5]>/<h>/...      one folder per model (h = the model's hash)
    storage/records/images/...  records/models/...  one record per cached file, same relative path

A blob is stored once: fetched into tmp/<sha>.part under its own lock file (`blob_lock`, so two
tasks needing it at the same moment fetch it once, with no lock shared by anything else), then
made read-only, renamed into place and recorded (`store_blob`). Cached files are read-only (0444)
and are only ever hard-linked (copied across filesystems) into a task's data/ and model/, which
the container gets read-only (`link_to_task`); results are copied into the cache, never linked.
A file's record (`{sha256, size, mtime_ns, ino, dev}`, written when it was stored) is checked
before the file is reused: a file whose size, mtime, inode or mode differ, or that has no record,
is treated as missing and fetched again into a new inode (a task dir still linking the old one
keeps it).

A cache entry's last use is the mtime of its record (an image) or of its folder (a model),
touched each time it is linked into a task dir; the file's own mtime is part of its record and
is never touched. Evicting an entry never breaks a running task: its files are hard links (or
copies) in the task dir, so the bytes stay until the task dir goes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
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


def record_path(config: Config, path: Path) -> Path:
    """Where the record of a cached file (under images/ or models/) is kept."""
    storage = config.images_dir.parent
    return storage / "records" / path.relative_to(storage)


def write_record(config: Config, path: Path, sha: str) -> dict:
    """Record what a file just stored in the cache looks like; make it read-only first."""
    os.chmod(path, 0o444)
    st = os.lstat(path)
    rec = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}
    rp = record_path(config, path)
    rp.parent.mkdir(parents=True, exist_ok=True)
    tmp = rp.with_name(rp.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, rp)
    return rec


def verify(config: Config, path: Path, sha: str, size: int | None = None) -> bool:
    """Whether the cached file at `path` is the one stored for blob `sha`, unchanged since."""
    try:
        st = os.lstat(path)
        rec = json.loads(record_path(config, path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(rec, dict)
        and stat.S_ISREG(st.st_mode)
        and not st.st_mode & 0o222
        and rec.get("sha256") == sha
        and st.st_size == rec.get("size")
        and (size is None or st.st_size == size)
        and st.st_mtime_ns == rec.get("mtime_ns")
        and st.st_ino == rec.get("ino")
        and st.st_dev == rec.get("dev")
    )


def entry_of(config: Config, path: Path) -> Path:
    """The cache entry a cached file belongs to: itself, or its model's folder."""
    try:
        rel = path.relative_to(config.models_dir)
    except ValueError:
        return path
    return config.models_dir.joinpath(*rel.parts[:3])


def part_path(config: Config, sha: str) -> Path:
    """Where blob `sha` is fetched to (kept across tries, so a fetch resumes) before `store_blob`."""
    return config.tmp_dir / f"{sha}.part"


def _lock_path(config: Config, sha: str) -> Path:
    return config.tmp_dir / f"{sha}.lock"


@contextlib.contextmanager
def blob_lock(config: Config, sha: str):
    """Hold blob `sha`'s fetch lock; check `verify` once inside, another task may have stored it."""
    lock_path = _lock_path(config, sha)
    try:
        lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        config.tmp_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock_fd)


def store_blob(config: Config, part: Path, final: Path, sha: str) -> None:
    """Under `blob_lock(sha)`: the verified download `part` becomes the cached file `final`."""
    os.chmod(part, 0o444)
    try:
        os.replace(part, final)  # a new inode: task dirs linking a changed one keep theirs
    except FileNotFoundError:  # its folder is new, or was evicted by another task meanwhile
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
    write_record(config, final, sha)
    # Whoever waits on this lock finds the blob in place; a newcomer makes a new lock file.
    _lock_path(config, sha).unlink(missing_ok=True)


def link_to_task(config: Config, path: Path, dest: Path, touched: set, made_dirs: set | None = None) -> None:
    """Give a task the cached file at `path` at `dest`; its entry is marked used once per `touched`."""
    entry = entry_of(config, path)
    if entry not in touched:
        touch(config, entry)
        touched.add(entry)
    link_into(path, dest, made_dirs)


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


def touch(config: Config, entry: Path) -> None:
    """Mark a cache entry as used now (LRU): its record (an image) or its folder (a model)."""
    target = entry if entry.is_dir() else record_path(config, entry)
    try:
        os.utime(target)
    except OSError:
        pass


def last_use(config: Config, entry: Path) -> float:
    if entry.is_dir():
        return entry.stat().st_mtime
    try:
        return record_path(config, entry).stat().st_mtime
    except OSError:
        return entry.stat().st_mtime


def manifest_hash(files: list[dict]) -> str:
    """A model's hash: sha256 of the lines '<path> <sha256>\\n' sorted by path (the server's)."""
    manifest = "".join(f"{f['path']} {f['sha256']}\n" for f in sorted(files, key=lambda f: f["path"]))
    return hashlib.sha256(manifest.encode()).hexdigest()


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
    reason = (
        ""
        if ok
        else (
            f"not enough disk: {free:.0f} MB free under {config.root}, "
            f"{config.min_free_disk_mb} MB required (MIN_FREE_DISK_MB)"
        )
    )
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
    for p in list(config.images_dir.glob("??/???/*")) + list(config.models_dir.glob("??/???/*")):
        try:
            entries.append((last_use(config, p), _entry_size(p), p))
        except OSError:
            pass
    entries.sort(key=lambda e: e[0])
    return entries


def remove_entry(config: Config, path: Path) -> None:
    """Remove one cache entry (an image file or a model folder) and its records."""
    remove_path(path)
    remove_path(record_path(config, path))


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
            return (
                f"not enough disk: {free:.0f} MB free under {config.root}, {config.min_free_disk_mb} MB "
                f"(MIN_FREE_DISK_MB) + {need_mb:.0f} MB for this task's downloads required"
            )
        if config.cache_quota_mb > 0:
            used = sum(e[1] for e in entries) / MB
            if used + need_mb > config.cache_quota_mb:
                return (
                    f"cache quota exceeded: {used:.0f} MB cached + {need_mb:.0f} MB to download "
                    f"> CACHE_QUOTA_MB={config.cache_quota_mb}"
                )
        return ""

    if config.cache_quota_mb <= 0 and free_mb(config) >= config.min_free_disk_mb + need_mb:
        return {"evicted": 0, "freed_bytes": 0}  # the usual case: no need to scan the cache
    entries = cache_entries(config)
    reason = short()
    while reason:
        victims = [e for e in entries if e[2] not in keep]
        if not victims:
            raise DiskError(reason)
        victim = victims[0]
        entries.remove(victim)
        remove_entry(config, victim[2])
        evicted += 1
        freed += victim[1]
        reason = short()
    if evicted and log:
        log(f"cache: evicted {evicted} least recently used entries ({freed / MB:.1f} MB)")
    return {"evicted": evicted, "freed_bytes": freed}


def store_model(config: Config, files, chunk: int = 1 << 20, charge=None) -> tuple[str, list[dict], Path]:
    """Copy (relative path, open binary file) pairs into the cache as one model entry (each
    file is closed once copied).

    The bytes are copied, never linked: the source is a task's results/, which its container may
    still write. Returns (model hash, [{path, sha256, size}], entry folder). Files already in the
    entry and unchanged since stored are kept as they are."""
    staging = Path(config.tmp_dir) / f"model-{os.getpid()}-{os.urandom(4).hex()}"
    entries: list[dict] = []
    try:
        for rel, f in files:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            size = 0
            with f, open(dest, "xb") as out:
                while b := f.read(chunk):
                    if charge is not None:
                        charge(len(b))
                    h.update(b)
                    out.write(b)
                    size += len(b)
            entries.append({"path": rel, "sha256": h.hexdigest(), "size": size})
        mhash = manifest_hash(entries)
        final = model_dir(config, mhash)
        for e in entries:
            target = final / e["path"]
            if verify(config, target, e["sha256"], e["size"]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / e["path"], target)
            write_record(config, target, e["sha256"])
        touch(config, final)
        return mhash, sorted(entries, key=lambda e: e["path"]), final
    finally:
        shutil.rmtree(staging, ignore_errors=True)
