"""The body of a streamed HTTP response from the docker SDK, read in large pieces."""

from __future__ import annotations


def body_chunks(r, read_size: int):
    """The body of a streamed HTTP response, as it arrives, in reads of up to `read_size` bytes.

    The engine sends one HTTP chunk per log line; urllib3 hands them out one by one, which costs
    more than the line itself. With a chunked body this reads the connection in large reads and
    undoes the chunked encoding here."""
    fp = getattr(getattr(r.raw, "_fp", None), "fp", None)
    if fp is None or not getattr(r.raw._fp, "chunked", False) or r.raw._fp.chunk_left is not None:
        read = r.raw.read1 if hasattr(r.raw, "read1") else r.raw.read
        while data := read(read_size):
            yield data
        return
    buf = b""
    while True:
        data = fp.read1(read_size)
        if not data:
            return
        buf = buf + data if buf else data
        pos, parts, end = 0, [], False
        while True:
            i = buf.find(b"\r\n", pos)
            if i < 0:
                break
            size = int(buf[pos:i].split(b";", 1)[0], 16)
            if size == 0:
                end = True
                break
            if len(buf) < i + 4 + size:
                break
            parts.append(buf[i + 2 : i + 2 + size])
            pos = i + 4 + size
        buf = buf[pos:]
        if parts:
            yield b"".join(parts)
        if end:
            return
