"""Bulk blob transfer on both sides: check, upload and download many blobs per request.

The wire format is protocol.bulk's (a ustar stream of entries named by sha256); the HTTP side is
server.blobs.bulk_router. What holds for one blob holds for each entry here: an upload is hashed
while it streams into the store (BlobStore.put_stream, which keeps nothing of a refused or cut
entry), and a node reaches only the blobs it may read (server.blobs.refs.readable), a forbidden
one being answered exactly as a missing one. Per request, not per entry: one query of what a node
may read, one insert of what it uploaded, one thread hop to look up the files, and a download
read from disk on a thread in pieces of about a megabyte.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from protocol import bulk
from protocol.errors import APIError
from server.blobs import refs as blob_refs
from server.blobs.store import SHA256_RE, BlobStore
from server.http.fields import UserIn
from server.state import ServerState

PIECE = 1 << 20  # download: bytes read from disk and handed to the event loop at once


def _checked_hashes(hashes: list[str]) -> list[str]:
    """The list as it is, or the error a client can act on: too many (split the batch), or which one is not a sha256."""
    if len(hashes) > bulk.MAX_COUNT:
        raise PydanticCustomError(
            "batch_too_large",
            "{n} sha256s; a batch names at most {most}",
            {"n": len(hashes), "most": bulk.MAX_COUNT},
        )
    for i, h in enumerate(hashes):
        if not SHA256_RE.fullmatch(h):  # match() would take a trailing newline
            raise PydanticCustomError("bad_sha256", "entry {i} is not a sha256 (64 lower-case hex digits)", {"i": i})
    return hashes


_SHA256_LIST = {"maxItems": bulk.MAX_COUNT, "items": {"type": "string", "pattern": SHA256_RE.pattern}}


class HashesIn(BaseModel):
    """Blobs named by their sha256, 1 to protocol.bulk.MAX_COUNT of them (agent side: unknown fields ignored)."""

    sha256: Annotated[list[str], Field(min_length=1, json_schema_extra=_SHA256_LIST), AfterValidator(_checked_hashes)]


class UserHashesIn(HashesIn, UserIn):
    """The user side's HashesIn: an unknown field is refused."""


class MissingOut(BaseModel):
    """The asked blobs that are not there (for a node: or that it may not read), in the order asked, each once."""

    missing: list[str]


class StoredOut(BaseModel):
    """An upload entry kept (or stored already: `created` false)."""

    sha256: str
    size: int
    created: bool


class RefusedOut(BaseModel):
    """An upload entry not kept: `error` is the single PUT's code (hash_mismatch, blob_quota_exceeded, ...)."""

    sha256: str
    error: str
    detail: str


class UploadOut(BaseModel):
    """One answer per entry of the upload, in stream order."""

    blobs: list[StoredOut | RefusedOut]


# --- check ---------------------------------------------------------------------------------------


async def missing(state: ServerState, hashes: list[str], agent_id: int | None) -> list[str]:
    """Those of `hashes` not stored (for a node, `agent_id`: or not readable by it), in order, each once."""
    asked, sizes = await _visible_sizes(state, hashes, agent_id)
    return [h for h in asked if h not in sizes]


async def _visible_sizes(
    state: ServerState, hashes: list[str], agent_id: int | None
) -> tuple[list[str], dict[str, int]]:
    """The hashes asked, each once, and the sizes of those stored (and for a node readable), in that order."""
    asked = list(dict.fromkeys(hashes))
    visible = asked
    if agent_id is not None:
        readable = await state.db.run(_readable, state, agent_id, asked)
        visible = [h for h in asked if h in readable]
    return asked, await run_in_threadpool(_sizes, state.blobs, visible)


def _readable(state: ServerState, agent_id: int, hashes: list[str]) -> set[str]:
    with state.db.reader() as conn:
        return blob_refs.readable(conn, agent_id, hashes)


def _sizes(store: BlobStore, hashes: list[str]) -> dict[str, int]:
    """The sizes of those of `hashes` that are stored, in their order (one thread hop for all the stats)."""
    out = {}
    for h in hashes:
        size = store.size(h)
        if size is not None:
            out[h] = size
    return out


# --- upload --------------------------------------------------------------------------------------


class BodyReader:
    """Exact reads over a request body that arrives in chunks of any size: tar headers and entries
    straddle them. An entry's bytes are handed on as the chunks' own slices, never joined."""

    def __init__(self, chunks: AsyncIterable[bytes]):
        self._chunks = chunks.__aiter__()
        self._buf, self._pos = b"", 0

    async def _more(self) -> bool:
        """Append the next non-empty chunk to what is left of the buffer; False at the body's end."""
        async for chunk in self._chunks:
            if chunk:
                left = self._buf[self._pos :]
                self._buf, self._pos = (left + chunk if left else chunk), 0
                # A body that arrives faster than it is stored never makes receive() wait: let the
                # other requests run once per chunk (some dozens of small entries written to disk).
                await asyncio.sleep(0)
                return True
        return False

    async def read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer where the body ends."""
        while len(self._buf) - self._pos < n and await self._more():
            pass
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    async def some(self, most: int) -> bytes:
        """1 to `most` bytes, as they are buffered; b"" at the body's end."""
        if self._pos >= len(self._buf) and not await self._more():
            return b""
        out = self._buf[self._pos : self._pos + most]
        self._pos += len(out)
        return out

    async def drain(self) -> None:
        """Read the body to its end, keeping nothing (tarfile pads an archive to 10 KiB records)."""
        self._buf, self._pos = b"", 0
        async for _ in self._chunks:
            pass


class EntryBytes:
    """The bytes of one tar entry as an async iterator (what BlobStore.put_stream reads); `finish`
    then skips what the reader left unread and the entry's padding."""

    def __init__(self, body: BodyReader, sha256: str, size: int):
        self.body, self.sha256, self.size, self.left = body, sha256, size, size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.left:
            raise StopAsyncIteration
        chunk = await self.body.some(self.left)
        if not chunk:
            raise bulk.BadBatch(f"the stream ends inside entry {self.sha256}")
        self.left -= len(chunk)
        return chunk

    async def finish(self) -> None:
        async for _ in self:
            pass
        pad = -self.size % bulk.BLOCK
        if pad and len(await self.body.read(pad)) != pad:
            raise bulk.BadBatch(f"the stream ends inside entry {self.sha256}'s padding")


async def upload(state: ServerState, chunks: AsyncIterable[bytes], agent_id: int | None) -> list[dict]:
    """Store each entry of a bulk tar stream (protocol.bulk) whose bytes hash to its name; one
    answer per entry, in stream order. A node's (`agent_id`) stored entries count as its uploads,
    recorded in one insert, also when the stream then fails: what was stored stays stored.
    Raises 400 bad_batch (malformed or cut short), incomplete_upload (the client left) or
    batch_too_large (more than MAX_COUNT entries or MAX_BYTES of bytes: refused from that entry on)."""
    answers: list[dict] = []
    stored: list[str] = []
    failure: APIError | None = None
    try:
        await _read_entries(state.blobs, BodyReader(chunks), answers, stored)
    except bulk.BadBatch as e:
        failure = APIError(400, "bad_batch", f"{e}; `blobs` answers the entries before it", blobs=answers)
    except ClientDisconnect:
        failure = APIError(400, "incomplete_upload", "the client went away before the upload ended", blobs=answers)
    except APIError as e:
        failure = e
    if agent_id is not None and stored:
        await state.db.run(_record_uploads, state, agent_id, stored)
    if failure is not None:
        raise failure
    return answers


# Entries up to SMALL_ENTRY are read whole and stored in groups, in a worker thread (one thread
# hop per group, not per entry; the event loop never waits on the disk); larger ones stream.
SMALL_ENTRY = 1 << 20
GROUP_BYTES = 8 << 20
GROUP_COUNT = 500


async def _read_entries(store: BlobStore, body: BodyReader, answers: list[dict], stored: list[str]) -> None:
    """Read entries up to the end-of-archive block, appending to `answers` and `stored` as they come.
    Entries complete before a failure are stored (they are valid blobs) before it is raised."""
    reader = _EntryReader(store, body, answers, stored)
    try:
        total = 0
        while True:
            block = await body.read(bulk.BLOCK)
            if not block:
                raise bulk.BadBatch("the stream ends without the end-of-archive block")
            parsed = bulk.parse_header(block)
            if parsed is None:
                break
            sha, size = parsed
            total += size
            if len(answers) >= bulk.MAX_COUNT or total > bulk.MAX_BYTES:
                await reader.store_group()
                raise _too_large(answers, sha)
            if size <= SMALL_ENTRY:
                await reader.small(sha, size)
            else:
                await reader.large(sha, size)
    except (bulk.BadBatch, ClientDisconnect):
        await reader.store_group()
        raise
    await reader.store_group()
    await body.drain()


class _EntryReader:
    """Stores the entries of one upload: small ones in groups (see SMALL_ENTRY), large ones streamed."""

    def __init__(self, store: BlobStore, body: BodyReader, answers: list[dict], stored: list[str]):
        self.store, self.body, self.answers, self.stored = store, body, answers, stored
        self.group: list[tuple[int, str, bytes]] = []  # (answer index, sha256, bytes) not yet stored
        self.group_bytes = 0

    async def small(self, sha: str, size: int) -> None:
        data = await self.body.read(size)
        if len(data) < size:
            raise bulk.BadBatch(f"the stream ends inside entry {sha}")
        self.answers.append({"sha256": sha})  # filled in when its group is stored
        self.group.append((len(self.answers) - 1, sha, data))
        self.group_bytes += size
        pad = -size % bulk.BLOCK
        if pad and len(await self.body.read(pad)) != pad:  # its bytes all came: it is stored all the same
            raise bulk.BadBatch(f"the stream ends inside entry {sha}'s padding")
        if self.group_bytes >= GROUP_BYTES or len(self.group) >= GROUP_COUNT:
            await self.store_group()

    async def large(self, sha: str, size: int) -> None:
        await self.store_group()
        entry = EntryBytes(self.body, sha, size)
        try:
            size, created = await self.store.put_stream(sha, entry, size)
        except APIError as e:  # this entry is refused (hash_mismatch, quota, ...); the stream goes on
            self.answers.append({"sha256": sha, "error": e.code, "detail": e.detail})
        else:
            self.answers.append({"sha256": sha, "size": size, "created": created})
            self.stored.append(sha)
        await entry.finish()

    async def store_group(self) -> None:
        if not self.group:
            return
        group, self.group, self.group_bytes = self.group, [], 0
        done = await run_in_threadpool(_put_group, self.store, [(sha, data) for _, sha, data in group])
        for (i, sha, _), answer in zip(group, done, strict=True):
            self.answers[i] = answer
            if "error" not in answer:
                self.stored.append(sha)


def _too_large(answers: list[dict], sha: str) -> APIError:
    return APIError(
        400,
        "batch_too_large",
        f"entry {len(answers)} ({sha}) would take the batch past {bulk.MAX_COUNT} entries or "
        f"{bulk.MAX_BYTES} bytes; `blobs` answers the entries before it",
        blobs=answers,
    )


def _put_group(store: BlobStore, blobs: list[tuple[str, bytes]]) -> list[dict]:
    """Store small entries held in memory (a worker thread); one answer each."""
    out = []
    for sha, data in blobs:
        try:
            size, created = store.put_bytes(sha, data)
        except APIError as e:
            out.append({"sha256": sha, "error": e.code, "detail": e.detail})
        else:
            out.append({"sha256": sha, "size": size, "created": created})
    return out


def _record_uploads(state: ServerState, agent_id: int, hashes: list[str]) -> None:
    with state.db.engine.begin() as conn:
        blob_refs.add(conn, blob_refs.UPLOAD, agent_id, hashes)


# --- download ------------------------------------------------------------------------------------


async def listing(state: ServerState, hashes: list[str], agent_id: int | None) -> tuple[list[tuple[str, int]], int]:
    """(sha256, size) of the asked blobs to send, in order and each once, and how many are left out
    (not stored, or for a node not readable). 400 batch_too_large when their bytes pass MAX_BYTES."""
    asked, sizes = await _visible_sizes(state, hashes, agent_id)
    entries = list(sizes.items())
    nbytes = sum(s for _, s in entries)
    if nbytes > bulk.MAX_BYTES:
        raise APIError(
            400,
            "batch_too_large",
            f"the {len(entries)} blobs asked for hold {nbytes} bytes, more than the {bulk.MAX_BYTES} of one batch",
        )
    return entries, len(asked) - len(entries)


def tar_length(entries: list[tuple[str, int]]) -> int:
    """The bytes of the tar stream of these entries (its content-length)."""
    return sum(bulk.BLOCK + size + (-size % bulk.BLOCK) for _, size in entries) + len(bulk.TAR_END)


def tar_stream(store: BlobStore, entries: list[tuple[str, int]]) -> Iterator[bytes]:
    """The tar stream of the entries, read from the store in pieces of about PIECE bytes (a sync
    generator: the response runs it on a thread, one hop per piece). A blob gone since the listing
    (collected) ends the stream there, short of its content-length: the client sees a cut body and
    asks again (and the server logs the response as cut short)."""
    pieces: list[bytes] = []
    held = 0
    for sha, size in entries:
        if pieces and held + bulk.BLOCK + size > PIECE:
            yield b"".join(pieces)
            pieces, held = [], 0
        if size <= PIECE:  # read whole, joined with its neighbours into one piece
            data = read_whole(store.path(sha), size)
            if data is None:
                break
            pad = bulk.padding(size)
            pieces += (bulk.header(sha, size), data, pad)
            held += bulk.BLOCK + size + len(pad)
            continue
        try:
            f = open(store.path(sha), "rb")
        except FileNotFoundError:
            break
        with f:
            yield bulk.header(sha, size)
            if (yield from file_pieces(f, size)) < size:
                return
        pieces, held = [bulk.padding(size)], -size % bulk.BLOCK
    else:
        pieces.append(bulk.TAR_END)
    if pieces:
        yield b"".join(pieces)


def file_pieces(f, size: int):
    """Yield the first `size` bytes of the open file `f` in pieces of at most PIECE bytes; return
    how many came (fewer: the file is shorter than it was, and the stream must end there)."""
    left = size
    while left and (data := f.read(min(PIECE, left))):
        left -= len(data)
        yield data
    return size - left


def read_whole(path, size: int) -> bytes | None:
    """The file's bytes when it holds `size` of them, else None (gone). os.read: a small blob costs
    three system calls and no file object (~40% less than open() for 10,000 of them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, size + 1)
    finally:
        os.close(fd)
    return data if len(data) == size else None
