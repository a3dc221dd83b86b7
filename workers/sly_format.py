"""The Supervisely project format, as far as the agent writes and reads it (no SDK needed).

    <project>/meta.json              classes and tag metas (ProjectMeta.to_json())
    <project>/<ds>/img/<item>        the image
    <project>/<ds>/ann/<item>.json   its annotation (Annotation.to_json())

JSON is written the way the SDK writes it (`supervisely.io.json.dump_json_file`: indent 4), so a
file here reads back byte-identical to one the SDK would have written from the same object.
An item without an annotation gets the SDK's empty annotation with the image's size, read from
the image header (`Dataset._get_empty_annotaion` reads the whole image for the same thing).
"""
from __future__ import annotations

import json
import struct

# sly.ProjectMeta().to_json() (SDK 6.74.51)
EMPTY_META = {"classes": [], "tags": [],
              "projectSettings": {"multiView": {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}}}
HEADER_BYTES = 64 * 1024


def dumps(obj) -> str:
    """JSON text as the SDK's dump_json_file writes it."""
    return json.dumps(obj, indent=4)


def empty_ann(height: int | None, width: int | None) -> dict:
    """sly.Annotation((height, width)).to_json()"""
    return {"description": "", "size": {"height": height, "width": width}, "tags": [], "objects": [],
            "customBigData": {}}


def image_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from the first bytes of a PNG, JPEG, GIF, BMP, WebP, TIFF or PPM; None if unknown."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            return h, w
        if head[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", head[6:10])
            return h, w
        if head[:2] == b"BM":
            w, h = struct.unpack("<ii", head[18:26])
            return abs(h), w
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:2] == b"\xff\xd8":
            return _jpeg(head)
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff(head)
        if head[:2] in (b"P3", b"P6") and head[2:3].isspace():
            w, h = (int(v) for v in head[2:64].split(maxsplit=2)[:2])
            return h, w
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return h, w
        i += 2 + length
    return None


def _webp(b: bytes) -> tuple[int, int] | None:
    kind = b[12:16]
    if kind == b"VP8 ":
        w, h = struct.unpack("<HH", b[26:30])
        return h & 0x3FFF, w & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(b[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X":
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return h, w
    return None


def _tiff(b: bytes) -> tuple[int, int] | None:
    e = "<" if b[:2] == b"II" else ">"
    off = struct.unpack(e + "I", b[4:8])[0]
    n = struct.unpack(e + "H", b[off:off + 2])[0]
    dims = {}
    for k in range(n):
        at = off + 2 + 12 * k
        tag, typ = struct.unpack(e + "HH", b[at:at + 4])
        if tag in (256, 257):
            v = struct.unpack(e + ("H" if typ == 3 else "I"), b[at + 8:at + (10 if typ == 3 else 12)])[0]
            dims[tag] = v
    if 256 in dims and 257 in dims:
        return dims[257], dims[256]
    return None
