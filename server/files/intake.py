"""Bytes of unknown hash into the blob store: a team file arrives without its sha256.

BlobStore.put_stream takes the name first and checks the bytes against it; an App's upload names
no hash, so the bytes stream into the store's tmp/ while they are hashed and counted, and the file
is renamed to the name they turned out to have (or dropped, when that blob is stored already:
then it is only made young again, as put_stream does). The same rules hold: the store's quota is
checked while the bytes come (507, nothing kept), a body past `limit` is a 413 with nothing kept,
and a body cut short leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterable
from pathlib import Path

from protocol.errors import APIError
from server.blobs.store import BlobStore


def too_large(limit: int, what: str) -> APIError:
    return APIError(413, "file_too_large", f"{what} is larger than {limit} bytes; nothing of it was kept", limit=limit)


async def receive(
    store: BlobStore, chunks: AsyncIterable[bytes], limit: int, what: str = "the file"
) -> tuple[str, int]:
    """Stream `chunks` into the store; (sha256, size). APIError 413 past `limit` bytes, 507 past the quota."""
    fd, tmp = tempfile.mkstemp(dir=store.tmp, prefix="file.")
    digest, size, reserved = hashlib.sha256(), 0, 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit, what)
                if store.quota:
                    store.reserved += len(chunk)
                    reserved += len(chunk)
                    if store.used + store.reserved > store.quota:
                        raise store.over_quota(size)
                digest.update(chunk)
                f.write(chunk)
        h = digest.hexdigest()
        store.put_file(Path(tmp), h, size)
        return h, size
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        store.reserved -= reserved
