"""Content-addressed blob store: DATA_DIR/blobs/<h[0:2]>/<h[2:5]>/<h>, h = sha256 of the bytes.

An upload streams into blobs/tmp/ while hashing; only a file whose sha256 matches the name it
was sent under is renamed (atomically) into place, anything else is deleted (400 hash_mismatch).
The bytes of a blob that exists are read and hashed too (and not written): an agent's upload
counts as proof that it holds the bytes (server.blobs.router records it), so it must send them.
With a quota, an upload that would take the store past it is refused (507) before or while it
streams, and nothing of it is kept. Uploading a blob that exists refreshes its mtime, which the
collector (server.blobs.refs.collect) reads as its age. The HTTP side is server.blobs.router.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from protocol.errors import APIError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(h: str) -> str:
    if not isinstance(h, str) or not SHA256_RE.match(h):
        raise APIError(400, "bad_sha256", "a blob is named by its sha256: 64 lower-case hex digits")
    return h


STALE_UPLOAD_S = 3600.0  # an upload untouched this long is abandoned
AUTO_QUOTA_SHARE = 0.8  # quota None: this share of the blob store's filesystem, measured at start


def auto_quota(root: Path) -> int:
    """The default quota: 80% of the size of the filesystem that holds `root`. The rest stays for
    the database, the logs and the system on the same disk: blobs alone never fill it."""
    return int(shutil.disk_usage(root).total * AUTO_QUOTA_SHARE)


class BlobStore:
    def __init__(self, root: Path, quota: int | None = 0):
        """`quota`: bytes the store may hold; 0: no quota; None: auto_quota(root)."""
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        if quota is None:
            quota = auto_quota(self.root)
        # Partial uploads of a previous run; only old ones, since replicas sharing this data dir
        # may be writing theirs right now.
        stale = time.time() - STALE_UPLOAD_S
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()
        self.quota = quota
        self.reserved = 0  # bytes of uploads streaming now
        self._used_lock = threading.Lock()  # `used` also changes in put_bytes, on worker threads
        self.used = sum(self.path(h).stat().st_size for h in self.names_older_than(float("inf"))) if quota else 0

    def path(self, h: str) -> Path:
        return self.root / h[0:2] / h[2:5] / h

    def exists(self, h: str) -> bool:
        return self.path(h).is_file()

    def size(self, h: str) -> int | None:
        try:
            return self.path(h).stat().st_size
        except FileNotFoundError:
            return None

    def over_quota(self, more: int) -> APIError:
        return APIError(
            507,
            "blob_quota_exceeded",
            f"the blob store holds {self.used} bytes of its quota of {self.quota}; this upload "
            f"({more} bytes so far) would pass it, so nothing of it was kept",
        )

    async def put_stream(self, h: str, chunks, length: int | None = None) -> tuple[int, bool]:
        """Store the streamed bytes under h; returns (size, created). Raises APIError on a mismatch,
        507 blob_quota_exceeded when the store's quota would be passed."""
        dest = self.path(h)
        if dest.is_file():
            size = await self._hash_only(h, chunks)
            # Young again only once the right bytes came: a wrong body must not keep an
            # unreferenced blob from the collector.
            try:
                os.utime(dest)
            except FileNotFoundError:  # collected while the bytes came: the sender sends them again
                raise APIError(
                    503, "blob_collected", "the blob was collected during the upload; send it again", retry_after=1
                ) from None
            return size, False
        if self.quota and length is not None and self.used + self.reserved + length > self.quota:
            raise self.over_quota(length)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=h[:8] + ".")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    if self.quota:
                        self.reserved += len(chunk)
                        size += len(chunk)
                        if self.used + self.reserved > self.quota:
                            raise self.over_quota(size)
                    else:
                        size += len(chunk)
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != h:
                raise _mismatch(digest.hexdigest(), h)
            if dest.is_file():  # the same bytes came in another upload meanwhile
                Path(tmp).unlink(missing_ok=True)
                return size, False
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            if self.quota:
                with self._used_lock:
                    self.used += size
            return size, True
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            if self.quota:
                self.reserved -= size

    def put_bytes(self, h: str, data: bytes) -> tuple[int, bool]:
        """Store a small blob held in memory (an entry of a bulk upload); returns (size, created).

        Blocking: call it in a worker thread. The same rules as put_stream (nothing kept on a
        mismatch, a stored blob made young again, the quota), in as few system calls as a blob
        can take: one utime for a blob stored already; otherwise an exclusive create in tmp/, a
        write and a rename, with the folders made only when the rename finds them missing."""
        got = hashlib.sha256(data).hexdigest()
        if got != h:
            raise _mismatch(got, h)
        dest = self.path(h)
        try:
            os.utime(dest)
            return len(data), False
        except FileNotFoundError:
            pass
        size = len(data)
        if self.quota:
            with self._used_lock:
                if self.used + self.reserved + size > self.quota:
                    raise self.over_quota(size)
                self.used += size  # counted now, so concurrent batches cannot pass the quota together
        tmp = self.tmp / f"{h[:16]}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                os.replace(tmp, dest)
            except FileNotFoundError:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if self.quota:
                with self._used_lock:
                    self.used -= size
            raise
        return size, True

    def put_file(self, tmp: Path, h: str, size: int) -> None:
        """Store the file `tmp` (in this store's tmp/, `size` bytes, already hashed to `h`) as blob
        `h`: renamed into place, or dropped when `h` is stored already (made young again)."""
        dest = self.path(h)
        try:
            os.utime(dest)
            tmp.unlink(missing_ok=True)
            return
        except FileNotFoundError:  # not stored (or collected just now): the new bytes take its place
            pass
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        if self.quota:
            with self._used_lock:
                self.used += size

    @staticmethod
    async def _hash_only(h: str, chunks) -> int:
        """The size of the sent bytes of a blob stored already, checked against h (nothing is written)."""
        digest, size = hashlib.sha256(), 0
        async for chunk in chunks:
            size += len(chunk)
            digest.update(chunk)
        if digest.hexdigest() != h:
            raise _mismatch(digest.hexdigest(), h)  # the same answer as for a blob not stored: no hint
        return size

    def names_older_than(self, cutoff: float):
        """The blobs whose mtime is before `cutoff` (a generator walking the store)."""
        for top in _dirs(self.root):
            if top.name == "tmp":
                continue
            for mid in _dirs(top):
                with os.scandir(mid) as it:
                    for e in it:
                        if (
                            SHA256_RE.match(e.name)
                            and e.is_file(follow_symlinks=False)
                            and e.stat(follow_symlinks=False).st_mtime < cutoff
                        ):
                            yield e.name

    def delete_if_older(self, h: str, cutoff: float) -> bool:
        """Delete blob h unless it was (re)written since `cutoff`; True when deleted."""
        p = self.path(h)
        try:
            st = p.stat()
            if st.st_mtime >= cutoff:
                return False
            p.unlink()
        except FileNotFoundError:
            return False
        if self.quota:
            with self._used_lock:
                self.used -= st.st_size
        return True

    def remove_partials(self, cutoff: float) -> int:
        """Delete partial uploads in tmp/ not written to since `cutoff` (a client that vanished)."""
        n = 0
        with os.scandir(self.tmp) as it:
            for e in it:
                try:
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(e.path)
                        n += 1
                except FileNotFoundError:
                    pass
        return n


def _mismatch(got: str, h: str) -> APIError:
    return APIError(400, "hash_mismatch", f"the uploaded bytes have sha256 {got}, not {h}; nothing was kept")


def _dirs(p: Path):
    with os.scandir(p) as it:
        return sorted((Path(e.path) for e in it if e.is_dir(follow_symlinks=False)), key=lambda x: x.name)
