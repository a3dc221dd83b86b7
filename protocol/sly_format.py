"""The Supervisely project format, one definition for the server, the workers and the client.

A project folder, as the SDK reads and writes it (`supervisely/project/project.py`):

    meta.json                  the project meta (ProjectMeta.to_json()): {"classes", "tags", ...}
    <dataset>/img/<item>       the image
    <dataset>/ann/<item>.json  its annotation (Annotation.to_json()): {"description", "size", "tags",
                               "objects", ...}

JSON is written as the SDK's `dump_json_file` writes it (`json.dump(obj, f, indent=4)`), so a file
written here is byte-identical to the one the SDK writes from the same object.

The empty meta is `{"classes": [], "tags": [], "projectType": "images"}`: what the platform gives
for an images project, less its `projectSettings`. `sly.ProjectMeta().to_json()` adds
`projectSettings` too, but that object's keys changed between SDK versions (`isSynced`,
`areSynced`, `viewsAreSynced`, `labelingInterface`), while every version's
`ProjectMeta.from_json` fills in default settings when the key is absent. It is also what the
server has always stored (migration 0002 keeps a frozen copy).

The checks are those of the SDK's readers (project_meta.py, annotation/annotation.py, label.py,
tag.py, geometry/*.py): what passes here, `sly.Project` opens. They raise `BadFormat`, which each
side turns into its own error (the server: a 400 with `code`). Standard library only: the agent
image ships this module without Pillow, so image sizes come from file headers, and a bitmap's PNG
is checked chunk by chunk (structure and CRCs, as Pillow's `verify()` does) without decoding it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import NoReturn

# --- the folder layout ---

META_FILE = "meta.json"
IMG_DIR, ANN_DIR = "img", "ann"
NESTED_DIR = "datasets"  # newer SDKs' nested datasets: <dataset>/datasets/<child>/
ANN_EXT = ".json"
# supervisely/imaging/image.py SUPPORTED_IMG_EXTS: what the SDK lists as items of img/
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".mpo", ".bmp", ".png", ".webp", ".tiff", ".tif", ".nrrd", ".jfif"})


def ann_name(item: str) -> str:
    """The annotation file of an item: the whole item name plus .json (`a.png` -> `a.png.json`)."""
    return item + ANN_EXT


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def empty_meta() -> dict:
    """The meta of a project that has none (see the module's docstring for the choice)."""
    return {"classes": [], "tags": [], "projectType": "images"}


def empty_ann(height: int | None, width: int | None) -> dict:
    """`sly.Annotation((height, width)).to_json()`: an image without labels. The size may be None
    when the image's header cannot be read; the SDK's `Annotation.from_json` accepts that."""
    return {
        "description": "",
        "size": {"height": height, "width": width},
        "tags": [],
        "objects": [],
        "customBigData": {},
    }


def dumps(obj) -> str:
    """JSON text as the SDK's dump_json_file writes it (ASCII escapes, indent 4, no newline at the end)."""
    return json.dumps(obj, indent=4)


# --- image sizes from headers ---

HEADER_BYTES = 64 * 1024
# EXIF, ICC and XMP segments may put a JPEG's frame header past HEADER_BYTES; the walk stops here.
JPEG_HEADER_BYTES = 1024 * 1024
# Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS): the SDK's readers refuse a larger
# image, so its size is left unknown rather than promised.
MAX_IMAGE_PIXELS = 178_956_970
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_FILL = re.compile(rb"\xff+")
_PNM = re.compile(rb"P[1-6](?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)")


def image_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from the first bytes of a PNG, JPEG, GIF, BMP, WebP, TIFF or PNM image; None
    when the format is unknown, the header is cut short or broken, or the size is 0 or over
    MAX_IMAGE_PIXELS. Nothing is decoded."""
    try:
        hw = _header_size(head)
    except (struct.error, IndexError, ValueError):
        return None
    if hw is None or not (0 < hw[0] and 0 < hw[1] and hw[0] * hw[1] <= MAX_IMAGE_PIXELS):
        return None
    return hw


def read_image_size(path) -> tuple[int, int] | None:
    """image_size() of a file, reading only its first bytes (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        hw = image_size(head)
        if hw is None and head[:2] == b"\xff\xd8" and len(head) == HEADER_BYTES:
            hw = image_size(head + f.read(JPEG_HEADER_BYTES - HEADER_BYTES))
    return hw


def _header_size(b: bytes) -> tuple[int, int] | None:
    if b[:8] == PNG_SIGNATURE and b[12:16] == b"IHDR":
        w, h = struct.unpack(">II", b[16:24])
        return h, w
    if b[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", b[6:10])
        return h, w
    if b[:2] == b"BM":
        if struct.unpack("<I", b[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            w, h = struct.unpack("<HH", b[18:22])
        else:
            w, h = struct.unpack("<ii", b[18:26])
        return abs(h), w  # a negative height: rows stored top-down
    if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return _webp(b)
    if b[:2] == b"\xff\xd8":
        return _jpeg(b)
    if b[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff(b)
    m = _PNM.match(b, 0, 256)
    if m:
        return int(m[2]), int(m[1])
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    i = 2
    while True:
        i = b.find(b"\xff", i)
        if i < 0:
            return None
        i = _FILL.match(b, i).end()  # type: ignore[union-attr]  # b[i] is 0xff: it matches
        if i + 8 > len(b):
            return None
        marker = b[i]
        i += 1
        if marker in (0x00, 0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length follows
            continue
        if marker == 0xD9:  # end of image: no frame
            return None
        if marker in _SOF:
            h, w = struct.unpack(">HH", b[i + 3 : i + 7])
            return h, w
        i += struct.unpack(">H", b[i : i + 2])[0]


def _webp(b: bytes) -> tuple[int, int] | None:
    kind = b[12:16]
    if kind == b"VP8 ":
        w, h = struct.unpack("<HH", b[26:30])
        return h & 0x3FFF, w & 0x3FFF
    if kind == b"VP8L":
        bits = int.from_bytes(b[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X":
        return int.from_bytes(b[27:30], "little") + 1, int.from_bytes(b[24:27], "little") + 1
    return None


def _tiff(b: bytes) -> tuple[int, int] | None:
    e = "<" if b[:2] == b"II" else ">"
    off = struct.unpack(e + "I", b[4:8])[0]
    n = struct.unpack(e + "H", b[off : off + 2])[0]
    dims = {}
    for k in range(n):
        at = off + 2 + 12 * k
        tag, typ = struct.unpack(e + "HH", b[at : at + 4])
        if tag in (256, 257):
            dims[tag] = (
                struct.unpack(e + "H", b[at + 8 : at + 10])[0]
                if typ == 3
                else struct.unpack(e + "I", b[at + 8 : at + 12])[0]
            )
        if len(dims) == 2:
            return dims[257], dims[256]
    return None


# --- checks of a meta and of an annotation ---

# Documented limits (docs/protocol.md, "Supervisely projects").
MAX_ANN_BYTES = 1024 * 1024  # one item's annotation, as compact JSON
MAX_OBJECTS = 10_000  # objects (labels) in one annotation
MAX_POINTS = 100_000  # points in one object (exterior and interiors together)
MAX_TAGS = 1_000  # tags on one image or one object
MAX_META_BYTES = 1024 * 1024  # the project meta, as compact JSON
MAX_CLASSES = 10_000  # object classes in a meta
MAX_TAG_METAS = 10_000  # tag metas in a meta
MAX_MASK_PIXELS = 1 << 28  # a bitmap's width x height
MAX_MASK_PNG_BYTES = 64 * 1024 * 1024  # a bitmap's PNG after the zlib layer is undone
# All bitmaps of one request together, after the zlib layer: a bitmap inflates up to 1000-fold, so
# without it a 64 MiB body would cost the server gigabytes of inflating.
MAX_REQUEST_MASK_BYTES = 256 * 1024 * 1024
MAX_COORD = 1e9  # |x| and |y| of a point

# The 2-D image shapes (geometry_name() of the SDK's geometry classes) and "any" (AnyGeometry).
SHAPES = frozenset(
    {
        "rectangle",
        "polygon",
        "line",
        "point",
        "bitmap",
        "alpha_mask",
        "graph",
        "cuboid",
        "cuboid_2d",
        "multipolygon",
        "oriented_bbox",
        "any",
    }
)
TAG_VALUE_TYPES = frozenset({"none", "any_number", "any_string", "oneof_string", "date"})
HEX_COLOR_RE = re.compile(r"^#[0-9A-Fa-f]{6}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> the bit depths it allows (PNG spec, 11.2.2 IHDR)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class BadFormat(ValueError):
    """A meta or an annotation the format does not allow. `where` names the place ('meta: class
    'car'', 'dataset ds0, item a.png, object 3'), `code` is `bad_meta` or `bad_annotation`."""

    def __init__(self, where: str, msg: str, code: str = "bad_annotation"):
        super().__init__(f"{where}: {msg}" if where else msg)
        self.where, self.msg, self.code = where, msg, code


class Meta:
    """A checked project meta: class title -> shape, tag name -> (value_type, possible values as a set)."""

    def __init__(self, classes: dict[str, str], tags: dict[str, tuple[str, frozenset | None]]):
        self.classes, self.tags = classes, tags


class Budget:
    """What the bitmaps of one request may cost together (bytes inflated); one per request."""

    def __init__(self, mask_bytes: int = MAX_REQUEST_MASK_BYTES):
        self.mask_bytes = mask_bytes

    def limit(self) -> int:
        """The most bytes the next bitmap may inflate to."""
        return min(MAX_MASK_PNG_BYTES, self.mask_bytes)

    def spend(self, n: int) -> None:
        self.mask_bytes -= n


def _fail(where: str, msg: str, code: str = "bad_annotation") -> NoReturn:
    raise BadFormat(where, msg, code)


def _finite(v, where: str) -> None:
    """Every number in a JSON value is finite (Python's json reads NaN and Infinity)."""
    stack = [v]
    while stack:
        x = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            _fail(where, f"the number {x!r} is not allowed; JSON numbers must be finite")
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _json_size(v) -> int:
    return len(json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode())


def _name(v, what: str, where: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 255:
        _fail(where, f"{what} must be a non-empty string of at most 255 characters, not {v!r}", "bad_meta")
    return v


def check_meta(meta, where: str = "meta") -> Meta:
    """Check a project meta (classes with shape and colour, tag metas); returns its lookup tables.
    `where` starts every error's place ('meta' on the server, 'meta.json' for a folder)."""
    if not isinstance(meta, dict):
        _fail(where, "must be a JSON object", "bad_meta")
    _finite(meta, where)
    if _json_size(meta) > MAX_META_BYTES:
        _fail(where, f"is larger than {MAX_META_BYTES} bytes", "bad_meta")
    classes = _meta_classes(meta, where)
    tags = _meta_tags(meta, where)
    # Sets: an annotation may name a oneof_string tag thousands of times against thousands of values.
    return Meta(classes, {k: (vt, frozenset(v or ()) if vt == "oneof_string" else None) for k, (vt, v) in tags.items()})


def _meta_classes(meta: dict, where: str) -> dict[str, str]:
    """The meta's object classes, checked: title -> shape."""
    classes_json = meta.get("classes", [])
    if not isinstance(classes_json, list) or len(classes_json) > MAX_CLASSES:
        _fail(where, f"classes must be a list of at most {MAX_CLASSES} object classes", "bad_meta")
    classes: dict[str, str] = {}
    for i, c in enumerate(classes_json, 1):
        w = f"{where}: class {i}"
        if not isinstance(c, dict):
            _fail(w, "must be an object {title, shape, color}", "bad_meta")
        title = _name(c.get("title"), "title", w)
        w = f"{where}: class {title!r}"
        if title in classes:
            _fail(w, "is defined twice", "bad_meta")
        shape = c.get("shape")
        if shape not in SHAPES:
            _fail(w, f"shape {shape!r} is not one of {', '.join(sorted(SHAPES))}", "bad_meta")
        color = c.get("color")
        if not isinstance(color, str) or not HEX_COLOR_RE.match(color):
            _fail(w, f"color {color!r} is not '#RRGGBB'", "bad_meta")
        classes[title] = shape
    return classes


def _meta_tags(meta: dict, where: str) -> dict[str, tuple[str, list | None]]:
    """The meta's tag metas ('tags', or the legacy 'tags_images' + 'tags_objects'), checked:
    name -> (value_type, values)."""
    tags_json = meta.get("tags", [])
    legacy = [meta.get("tags_images", []), meta.get("tags_objects", [])]
    if not all(isinstance(t, list) for t in [tags_json] + legacy):
        _fail(where, "tags, tags_images and tags_objects must be lists", "bad_meta")
    if tags_json and any(legacy):
        _fail(
            where,
            "has both 'tags' and the legacy 'tags_images'/'tags_objects'; the SDK reads one or the other",
            "bad_meta",
        )
    all_tags = tags_json or legacy[0] + legacy[1]
    if len(all_tags) > MAX_TAG_METAS:
        _fail(where, f"has more than {MAX_TAG_METAS} tag metas", "bad_meta")
    tags: dict[str, tuple[str, list | None]] = {}
    for i, t in enumerate(all_tags, 1):
        w = f"{where}: tag {i}"
        if not isinstance(t, dict):
            _fail(w, "must be an object {name, value_type, values?}", "bad_meta")
        name = _name(t.get("name"), "name", w)
        w = f"{where}: tag {name!r}"
        vt = t.get("value_type")
        if vt not in TAG_VALUE_TYPES:
            _fail(w, f"value_type {vt!r} is not one of {', '.join(sorted(TAG_VALUE_TYPES))}", "bad_meta")
        values = t.get("values")
        if vt == "oneof_string":
            if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
                _fail(w, "a oneof_string tag needs 'values': a non-empty list of strings", "bad_meta")
        if "color" in t and (not isinstance(t["color"], str) or not HEX_COLOR_RE.match(t["color"])):
            _fail(w, f"color {t['color']!r} is not '#RRGGBB'", "bad_meta")
        if name in tags and tags[name] != (vt, values):
            _fail(w, "is defined twice, differently", "bad_meta")
        tags[name] = (vt, values)
    return tags


def _tags(tags, meta: Meta, where: str) -> None:
    if not isinstance(tags, list):
        _fail(where, "tags must be a list")
    if len(tags) > MAX_TAGS:
        _fail(where, f"more than {MAX_TAGS} tags")
    for i, t in enumerate(tags, 1):
        if isinstance(t, str):  # the SDK reads a bare name as a tag without a value
            t = {"name": t}
        if not isinstance(t, dict):
            _fail(where, f"tag {i} must be an object {{name, value}}")
        name = t.get("name")
        if name not in meta.tags:
            _fail(where, f"tag {i} {name!r} is not a tag of the meta")
        vt, values = meta.tags[name]
        v = t.get("value")
        ok = {
            "none": v is None,
            "any_number": isinstance(v, (int, float)) and not isinstance(v, bool),
            "any_string": isinstance(v, str),
            "oneof_string": isinstance(v, str) and v in (values or ()),
            "date": isinstance(v, str),
        }[vt]
        if not ok:
            _fail(where, f"tag {i} ({name!r}, {vt}) cannot have the value {v!r}")


def _points(pts, what: str, where: str) -> int:
    if not isinstance(pts, list):
        _fail(where, f"{what} must be a list of [x, y] points")
    for p in pts:
        if not (
            isinstance(p, list)
            and len(p) == 2
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)
        ):
            _fail(where, f"{what} has {p!r}, which is not an [x, y] pair of numbers")
        if not all(math.isfinite(c) and abs(c) <= MAX_COORD for c in p):
            _fail(where, f"{what} has {p!r}; coordinates must be finite and within ±{MAX_COORD:g}")
    return len(pts)


def _vector(obj: dict, shape: str, where: str) -> None:
    pts = obj.get("points")
    if not isinstance(pts, dict) or "exterior" not in pts or "interior" not in pts:
        _fail(where, f"a {shape} needs points {{exterior, interior}}")
    ext, interior = pts["exterior"], pts["interior"]
    n = _points(ext, "exterior", where)
    if not isinstance(interior, list):
        _fail(where, "interior must be a list of point lists")
    for k, ring in enumerate(interior, 1):
        m = _points(ring, f"interior {k}", where)
        if shape == "polygon" and m < 3:
            _fail(where, f"polygon interior {k} has {m} points; at least 3 are needed")
        n += m
    if n > MAX_POINTS:
        _fail(where, f"{n} points are more than the limit of {MAX_POINTS}")
    e = len(ext)
    need = {
        "rectangle": (e == 2, "exactly 2 exterior points (two corners)"),
        "polygon": (e >= 3, "at least 3 exterior points"),
        "line": (e >= 2, "at least 2 exterior points"),
        "point": (e == 1, "exactly 1 exterior point"),
    }
    if shape in need and not need[shape][0]:
        _fail(where, f"a {shape} needs {need[shape][1]}, not {e}")


def _bitmap(obj: dict, shape: str, size: dict, budget: Budget, where: str) -> None:
    bm = obj.get("bitmap")  # AlphaMask derives from Bitmap and keeps its JSON key
    if not isinstance(bm, dict) or "data" not in bm or "origin" not in bm:
        _fail(where, f"a {shape} needs bitmap {{data, origin}}")
    origin = bm["origin"]
    if not (
        isinstance(origin, list)
        and len(origin) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) for c in origin)
    ):
        _fail(where, f"bitmap origin must be [x, y] integers, not {origin!r}")
    data = bm["data"]
    if not isinstance(data, str) or not data:
        _fail(where, "bitmap data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        _fail(where, "bitmap data is not valid base64")
    png = raw
    limit = budget.limit()
    if not raw.startswith(PNG_SIGNATURE):  # the usual form: zlib(PNG bytes), as Bitmap.data_2_base64 writes
        d = zlib.decompressobj()
        try:
            # The IHDR first: a bitmap larger than its image is refused before the rest is inflated.
            png = d.decompress(raw, 33)
            if len(png) == 33 and png.startswith(PNG_SIGNATURE):
                _ihdr_size(png, size, where)
            if d.unconsumed_tail and len(png) <= limit:
                png += d.decompress(d.unconsumed_tail, limit + 1 - len(png))
        except zlib.error:
            _fail(where, "bitmap data is neither zlib-compressed nor a PNG")
    if len(png) > limit:
        _fail(
            where,
            f"bitmap PNG is larger than {MAX_MASK_PNG_BYTES} bytes"
            if limit == MAX_MASK_PNG_BYTES
            else f"the bitmaps of this request inflate to more than {MAX_REQUEST_MASK_BYTES} bytes together",
        )
    budget.spend(len(png))
    if not raw.startswith(PNG_SIGNATURE):
        if not d.eof:
            _fail(where, "bitmap data is truncated zlib data")
        if not png.startswith(PNG_SIGNATURE):
            _fail(where, "bitmap data does not hold a PNG (bad signature after zlib)")
    _ihdr_size(png, size, where)
    _png_chunks(png, where)


def _ihdr_size(png: bytes, size: dict, where: str) -> None:
    """The bitmap's size from its PNG header: non-empty, and within its image (which bounds what a
    viewer decodes to what the image itself costs)."""
    if len(png) < 33 or png[12:16] != b"IHDR":
        _fail(where, "bitmap PNG has no IHDR header")
    w, h = struct.unpack(">II", png[16:24])
    if w == 0 or h == 0 or w * h > MAX_MASK_PIXELS:
        _fail(where, f"bitmap PNG is {w}x{h}; it must be non-empty and at most {MAX_MASK_PIXELS} pixels")
    if w > size["width"] or h > size["height"]:
        _fail(where, f"bitmap PNG is {w}x{h}, larger than its image ({size['width']}x{size['height']})")


def _png_chunks(png: bytes, where: str) -> None:
    """A PNG's chunk structure and CRCs, from IHDR to IEND, without decoding the pixels."""

    def damaged(why: str):
        _fail(where, f"bitmap PNG is damaged ({why})")

    ihdr = png[16:29]
    depth, colour, compression, filtering, interlace = ihdr[8:13]
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        damaged(f"IHDR: bit depth {depth}, colour type {colour}, methods {compression}/{filtering}/{interlace}")
    view, pos, idat = memoryview(png), 8, False
    while True:
        if pos + 8 > len(png):
            damaged("it ends before its IEND chunk")
        n, kind = struct.unpack_from(">I4s", png, pos)
        if kind == b"IEND":  # what follows is not read (neither by Pillow's verify())
            break
        end = pos + 8 + n
        if not kind.isalpha() or end + 4 > len(png):
            damaged(f"chunk {kind!r} at byte {pos} is not a chunk or runs past the end")
        if (pos == 8) != (kind == b"IHDR") or (kind == b"IHDR" and n != 13):
            damaged("IHDR is not its first and only header, of 13 bytes")
        if zlib.crc32(view[pos + 8 : end], zlib.crc32(kind)) != struct.unpack_from(">I", png, end)[0]:
            damaged(f"bad CRC in its {kind.decode()} chunk")
        idat = idat or kind == b"IDAT"
        pos = end + 4
    if not idat:
        damaged("it has no IDAT chunk")


def _object(obj, meta: Meta, size: dict, budget: Budget, where: str) -> None:
    if not isinstance(obj, dict):
        _fail(where, "must be an object {classTitle, geometryType, ...}")
    title = obj.get("classTitle")
    if title not in meta.classes:
        _fail(where, f"classTitle {title!r} is not a class of the meta")
    shape = meta.classes[title]
    given = obj.get("geometryType", obj.get("shape"))
    if shape == "any":
        if given not in SHAPES - {"any"}:
            _fail(where, f"class {title!r} has shape 'any', so the object needs a geometryType; {given!r} is not one")
        shape = given
    elif given is not None and given != shape:
        _fail(where, f"geometryType {given!r} does not match the shape {shape!r} of its class {title!r}")
    if shape in ("bitmap", "alpha_mask"):
        _bitmap(obj, shape, size, budget, where)
    elif shape in ("rectangle", "polygon", "line", "point"):
        _vector(obj, shape, where)
    if "tags" not in obj:
        _fail(where, "a 'tags' list is required (the SDK reads one; it may be empty)")
    _tags(obj["tags"], meta, where)


def check_ann(ann, meta: Meta, where: str, budget: Budget | None = None) -> None:
    """Check one image annotation against the meta; `where` names the item ('dataset ds0, item a.jpg').
    `budget` is shared by the annotations of one request (a fresh one if None)."""
    if not isinstance(ann, dict):
        _fail(where, "the annotation must be a JSON object")
    _finite(ann, where)
    n = _json_size(ann)
    if n > MAX_ANN_BYTES:
        _fail(where, f"the annotation is {n} bytes; the limit is {MAX_ANN_BYTES}")
    size = ann.get("size")
    if not (
        isinstance(size, dict)
        and all(
            isinstance(size.get(k), int) and not isinstance(size.get(k), bool) and size[k] > 0
            for k in ("height", "width")
        )
    ):
        _fail(where, f"the annotation's size must be {{height, width}} positive integers, not {size!r}")
    for key in ("objects", "tags"):
        if not isinstance(ann.get(key), list):
            _fail(where, f"the annotation needs an '{key}' list (it may be empty)")
    if "description" in ann and not isinstance(ann["description"], str):
        _fail(where, "the annotation's description must be a string")
    objects = ann["objects"]
    if len(objects) > MAX_OBJECTS:
        _fail(where, f"{len(objects)} objects are more than the limit of {MAX_OBJECTS}")
    _tags(ann["tags"], meta, where)
    budget = budget if budget is not None else Budget()
    for i, obj in enumerate(objects, 1):
        _object(obj, meta, size, budget, f"{where}, object {i}")
