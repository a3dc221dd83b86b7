"""Bulk blob transfer: many blobs per request, for projects of 10^4-10^6 small files (docs/protocol.md).

Three operations per side (agent: x-token; user: admin), each on many sha256s at once:

- check    POST .../blobs/check     {"sha256": [...]}  -> {"missing": [...]}
  user side: the blobs the server does not hold; agent side: those it does not hold or the node
  may not read (one answer for both, as a single GET's 404).
- upload   POST .../blobs/upload    body: a tar stream (application/x-tar) of regular files, each
  named by the sha256 of its bytes -> {"blobs": [{"sha256", "size", "created"} |
  {"sha256", "error", "detail"}]}; each entry is hashed as it arrives and kept only if it matches.
- download POST .../blobs/download  {"sha256": [...]} -> a tar stream of the blobs asked for
  that exist (and, for a node, that it may read), in the order asked, each once; the others are
  left out (the header BULK_MISSING_HEADER counts them).

The tar is plain ustar (the standard library's `tarfile` reads and writes it, and so does `tar`):
one 512-byte header per entry, the bytes padded to 512, two zero blocks at the end. A batch holds
at most MAX_COUNT entries and MAX_BYTES of blob bytes; blobs over SMALL_BLOB keep their own
streamed, resumable requests (GET with Range, PUT). Standard library only.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import IO

MAX_COUNT = 10_000  # sha256s in one check, entries in one upload or download
MAX_BYTES = 256 * 1024 * 1024  # blob bytes in one upload or download batch
SMALL_BLOB = 16 * 1024 * 1024  # larger blobs go one per request (Range-resumable)
BLOCK = 512
TAR_END = b"\0" * (2 * BLOCK)
CONTENT_TYPE = "application/x-tar"
BULK_MISSING_HEADER = "x-blobs-missing"  # download: how many of the asked blobs were left out
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class BadBatch(ValueError):
    """A bulk stream that is not what the protocol says (not ustar, an entry not named by a sha256,
    not a regular file, or cut short)."""


def is_sha256(name: object) -> bool:
    return isinstance(name, str) and bool(_SHA_RE.fullmatch(name))


def _tarfile_header(sha256: str, size: int) -> bytes:
    info = tarfile.TarInfo(sha256)
    info.size = size
    info.mode = 0o444
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


# header() fills a fixed block: every field but the name, the size and the checksum is that of
# tarfile's header for ("", 0). Writing and reading it by hand is about 10 times faster than
# tarfile.TarInfo (20,000 entries: ~0.7 s of CPU less per side); any other header takes tarfile's
# path, so what is accepted and refused is tarfile's (tests/protocol/test_bulk.py compares them).
_T = _tarfile_header("", 0)
_MID, _TAIL, _REST = _T[64:124], _T[136:148], _T[154:]  # _REST: from the checksum's closing "\0 "
_FIXED_SUM = sum(_MID) + sum(_TAIL) + sum(_T[156:]) + 8 * ord(" ")  # the checksum field counts as spaces
_SIZE_END = 8**11  # the size field's 11 octal digits


def header(sha256: str, size: int) -> bytes:
    """The 512-byte ustar header of one entry."""
    if len(sha256) == 64 and sha256.isascii() and 0 <= size < _SIZE_END:
        name, size_field = sha256.encode(), b"%011o\0" % size
        checksum = b"%06o" % (_FIXED_SUM + sum(name) + sum(size_field))
        return b"".join((name, _MID, size_field, _TAIL, checksum, _REST))
    return _tarfile_header(sha256, size)


def padding(size: int) -> bytes:
    """The zero bytes that round an entry's data up to a whole block."""
    return b"\0" * (-size % BLOCK)


def parse_header(block: bytes) -> tuple[str, int] | None:
    """(sha256, size) of one header block; None at the end-of-archive (zero) block; BadBatch
    for anything else (a bad checksum, a non-regular entry, a name that is not a sha256)."""
    if len(block) != BLOCK:
        raise BadBatch("the stream ends inside a tar header")
    if block[64:124] == _MID and block[136:148] == _TAIL and block[154:] == _REST:  # as header() writes
        try:
            if block[135] == 0 and int(block[148:154], 8) == _FIXED_SUM + sum(block[:64]) + sum(block[124:136]):
                name = block[:64].decode("ascii")
                if _SHA_RE.fullmatch(name):
                    return name, int(block[124:135], 8)
        except ValueError:  # UnicodeDecodeError included: tarfile's path says what is wrong
            pass
    if block == b"\0" * BLOCK:
        return None
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeDecodeError) as e:
        raise BadBatch(f"not a tar header: {e}") from None
    if not info.isreg():
        raise BadBatch(f"entry {info.name[:80]!r} is not a regular file")
    if not is_sha256(info.name):
        raise BadBatch(f"entry {info.name[:80]!r} is not named by a sha256 (64 lower-case hex digits)")
    return info.name, info.size


def iter_entries(stream: IO[bytes], chunk: int = 1 << 20) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """Read a bulk tar stream (a file-like object, e.g. a response's raw body): yields (sha256,
    size, chunks) per entry; `chunks` must be read to its end before the next entry. BadBatch
    when the stream is malformed or cut short (also inside an entry's bytes)."""
    while True:
        block = _read_exact(stream, BLOCK)
        parsed = parse_header(block) if block else None
        if parsed is None:
            return
        sha, size = parsed
        it = _entry_data(stream, sha, size, chunk)
        yield sha, size, it
        for _ in it:  # the caller skipped (part of) the entry: consume it
            pass


def _entry_data(stream: IO[bytes], sha: str, size: int, chunk: int) -> Iterator[bytes]:
    """An entry's bytes in chunks, then its padding consumed; BadBatch when the stream ends early."""
    left = size
    while left:
        b = stream.read(min(chunk, left))
        if not b:
            raise BadBatch(f"the stream ends inside entry {sha}")
        left -= len(b)
        yield b
    pad = -size % BLOCK
    if pad and len(_read_exact(stream, pad)) != pad:
        raise BadBatch(f"the stream ends inside entry {sha}'s padding")


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    out = b""
    while len(out) < n:
        b = stream.read(n - len(out))
        if not b:
            break
        out += b
    if out and len(out) < n and n == BLOCK:
        raise BadBatch("the stream ends inside a tar header")
    return out


def batches(entries: Iterable[tuple[str, int]], max_count: int = MAX_COUNT, max_bytes: int = MAX_BYTES):
    """Split (sha256, size) pairs into lists of at most max_count entries and max_bytes bytes
    (an entry larger than max_bytes alone makes a batch)."""
    batch: list[tuple[str, int]] = []
    nbytes = 0
    for sha, size in entries:
        if batch and (len(batch) >= max_count or nbytes + size > max_bytes):
            yield batch
            batch, nbytes = [], 0
        batch.append((sha, size))
        nbytes += size
    if batch:
        yield batch
