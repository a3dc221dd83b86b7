"""A streaming reader of `multipart/form-data` bodies (RFC 7578), as the SDK's MultipartEncoder sends them.

Starlette's own form parser needs python-multipart, which the server does not install, and spools
every file part to a temporary file of its own; this reader hands a part's bytes on as they arrive,
so a team file streams from the socket into the blob store in one pass. Its memory is one chunk
plus one delimiter; a part's header block and a field's value are bounded, and a body that ends
before its closing delimiter is a 400, not a short file.

    reader = MultipartReader(request.stream(), boundary_of(content_type))
    async for part in reader:
        if part.filename is None:
            value = await part.text(MAX_FIELD)
        else:
            async for chunk in part.chunks(): ...
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

from protocol.errors import APIError

MAX_HEADERS = 16 * 1024  # bytes of one part's header block
_BOUNDARY_RE = re.compile(r"""boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))""", re.IGNORECASE)
_PARAM_RE = re.compile(r"""\b(name|filename)=(?:"((?:[^"\\]|\\.)*)"|([^\s;]+))""", re.IGNORECASE)


def _bad(detail: str) -> APIError:
    return APIError(400, "bad_multipart", detail)


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart content type, or a 400 naming what is wrong."""
    m = _BOUNDARY_RE.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or m is None:
        raise _bad("the body must be multipart/form-data with a boundary of 1 to 70 characters")
    return (m.group(1) or m.group(2)).encode("latin-1")


class Part:
    """One part: its field name, its file name (None for a plain field), its content type; its
    bytes are read once, with `chunks()` or `text()`, before the reader goes to the next part."""

    def __init__(self, reader: MultipartReader, headers: dict[str, str]):
        self._reader = reader
        self.headers = headers
        disposition = headers.get("content-disposition", "")
        params = {
            m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _PARAM_RE.finditer(disposition)
        }
        if not disposition.lower().startswith("form-data") or "name" not in params:
            raise _bad("a part has no `Content-Disposition: form-data; name=...` header")
        self.name: str = params["name"]
        self.filename: str | None = params.get("filename")
        self.content_type: str = headers.get("content-type", "application/octet-stream")
        self.done = False

    def chunks(self) -> AsyncIterator[bytes]:
        """The part's bytes as they arrive."""
        return self._reader._body(self)

    async def text(self, most: int) -> str:
        """A plain field's value (UTF-8, at most `most` bytes), or a 400 naming the field."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > most:
                raise _bad(f"the form field {self.name[:100]!r} is longer than {most} bytes")
        try:
            return out.decode()
        except UnicodeDecodeError:
            raise _bad(f"the form field {self.name[:100]!r} is not UTF-8") from None


class MultipartReader:
    """The parts of one body, in order (an async iterator of Part)."""

    def __init__(self, chunks: AsyncIterable[bytes], boundary: bytes):
        self._it = chunks.__aiter__()
        # The first delimiter has no CRLF before it: one is put there, so every delimiter looks alike.
        self._buf = bytearray(b"\r\n")
        self._delim = b"\r\n--" + boundary
        self._eof = False
        self._part: Part | None = None
        self._closed = False

    async def _fill(self) -> bool:
        """Read one more chunk into the buffer; False at the end of the body."""
        if self._eof:
            return False
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def _skip_to_delimiter(self) -> None:
        """Read the first delimiter, which must open the body: RFC 2046 allows a preamble before it,
        but no client of ours sends one, and a body whose start is mangled would otherwise lose its
        first part to the "preamble" silently."""
        await self._need(len(self._delim))
        if not self._buf.startswith(self._delim):
            raise _bad("the body does not start with its multipart delimiter (is the boundary right?)")
        del self._buf[: len(self._delim)]

    async def _need(self, n: int) -> None:
        while len(self._buf) < n:
            if not await self._fill():
                raise _bad("the multipart body ends before its closing delimiter")

    def __aiter__(self) -> AsyncIterator[Part]:
        return self._parts()

    async def _parts(self) -> AsyncIterator[Part]:
        await self._skip_to_delimiter()
        while True:
            if self._part is not None and not self._part.done:
                async for _ in self._body(self._part):  # the caller left a part unread: skip it
                    pass
            await self._need(2)
            if self._buf[:2] == b"--":  # the closing delimiter
                self._closed = True
                return
            # Transport padding (spaces, tabs) may follow a delimiter before its CRLF.
            while True:
                end = self._buf.find(b"\r\n")
                if end >= 0:
                    break
                if len(self._buf) > 256 or not await self._fill():
                    raise _bad("a multipart delimiter is not followed by a line break")
            if self._buf[:end].strip(b" \t"):
                raise _bad("a multipart delimiter is followed by other characters")
            del self._buf[: end + 2]
            self._part = Part(self, await self._headers())
            yield self._part

    async def _headers(self) -> dict[str, str]:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0 or self._buf.startswith(b"\r\n"):
                break
            if len(self._buf) > MAX_HEADERS:
                raise _bad(f"a part's headers are longer than {MAX_HEADERS} bytes")
            if not await self._fill():
                raise _bad("the multipart body ends inside a part's headers")
        if self._buf.startswith(b"\r\n"):  # a part with no headers at all
            del self._buf[:2]
            return {}
        if end > MAX_HEADERS:
            raise _bad(f"a part's headers are longer than {MAX_HEADERS} bytes")
        block = bytes(self._buf[:end]).decode("utf-8", "replace")
        del self._buf[: end + 4]
        headers: dict[str, str] = {}
        for line in block.split("\r\n"):
            key, sep, value = line.partition(":")
            if not sep:
                raise _bad("a part's header line has no colon")
            headers[key.strip().lower()] = value.strip()
        return headers

    async def _body(self, part: Part) -> AsyncIterator[bytes]:
        """The part's bytes up to the next delimiter (which stays in the buffer for _parts)."""
        if part.done:
            return
        keep = len(self._delim) - 1  # a delimiter may start in the last bytes of the buffer
        while True:
            i = self._buf.find(self._delim)
            if i >= 0:
                if i:
                    out = bytes(self._buf[:i])
                    del self._buf[:i]
                    yield out
                del self._buf[: len(self._delim)]
                part.done = True
                return
            if len(self._buf) > keep:
                out = bytes(self._buf[: len(self._buf) - keep])
                del self._buf[: len(self._buf) - keep]
                yield out
            if not await self._fill():
                raise _bad("the multipart body ends inside a part (the upload was cut short)")
