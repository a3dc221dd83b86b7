"""Content-addressed blob store: DATA_DIR/blobs/<h[0:2]>/<h[2:5]>/<h>, h = sha256 of the bytes.

An upload streams into blobs/tmp/ while hashing; only a file whose sha256 matches the name it
was sent under is renamed (atomically) into place, anything else is deleted (400 hash_mismatch).
The HTTP side is server.routes.blobs.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from protocol.errors import APIError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(h: str) -> str:
    if not isinstance(h, str) or not SHA256_RE.match(h):
        raise APIError(400, "bad_sha256", "a blob is named by its sha256: 64 lower-case hex digits")
    return h


STALE_UPLOAD_S = 3600.0   # an upload untouched this long is abandoned


class BlobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Partial uploads of a previous run; only old ones, since replicas sharing this data dir
        # may be writing theirs right now.
        stale = time.time() - STALE_UPLOAD_S
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < stale:
                    leftover.unlink()

    def path(self, h: str) -> Path:
        return self.root / h[0:2] / h[2:5] / h

    def exists(self, h: str) -> bool:
        return self.path(h).is_file()

    def size(self, h: str) -> int | None:
        try:
            return self.path(h).stat().st_size
        except FileNotFoundError:
            return None

    async def put_stream(self, h: str, chunks) -> tuple[int, bool]:
        """Store the streamed bytes under h; returns (size, created). Raises APIError on a mismatch."""
        if self.exists(h):
            return self.path(h).stat().st_size, False
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=h[:8] + ".")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
            if digest.hexdigest() != h:
                raise APIError(400, "hash_mismatch", f"the uploaded bytes have sha256 {digest.hexdigest()}, not {h}; nothing was kept")
            dest = self.path(h)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
            return size, True
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
