"""The content-addressed cache under storage/: where a blob lives, storing it, handing it to a task, eviction.

    storage/images/<h[0:2]>/<h[2:5]>/<h><.ext>    one file per blob (h = its sha256)
    storage/models/<h[0:2]>/<h[2:5]>/<h>/...      one folder per model (h = the model's hash)
    storage/anns/<k[0:2]>/<k>.json                one file per annotation text (k: `text_key`)
    storage/records/images/...  records/models/...  records/anns/...  one record per cached file

A blob is stored once. Blobs fetched many per request are each written straight into the task
dir of the first item that needs it (a new read-only file, hashed on the way, `create_file`),
recorded through the open descriptor (`Layout.seal`) and hard-linked into the cache
(`Layout.store_written`), with no lock. A single large blob is fetched under its own lock file
(`blob_lock`: two tasks needing it at the same moment fetch it once) into tmp/<sha>.part, kept
across tries so that a fetch resumes with Range, then made read-only, recorded and renamed into
place (`store_blob`).
Cached files are read-only (0444) and are only ever hard-linked (copied across filesystems) into
a task's data/ and model/, which the container gets read-only (`link_to_task`); results are
copied into the cache, never linked. A file's record (its sha256, size and mtime_ns, written
when it was stored) is checked before the file is reused: a file whose size or mtime differ,
that is writable, or that has no record, is treated as missing and fetched again into a new inode
(a task dir still linking the old one keeps it).

A record is an extended attribute of the cached file itself (`user.sly.record`), set before the
file is linked or renamed into place: storing a blob creates no name besides the file's own,
needs no lock (the record travels with its inode, so two tasks storing one blob at once each put
a whole, recorded file in place), and checking a cached file costs one lstat and one getxattr.
Its value is the sha256's 32 bytes, then the size and the mtime_ns as little-endian 64-bit
integers: 48 bytes, which ext4 keeps inside a 256-byte inode. The previous version's text
`<sha256> <size> <mtime_ns>` (87 bytes) took a 4 KiB block of its own per file; it is still read.
On a filesystem without user extended attributes a record is a symbolic link
`storage/records/<images|models>/<same relative path>` whose target is the text
`<sha256> <size> <mtime_ns> <ino> <dev>` (never followed),
written under the blob's `store_lock` once the file is in place; those, and records written as
JSON files by earlier versions, are still read.

Annotations are cached too (`Layout.link_text`): a task's ann/<item>.json is a hard link to the
cached file of that text, so a project prepared again links its annotations instead of creating
a file for each (creating a file costs several times a link, more on a busy disk). A new text is
written once, into the task dir, and that file is linked into the cache. A text is derived data,
written again whenever in doubt: it has no record, its lstat alone tells whether it changed since
written (see there).

A cache entry's last use is the ctime of its file (an image, a text: each link into a task dir
sets it, and so does removing that link with the task dir; the file's mtime is part of its record
and never touched), or the mtime of its folder (a model), touched each time it is linked into a
task dir. Evicting an entry never breaks a running task: its files are hard links (or copies) in
the task dir, so the bytes stay until the task dir goes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import stat
import struct
import threading
from pathlib import Path

from node.config import Config
from node.storage import remove_path

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MB = 1024 * 1024
_EXT_RE = re.compile(r"\.[a-z0-9]{1,10}")
# A part file: made here, never followed through a link, read-only from the start (written
# through its descriptor), so that storing it needs no chmod.
_PART_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
ANNS_DIR = "anns"
RECORD_XATTR = "user.sly.record"  # a cached file's record (see the module's docstring)
_RECORD = struct.Struct("<32sQq")  # sha256 digest, size, mtime_ns: 48 bytes, inside the inode
# A filesystem that keeps no user extended attributes answers one of these to setxattr.
_NO_XATTR_ERRNOS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
_part_seq = itertools.count(1)


class DiskError(RuntimeError):
    """Not enough disk for a task, even after evicting the cache."""


def check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return sha


class Layout:
    """The cache's folders of one config as plain strings, computed once, and the per-file
    operations on them (path of an image, its record, verify, link). A large project's
    preparation calls these 100,000 times: they cost their system calls and little else."""

    def __init__(self, config: Config):
        self.storage = os.fspath(config.images_dir.parent)
        self._storage_sep = self.storage + os.sep
        self._models_sep = os.fspath(config.models_dir) + os.sep
        self.images = os.fspath(config.images_dir)
        self.models = os.fspath(config.models_dir)
        self.records = os.path.join(self.storage, "records")
        self.anns = os.path.join(self.storage, ANNS_DIR)
        self.tmp = os.fspath(config.tmp_dir)
        # Records are extended attributes until the filesystem refuses one (then symbolic links).
        self.xattr = True

    def image(self, sha: str, name: str) -> str:
        """Cache path of an item blob: the extension of the item's name is kept (tools look at it)."""
        check_sha(sha)
        ext = os.path.splitext(name)[1].lower()
        if not _EXT_RE.fullmatch(ext):
            ext = ""
        return f"{self.images}/{sha[0:2]}/{sha[2:5]}/{sha}{ext}"

    def record(self, path: str | os.PathLike) -> str:
        """Where the record of a cached file (under images/ or models/) is kept."""
        path = os.fspath(path)
        if not path.startswith(self._storage_sep):
            raise ValueError(f"{path!r} is not under {self.storage!r}")
        return self.records + path[len(self.storage) :]

    def entry(self, path: str | os.PathLike) -> str:
        """The cache entry a cached file belongs to: itself, or its model's folder."""
        path = os.fspath(path)
        if not path.startswith(self._models_sep):
            return path
        parts = path[len(self.models) + 1 :].split(os.sep, 3)
        return os.path.join(self.models, *parts[:3])

    def verify(self, path: str | os.PathLike, sha: str, size: int | None = None) -> bool:
        """Whether the cached file at `path` is the one stored for blob `sha`, unchanged since."""
        return self.check(path, sha, size) is True

    def check(self, path: str | os.PathLike, sha: str, size: int | None = None) -> bool | None:
        """`verify`, telling apart a file that is not that blob (False: changed since stored, or
        no record) from no file at all (None)."""
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o222 or (size is not None and st.st_size != size):
            return False
        try:
            value = os.getxattr(path, RECORD_XATTR, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENODATA, *_NO_XATTR_ERRNOS):
                return False
            return self._verify_link_record(path, st, sha)  # no such attribute: a record as a link?
        if len(value) == _RECORD.size:
            return value == _record_value(sha, st)
        return value == b"%s %d %d" % (sha.encode(), st.st_size, st.st_mtime_ns)  # the previous version's text

    def _verify_link_record(self, path: str | os.PathLike, st: os.stat_result, sha: str) -> bool:
        try:
            rec = _read_record(self.record(path))
        except (OSError, ValueError):
            return False
        return (
            rec is not None
            and rec[0] == sha
            and st.st_size == rec[1]
            and st.st_mtime_ns == rec[2]
            and st.st_ino == rec[3]
            and st.st_dev == rec[4]
        )

    def touch(self, entry: str) -> None:
        """Mark a model's cache entry (its folder) as used now (LRU). A cached file needs none: each
        link into a task dir sets its ctime, its last use (a copy sets it too: `link_into`)."""
        if entry.startswith(self._models_sep):
            try:
                os.utime(entry, follow_symlinks=False)
            except OSError:
                pass

    def link_to_task(self, path: str, dest: str, touched: set) -> None:
        """Give a task the cached file at `path` at `dest`; its entry is marked used once per `touched`."""
        entry = self.entry(path)
        if entry not in touched:
            self.touch(entry)
            touched.add(entry)
        link_into(path, dest)

    def _seal(self, target: str | os.PathLike | int, sha: str) -> os.stat_result | None:
        """Set the record of a file (read-only already; `target`: its path, or a descriptor open on
        it) on the file itself; its stat, or None (and records as links from now on) where the
        filesystem keeps no attributes."""
        if not self.xattr:
            return None
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        try:
            os.setxattr(target, RECORD_XATTR, _record_value(sha, st))
        except OSError as e:
            if e.errno not in _NO_XATTR_ERRNOS:
                raise
            self.xattr = False
            return None
        return st

    def write_record(self, path: str | os.PathLike, sha: str, chmod: bool = True) -> os.stat_result:
        """Record what a file just stored in the cache looks like; make it read-only first (unless
        it was made read-only: `chmod` False)."""
        if chmod:
            os.chmod(path, 0o444)
        st = self._seal(path, sha)
        if st is not None:
            return st
        st = os.lstat(path)
        rp = self.record(path)
        target = f"{sha} {st.st_size} {st.st_mtime_ns} {st.st_ino} {st.st_dev}"
        try:
            os.symlink(target, rp)  # the usual case: no record yet
            return st
        except FileNotFoundError:
            os.makedirs(os.path.dirname(rp), exist_ok=True)
            try:
                os.symlink(target, rp)
                return st
            except FileExistsError:
                pass
        except FileExistsError:
            pass
        # An older record: replaced in one step, so that a reader sees the old or the new one.
        tmp = f"{rp}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            os.symlink(target, tmp)
        except FileExistsError:  # left by a thread of this pid that died here
            os.unlink(tmp)
            os.symlink(target, tmp)
        os.replace(tmp, rp)
        return st

    def store_fetched(self, part: str, final: str, sha: str, size: int | None = None) -> bool:
        """A verified download in a part file of its own (`open_part`: read-only already) becomes
        the cached file `final`; returns whether it did. A record on the file is set before it is
        renamed into place, with no lock. A record as a link is written under `store_lock`, so
        that it describes the file in place; when another task stored the blob meanwhile, the
        part is dropped and that file kept."""
        if self._seal(part, sha) is not None:
            _replace(part, final)  # a stored copy of the blob replaced by another whole one is no harm
            return True
        with store_lock(self, sha):
            if self.verify(final, sha, size):
                os.unlink(part)
                return False
            _replace(part, final)
            self.write_record(final, sha, chmod=False)
            return True

    def seal(self, fd: int, sha: str) -> bool:
        """Set the record of the file open at `fd` (written, verified and read-only) before it is
        closed: no path is looked up. False where the filesystem keeps no attributes (then
        `store_written` records it as a link)."""
        return self._seal(fd, sha) is not None

    def store_written(self, path: str, final: str, sha: str, size: int | None, sealed: bool) -> None:
        """A verified blob written straight into a task dir (`path`, read-only, its record set when
        `sealed`) becomes the cached file `final` too: hard-linked there, a stale file there (or
        the copy another task stored meanwhile) replaced. Without records on files, or across
        filesystems, the cache gets a part file of its own (a link, or a copy) stored as any
        fetched one (`store_fetched`)."""
        if sealed and _link_cached(self, path, final, sha, new_folder=True):
            return
        try:
            part = link_part(self, path, sha)
        except OSError as e:
            if e.errno not in _COPY_ERRNOS:
                raise
            part, fd = open_part(self, sha)
            with open(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out)
        self.store_fetched(part, final, sha, size)

    def text_path(self, key: str) -> str:
        """Cache path of the text stored under `key` (`text_key`)."""
        check_sha(key)
        return f"{self.anns}/{key[0:2]}/{key}.json"  # one level: 256 folders, each made once

    def link_text(self, key: str, make_text, dest: str) -> None:
        """Give a task the file `dest` holding a small text (an annotation) kept in the cache under
        `key` (`text_key`): a hard link to the cached copy, written first (from `make_text()`)
        when missing or changed. A cached text has no record: its mtime is set to TEXT_MTIME_NS
        plus its size when it is written, so a write to it since, which sets the mtime to the
        time of the write, shows in its lstat alone; and each link into a task dir sets its ctime,
        its last use. Two tasks writing one text at once write the same bytes."""
        path = self.text_path(key)
        try:
            if _text_unchanged(os.lstat(path)):
                link_into(path, dest)
                return
        except FileNotFoundError:
            pass
        # Missing or changed: written once, at `dest`, and that file linked into the cache (across
        # filesystems the task has its file, and the cache goes without).
        fd = create_file(dest)
        try:
            data = make_text().encode()
            _write_all(fd, data)
            os.utime(fd, ns=(TEXT_MTIME_NS + len(data), TEXT_MTIME_NS + len(data)))
        finally:
            os.close(fd)
        _link_cached(self, dest, path, key, new_folder=False)


def _link_cached(layout: Layout, src: str, path: str, key: str, new_folder: bool) -> bool:
    """Hard-link the file just written at `src` (in a task dir) into the cache at `path`, replacing
    what is there (a changed file, or one another task stored meanwhile: same bytes, a new inode,
    so a task dir linking the old one keeps it). False across filesystems, and nothing done.
    `new_folder`: the folder is likely new (a blob's, of a million), so it is made first; else
    (a text's, of 256) only when the link finds it missing."""
    if new_folder:
        _make_folder(path)
    for _ in range(2):
        try:
            os.link(src, path)
            return True
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except FileExistsError:
            os.replace(link_part(layout, src, key), path)
            return True
        except OSError as e:
            if e.errno not in _COPY_ERRNOS:
                raise
            return False
    os.link(src, path)  # the folder was removed again in between (an eviction): its error says so
    return True


def _replace(part: str, final: str) -> None:
    """Rename `part` to `final` (a new inode: task dirs linking a changed one keep theirs)."""
    _make_folder(final)
    os.replace(part, final)


def _make_folder(path: str) -> None:
    """Make the folder of the cache path `path` if missing, trying the mkdir first: a project's
    blobs are spread over a million folders, most of them new."""
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)


def create_file(dest: str) -> int:
    """A new read-only file at `dest` (what was there replaced, never followed), open to write."""
    try:
        return os.open(dest, _PART_FLAGS, 0o444)
    except FileExistsError:
        os.unlink(dest)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    return os.open(dest, _PART_FLAGS, 0o444)


def _text_unchanged(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222 and st.st_mtime_ns == TEXT_MTIME_NS + st.st_size


def open_part(layout: Layout, sha: str) -> tuple[str, int]:
    """A new part file for blob `sha` (`unique_part_path`), read-only from the start: (its path,
    a descriptor open to write it)."""
    part = unique_part_path(layout, sha)
    try:
        return part, os.open(part, _PART_FLAGS, 0o444)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(part), exist_ok=True)
        return part, os.open(part, _PART_FLAGS, 0o444)


def link_part(layout: Layout, src: str, sha: str) -> str:
    """A new part file for blob `sha` that is a hard link to `src`; its path."""
    part = unique_part_path(layout, sha)
    try:
        os.link(src, part)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(part), exist_ok=True)
        os.link(src, part)
    return part


def text_key(obj) -> str:
    """The cache key of the text that `obj` (a JSON value) is written as: the sha256 of its compact
    JSON (the C encoder's; a fraction of what writing it indented costs) and of the format's tag.
    The indented text is a function of the compact one, so one key is one text."""
    compact = json.dumps(obj, separators=(",", ":"))
    return hashlib.sha256(TEXT_FORMAT + compact.encode()).hexdigest()


TEXT_FORMAT = b"sly_format.dumps: json indent=4\n"  # a new format must change this: new keys
TEXT_MTIME_NS = 10**18  # 2001-09-09: a cached text's mtime is this plus its size (see Layout.link_text)


def _record_value(sha: str, st: os.stat_result) -> bytes:
    """The record attribute of a file holding blob `sha` whose lstat is `st`."""
    return _RECORD.pack(bytes.fromhex(sha), st.st_size, st.st_mtime_ns)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_record(rp: str) -> tuple | None:
    """(sha256, size, mtime_ns, ino, dev) of a record; None when it is not one."""
    try:
        fields = os.readlink(rp).split(" ")
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: a regular file, i.e. an earlier version's JSON record
            raise
        rec = json.loads(Path(rp).read_text())
        if not isinstance(rec, dict):
            return None
        return rec.get("sha256"), rec.get("size"), rec.get("mtime_ns"), rec.get("ino"), rec.get("dev")
    if len(fields) != 5:
        return None
    return fields[0], *map(int, fields[1:])


def image_path(config: Config, sha: str, name: str) -> Path:
    """Cache path of an item blob: the extension of the item's name is kept (tools look at it)."""
    return Path(Layout(config).image(sha, name))


def model_dir(config: Config, model_hash: str) -> Path:
    check_sha(model_hash)
    return config.models_dir / model_hash[0:2] / model_hash[2:5] / model_hash


def record_path(config: Config, path: Path) -> Path:
    """Where the record of a cached file (under images/ or models/) is kept."""
    return Path(Layout(config).record(path))


def write_record(config: Config, path: str | os.PathLike, sha: str) -> dict:
    """Record what a file just stored in the cache looks like; make it read-only first."""
    st = Layout(config).write_record(path, sha)
    return {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def verify(config: Config, path: str | os.PathLike, sha: str, size: int | None = None) -> bool:
    """Whether the cached file at `path` is the one stored for blob `sha`, unchanged since."""
    return Layout(config).verify(path, sha, size)


def entry_of(config: Config, path: Path) -> Path:
    """The cache entry a cached file belongs to: itself, or its model's folder."""
    return Path(Layout(config).entry(path))


def part_path(config: Config, sha: str) -> Path:
    """Where blob `sha` is fetched to under its lock (kept across tries, so a fetch resumes)."""
    return config.tmp_dir / f"{sha}.part"


def unique_part_path(layout: Layout, sha: str) -> str:
    """A part file for blob `sha` that no other store uses (no lock is held: two tasks storing the
    same blob at once each make their own), in one of PART_FOLDERS folders by thread: files made
    in one folder at once wait on that folder's lock, so each download thread has its own. A
    bulk fetch makes one per blob where records are links or the cache is on another filesystem
    (`Layout.store_written`), else only to replace a cached file. Made with `open_part` or
    `link_part`."""
    folder = threading.get_native_id() % PART_FOLDERS
    return f"{layout.tmp}/parts-{folder}/{sha}.{os.getpid()}-{next(_part_seq)}.part"


PART_FOLDERS = 16


def _lock_path(config: Config, sha: str) -> Path:
    return config.tmp_dir / f"{sha}.lock"


@contextlib.contextmanager
def blob_lock(config: Config, sha: str):
    """Hold blob `sha`'s fetch lock; check `verify` once inside, another task may have stored it."""
    with _flock(str(_lock_path(config, sha)), str(config.tmp_dir)):
        yield


@contextlib.contextmanager
def store_lock(layout: Layout, sha: str):
    """Held around the few steps that store a blob (check, rename, record), by every store of it:
    then the record written describes the file in place, whatever other tasks store at the same
    moment. One of 256 lock files, by the blob's first two hex digits, made once and kept (a
    lock file per blob would be a file made and removed per blob of a bulk download)."""
    with _flock(f"{layout.tmp}/store-{sha[:2]}.lock", str(layout.tmp)):
        yield


@contextlib.contextmanager
def _flock(path: str, folder: str):
    """Hold an exclusive flock on the lock file `path` (made, with its `folder`, when missing)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def store_blob(config: Config, part: str | os.PathLike, final: str | os.PathLike, sha: str) -> None:
    """Under `blob_lock(sha)`: the verified download `part` becomes the cached file `final`."""
    os.chmod(part, 0o444)
    Layout(config).store_fetched(os.fspath(part), os.fspath(final), sha)
    # Whoever waits on this lock finds the blob in place; a newcomer makes a new lock file.
    _lock_path(config, sha).unlink(missing_ok=True)


def link_to_task(config: Config, path: Path, dest: Path, touched: set) -> None:
    """Give a task the cached file at `path` at `dest`; its entry is marked used once per `touched`."""
    Layout(config).link_to_task(os.fspath(path), os.fspath(dest), touched)


def link_into(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Hard link src at dest (replacing what is there); copy when they are on different filesystems.
    The link is tried first: dest's folder is made only when it turns out missing (once a folder)."""
    try:
        os.link(src, dest)
        return
    except FileExistsError:
        os.unlink(dest)
    except FileNotFoundError:
        if os.path.lexists(src):  # else: src is gone, and the link below says so
            os.makedirs(os.path.dirname(dest), exist_ok=True)
    except OSError as e:
        if e.errno not in _COPY_ERRNOS:
            raise
        _copy(src, dest)
        return
    try:
        os.link(src, dest)
    except OSError as e:
        if e.errno not in _COPY_ERRNOS:
            raise
        _copy(src, dest)


_COPY_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EMLINK)  # another filesystem, no links there, too many


def _copy(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    shutil.copyfile(src, dest)
    os.chmod(dest, 0o444)
    os.chmod(src, 0o444)  # a cached file (0444 already): sets its ctime, its last use, as a link does


def touch(config: Config, entry: Path) -> None:
    """Mark a model's cache entry (its folder) as used now (LRU)."""
    Layout(config).touch(os.fspath(entry))


def last_use(config: Config, entry: Path) -> float:
    """When a cache entry was last used: its folder's mtime (a model), its file's ctime (an image,
    a text: each link into a task dir sets it), or the mtime of an image's record as a link, which
    earlier versions touched instead, when later."""
    st = os.lstat(entry)
    if stat.S_ISDIR(st.st_mode):
        return st.st_mtime
    if entry.parent.parent.name == ANNS_DIR:
        return st.st_ctime
    try:
        return max(st.st_ctime, os.lstat(record_path(config, entry)).st_mtime)
    except OSError:
        return st.st_ctime


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
    anns_dir = config.images_dir.parent / ANNS_DIR
    for p in [*config.images_dir.glob("??/???/*"), *config.models_dir.glob("??/???/*"), *anns_dir.glob("??/*")]:
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
    with `need_bytes` more, fits CACHE_QUOTA_MB; never an entry in `keep` (paths or strings).
    Raises DiskError if it cannot. Returns a summary."""
    keep = {os.fspath(k) for k in keep or ()}
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
        victims = [e for e in entries if os.fspath(e[2]) not in keep]
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
