"""protocol/bulk.py: the bulk tar stream is plain ustar both ways, and a bad one is refused."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from protocol import bulk


def _stream(blobs: list[bytes]) -> bytes:
    out = io.BytesIO()
    for b in blobs:
        out.write(bulk.header(hashlib.sha256(b).hexdigest(), len(b)))
        out.write(b)
        out.write(bulk.padding(len(b)))
    out.write(bulk.TAR_END)
    return out.getvalue()


BLOBS = [b"", b"x", b"abc" * 300, bytes(range(256)) * 4]


def test_written_stream_is_a_tar_the_standard_library_reads():
    with tarfile.open(fileobj=io.BytesIO(_stream(BLOBS)), mode="r|") as tf:
        got = [(m.name, tf.extractfile(m).read()) for m in tf]
    assert got == [(hashlib.sha256(b).hexdigest(), b) for b in BLOBS]


def test_iter_entries_reads_what_tarfile_writes():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for b in BLOBS:
            info = tarfile.TarInfo(hashlib.sha256(b).hexdigest())
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))
    out.seek(0)
    got = [(sha, size, b"".join(chunks)) for sha, size, chunks in bulk.iter_entries(out, chunk=7)]
    assert got == [(hashlib.sha256(b).hexdigest(), len(b), b) for b in BLOBS]


def test_a_skipped_entry_is_consumed():
    shas = [sha for sha, _, _ in bulk.iter_entries(io.BytesIO(_stream(BLOBS)))]
    assert shas == [hashlib.sha256(b).hexdigest() for b in BLOBS]


@pytest.mark.parametrize("cut", [100, 512 + 1, 1024 + 600, 3000])
def test_a_stream_cut_short_is_bad(cut):
    raw = _stream(BLOBS)[:cut]
    with pytest.raises(bulk.BadBatch):
        for _, _, chunks in bulk.iter_entries(io.BytesIO(raw)):
            for _ in chunks:
                pass


def test_entries_not_named_by_a_sha_or_not_regular_are_bad():
    info = tarfile.TarInfo("../etc/passwd")
    info.size = 0
    with pytest.raises(bulk.BadBatch, match="sha256"):
        bulk.parse_header(info.tobuf(format=tarfile.USTAR_FORMAT))
    link = tarfile.TarInfo("a" * 64)
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(bulk.BadBatch, match="regular"):
        bulk.parse_header(link.tobuf(format=tarfile.USTAR_FORMAT))
    with pytest.raises(bulk.BadBatch):
        bulk.parse_header(b"\x01" * 512)  # checksum wrong
    assert bulk.parse_header(b"\0" * 512) is None


def test_batches_bound_count_and_bytes():
    entries = [(f"{i:064x}", 10) for i in range(25)]
    got = list(bulk.batches(entries, max_count=10, max_bytes=1000))
    assert [len(b) for b in got] == [10, 10, 5]
    got = list(bulk.batches(entries, max_count=100, max_bytes=35))
    assert [len(b) for b in got] == [3] * 8 + [1]
    assert list(bulk.batches([("a" * 64, 500)], max_bytes=100)) == [[("a" * 64, 500)]]


def _judged(parse, block: bytes):
    try:
        return "ok", parse(block)
    except bulk.BadBatch as e:
        return "bad", type(e).__name__


def _tarfile_parse(block: bytes):
    """parse_header's answer by tarfile alone (the reference the fast path must agree with)."""
    if block == b"\0" * bulk.BLOCK:
        return None
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeDecodeError) as e:
        raise bulk.BadBatch(str(e)) from None
    if not info.isreg() or not bulk.is_sha256(info.name):
        raise bulk.BadBatch(info.name)
    return info.name, info.size


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 10**9, 8**11 - 1])
def test_header_is_tarfiles_header_byte_for_byte(size):
    sha = hashlib.sha256(str(size).encode()).hexdigest()
    info = tarfile.TarInfo(sha)
    info.size, info.mode, info.mtime = size, 0o444, 0
    assert bulk.header(sha, size) == info.tobuf(format=tarfile.USTAR_FORMAT)
    assert bulk.parse_header(bulk.header(sha, size)) == (sha, size)


def test_a_size_ustar_cannot_hold_is_refused_as_tarfile_refuses_it():
    with pytest.raises(ValueError):
        bulk.header(hashlib.sha256(b"").hexdigest(), 8**11)


def test_parse_header_judges_every_changed_byte_as_tarfile_does():
    good = bulk.header(hashlib.sha256(b"x").hexdigest(), 1234)

    def fixed(b: bytes) -> bytes:  # the checksum made right again after the change
        return b[:148] + b"%06o\0 " % (sum(b[:148]) + 8 * 32 + sum(b[156:])) + b[156:]

    for i in range(bulk.BLOCK):
        for v in (0, 32, ord("0"), ord("7"), ord("8"), ord("A"), ord("a"), 0x80, 0xFF, good[i] ^ 1):
            changed = good[:i] + bytes([v]) + good[i + 1 :]
            for block in (changed, fixed(changed)) if not 148 <= i < 156 else (changed,):
                assert _judged(bulk.parse_header, block) == _judged(_tarfile_parse, block), (i, v)
