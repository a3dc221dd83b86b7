"""Images from tasks, thumbnailed by the server: decoded within fixed bounds (formats, pixels, renders
at once, memory), and every file Pillow cannot or must not read is a 415, never a 500."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import psutil
import pytest
from PIL import EpsImagePlugin, Image

from protocol import endpoints
from server.blobs import thumbs

# They measure the server process's memory, or patch Pillow in this process without touching the server's.
pytestmark = [
    pytest.mark.server_process("measures or patches apart from the server process"),
    pytest.mark.any_database("thumbnails are decoded from blob files, apart from the database"),
]

# A minimal EPS: Pillow's EPS plugin takes it, and would hand it to Ghostscript to draw.
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n%%EndComments\n"
    b"newpath 0 0 moveto 100 100 lineto stroke\nshowpage\n%%EOF\n"
)


def _png(w: int, h: int, fill: int = 0, alpha: bool = True, orientation: int | None = None) -> bytes:
    """A PNG of one colour, written row by row (a 13000 x 13000 one is 650 KB; the test never holds
    its pixels), with an EXIF orientation when asked."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6 if alpha else 2, 0, 0, 0)
    row = b"\x00" + bytes([fill]) * (w * (4 if alpha else 3))
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        out += chunk(b"eXIf", exif.tobytes()[6:])  # the chunk holds the TIFF data, without "Exif\0\0"
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _thumb(srv, sha: str, size: int = 256):
    return srv.admin().get(
        srv.url + endpoints.path(endpoints.USER_BLOB_THUMB, sha256=sha), params={"size": size}, timeout=120
    )


def _peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_decompression_bomb_is_refused_from_its_header(own_server):
    srv, client, _ = own_server()
    bomb = _png(13000, 13000, orientation=6)  # 169 Mpx RGBA: 676 MB decoded, twice with the rotation
    assert len(bomb) < 1024 * 1024
    sha = client.upload_bytes(bomb)
    before = _peak_rss(srv.proc.pid)
    for size in thumbs.SIZES:
        r = _thumb(srv, sha, size)
        assert r.status_code == 415 and r.json()["error"] == "not_an_image", r.text
        assert "13000x13000" in r.json()["detail"]
    growth = _peak_rss(srv.proc.pid) - before
    print(f"server peak RSS growth over 4 thumbnails of a 13000x13000 PNG: {growth / 2**20:.1f} MiB")
    assert growth < 50 * 2**20, growth


@pytest.mark.slow
def test_eps_named_png_never_reaches_ghostscript(tmp_path, monkeypatch, own_server):
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1) or 1 / 0)
    src = tmp_path / "drawing.png"
    src.write_bytes(EPS)
    with pytest.raises(thumbs.NotAnImage):
        thumbs.render(src, 256)
    assert opened == []  # the EPS plugin was not even asked whether it knows the file

    srv, client, _ = own_server()
    r = _thumb(srv, client.upload_bytes(EPS))
    assert r.status_code == 415 and r.json()["error"] == "not_an_image", r.text


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_any_decoder_failure_is_a_415(tmp_path, monkeypatch, own_server):
    src = tmp_path / "x.png"
    src.write_bytes(_png(40, 30, fill=90))
    # whatever a decoder raises on a hostile file (here: something Pillow never documents)
    monkeypatch.setattr(Image.Image, "thumbnail", lambda *a, **k: (_ for _ in ()).throw(IndexError("boom")))
    with pytest.raises(thumbs.NotAnImage, match="IndexError"):
        thumbs.render(src, 128)

    srv, client, _ = own_server()
    good = _png(40, 30, fill=90)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, format="JPEG")
    pdf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(pdf, format="PDF")
    broken = {
        "truncated png": good[: len(good) // 2],
        "truncated jpeg": jpeg.getvalue()[:300],
        "damaged idat": good[:60] + b"\xff" * 20 + good[80:],
        "pdf": pdf.getvalue(),
        "gif header only": b"GIF89a\x10\x00\x10\x00\x80\x00\x00",
    }
    for what, data in broken.items():
        r = _thumb(srv, client.upload_bytes(data))
        assert r.status_code == 415 and r.json()["error"] == "not_an_image", (what, r.text)
    assert _thumb(srv, client.upload_bytes(good)).status_code == 200


@pytest.mark.slow
def test_concurrent_thumbnails_decode_two_images_at_a_time(own_server):
    srv, client, _ = own_server()
    # six images just under the pixel limit (each 196 MB decoded: Pillow keeps RGB in 4 bytes), one rotated
    w, h = 7000, 7000
    assert w * h <= thumbs.MAX_SOURCE_PIXELS
    shas = [
        client.upload_bytes(_png(w, h, fill=10 + i, alpha=False, orientation=6 if i == 0 else None)) for i in range(6)
    ]
    before = _peak_rss(srv.proc.pid)
    got: dict[int, object] = {}

    def get(i: int) -> None:
        got[i] = _thumb(srv, shas[i])

    threads = [threading.Thread(target=get, args=(i,)) for i in range(len(shas))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    growth = _peak_rss(srv.proc.pid) - before
    print(f"server peak RSS growth over 6 concurrent thumbnails of 49 Mpx: {growth / 2**20:.0f} MiB")
    for i in range(len(shas)):
        assert got[i].status_code == 200, got[i].text
        with Image.open(io.BytesIO(got[i].content)) as im:
            assert im.size == (256, 256) and im.getpixel((128, 128))[0] in range(5 + i, 16 + i)
    one = w * h * 4
    assert growth < thumbs.RENDERS * one + 100 * 2**20, growth
    assert psutil.Process(srv.proc.pid).is_running()
