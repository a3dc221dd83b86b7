"""The Supervisely project format the server stores: checks of a project meta and of an image's
annotation, and the empty annotation of an item posted without one.

The rules are those of the Supervisely SDK's readers (supervisely/project/project_meta.py,
annotation/annotation.py, label.py, tag.py, geometry/*.py): what passes here, `sly.Project`
opens. A failure is an `APIError(400, ...)` whose detail names the dataset and the item.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import struct
import zlib

from protocol.errors import APIError

# Documented limits (docs/protocol.md, "Supervisely projects").
MAX_ANN_BYTES = 1024 * 1024          # one item's annotation, as compact JSON
MAX_OBJECTS = 10_000                 # objects (labels) in one annotation
MAX_POINTS = 100_000                 # points in one object (exterior and interiors together)
MAX_TAGS = 1_000                     # tags on one image or one object
MAX_META_BYTES = 1024 * 1024         # the project meta, as compact JSON
MAX_CLASSES = 10_000                 # object classes in a meta
MAX_TAG_METAS = 10_000               # tag metas in a meta
MAX_MASK_PIXELS = 1 << 28            # a bitmap's width x height
MAX_MASK_PNG_BYTES = 64 * 1024 * 1024  # a bitmap's PNG after the zlib layer is undone
MAX_COORD = 1e9                      # |x| and |y| of a point

# The 2-D image shapes (geometry_name() of the SDK's geometry classes) and "any" (AnyGeometry).
SHAPES = frozenset({"rectangle", "polygon", "line", "point", "bitmap", "alpha_mask", "graph", "cuboid",
                    "cuboid_2d", "multipolygon", "oriented_bbox", "any"})
TAG_VALUE_TYPES = frozenset({"none", "any_number", "any_string", "oneof_string", "date"})
HEX_COLOR_RE = re.compile(r"^#[0-9A-Fa-f]{6}$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def empty_meta() -> dict:
    """The meta of a project posted without one (what `sly.ProjectMeta().to_json()` gives for images)."""
    return {"classes": [], "tags": [], "projectType": "images"}


def empty_ann(height: int | None, width: int | None) -> dict:
    """The annotation of an item posted without one (`sly.Annotation((h, w)).to_json()`).

    The size is the image's when its header can be read; otherwise null, which the SDK's
    `Annotation.from_json` accepts (its img_size may be `(None, None)`).
    """
    return {"description": "", "size": {"height": height, "width": width}, "tags": [], "objects": [],
            "customBigData": {}}


def image_size(path) -> tuple[int | None, int | None]:
    """(height, width) from an image file's header (nothing is decoded); (None, None) if unreadable."""
    try:
        from PIL import Image
        with Image.open(path) as im:
            w, h = im.size
        return int(h), int(w)
    except Exception:   # not an image Pillow knows, or truncated: the size stays unknown
        return None, None


class Meta:
    """A checked project meta: class title -> shape, tag name -> (value_type, possible values)."""

    def __init__(self, classes: dict[str, str], tags: dict[str, tuple[str, list | None]]):
        self.classes, self.tags = classes, tags


def _fail(where: str, msg: str, code: str = "bad_annotation"):
    raise APIError(400, code, f"{where}: {msg}" if where else msg)


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


def check_meta(meta) -> Meta:
    """Check a project meta (classes with shape and colour, tag metas); returns its lookup tables."""
    where = "meta"
    if not isinstance(meta, dict):
        _fail(where, "must be a JSON object", "bad_meta")
    _finite(meta, where)
    if _json_size(meta) > MAX_META_BYTES:
        _fail(where, f"is larger than {MAX_META_BYTES} bytes", "bad_meta")
    classes_json = meta.get("classes", [])
    if not isinstance(classes_json, list) or len(classes_json) > MAX_CLASSES:
        _fail(where, f"classes must be a list of at most {MAX_CLASSES} object classes", "bad_meta")
    classes: dict[str, str] = {}
    for i, c in enumerate(classes_json, 1):
        w = f"meta: class {i}"
        if not isinstance(c, dict):
            _fail(w, "must be an object {title, shape, color}", "bad_meta")
        title = _name(c.get("title"), "title", w)
        w = f"meta: class {title!r}"
        if title in classes:
            _fail(w, "is defined twice", "bad_meta")
        shape = c.get("shape")
        if shape not in SHAPES:
            _fail(w, f"shape {shape!r} is not one of {', '.join(sorted(SHAPES))}", "bad_meta")
        color = c.get("color")
        if not isinstance(color, str) or not HEX_COLOR_RE.match(color):
            _fail(w, f"color {color!r} is not '#RRGGBB'", "bad_meta")
        classes[title] = shape

    tags_json = meta.get("tags", [])
    legacy = [meta.get("tags_images", []), meta.get("tags_objects", [])]
    if not all(isinstance(t, list) for t in [tags_json] + legacy):
        _fail(where, "tags, tags_images and tags_objects must be lists", "bad_meta")
    if tags_json and any(legacy):
        _fail(where, "has both 'tags' and the legacy 'tags_images'/'tags_objects'; the SDK reads one or the other",
              "bad_meta")
    all_tags = tags_json or legacy[0] + legacy[1]
    if len(all_tags) > MAX_TAG_METAS:
        _fail(where, f"has more than {MAX_TAG_METAS} tag metas", "bad_meta")
    tags: dict[str, tuple[str, list | None]] = {}
    for i, t in enumerate(all_tags, 1):
        w = f"meta: tag {i}"
        if not isinstance(t, dict):
            _fail(w, "must be an object {name, value_type, values?}", "bad_meta")
        name = _name(t.get("name"), "name", w)
        w = f"meta: tag {name!r}"
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
    return Meta(classes, tags)


def _tags(tags, meta: Meta, where: str) -> None:
    if not isinstance(tags, list):
        _fail(where, "tags must be a list")
    if len(tags) > MAX_TAGS:
        _fail(where, f"more than {MAX_TAGS} tags")
    for i, t in enumerate(tags, 1):
        if isinstance(t, str):          # the SDK reads a bare name as a tag without a value
            t = {"name": t}
        if not isinstance(t, dict):
            _fail(where, f"tag {i} must be an object {{name, value}}")
        name = t.get("name")
        if name not in meta.tags:
            _fail(where, f"tag {i} {name!r} is not a tag of the meta")
        vt, values = meta.tags[name]
        v = t.get("value")
        ok = {"none": v is None,
              "any_number": isinstance(v, (int, float)) and not isinstance(v, bool),
              "any_string": isinstance(v, str),
              "oneof_string": isinstance(v, str) and v in (values or ()),
              "date": isinstance(v, str)}[vt]
        if not ok:
            _fail(where, f"tag {i} ({name!r}, {vt}) cannot have the value {v!r}")


def _points(pts, what: str, where: str) -> int:
    if not isinstance(pts, list):
        _fail(where, f"{what} must be a list of [x, y] points")
    for p in pts:
        if not (isinstance(p, list) and len(p) == 2
                and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)):
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
    need = {"rectangle": (e == 2, "exactly 2 exterior points (two corners)"),
            "polygon": (e >= 3, "at least 3 exterior points"),
            "line": (e >= 2, "at least 2 exterior points"),
            "point": (e == 1, "exactly 1 exterior point")}
    if shape in need and not need[shape][0]:
        _fail(where, f"a {shape} needs {need[shape][1]}, not {e}")


def _bitmap(obj: dict, shape: str, where: str) -> None:
    bm = obj.get("bitmap")   # AlphaMask derives from Bitmap and keeps its JSON key
    if not isinstance(bm, dict) or "data" not in bm or "origin" not in bm:
        _fail(where, f"a {shape} needs bitmap {{data, origin}}")
    origin = bm["origin"]
    if not (isinstance(origin, list) and len(origin) == 2
            and all(isinstance(c, int) and not isinstance(c, bool) for c in origin)):
        _fail(where, f"bitmap origin must be [x, y] integers, not {origin!r}")
    data = bm["data"]
    if not isinstance(data, str) or not data:
        _fail(where, "bitmap data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        _fail(where, "bitmap data is not valid base64")
    png = raw
    if not raw.startswith(PNG_SIGNATURE):     # the usual form: zlib(PNG bytes), as Bitmap.data_2_base64 writes
        d = zlib.decompressobj()
        try:
            png = d.decompress(raw, MAX_MASK_PNG_BYTES + 1)
        except zlib.error:
            _fail(where, "bitmap data is neither zlib-compressed nor a PNG")
        if len(png) > MAX_MASK_PNG_BYTES:
            _fail(where, f"bitmap PNG is larger than {MAX_MASK_PNG_BYTES} bytes")
        if not d.eof:
            _fail(where, "bitmap data is truncated zlib data")
        if not png.startswith(PNG_SIGNATURE):
            _fail(where, "bitmap data does not hold a PNG (bad signature after zlib)")
    if len(png) < 33 or png[12:16] != b"IHDR":
        _fail(where, "bitmap PNG has no IHDR header")
    w, h = struct.unpack(">II", png[16:24])
    if w == 0 or h == 0 or w * h > MAX_MASK_PIXELS:
        _fail(where, f"bitmap PNG is {w}x{h}; it must be non-empty and at most {MAX_MASK_PIXELS} pixels")
    try:
        from PIL import Image
        with Image.open(io.BytesIO(png)) as im:
            im.verify()   # chunk structure and CRCs, without decoding the pixels
    except Exception as e:
        _fail(where, f"bitmap PNG is damaged ({type(e).__name__}: {e})")


def _object(obj, meta: Meta, where: str) -> None:
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
        _bitmap(obj, shape, where)
    elif shape in ("rectangle", "polygon", "line", "point"):
        _vector(obj, shape, where)
    if "tags" not in obj:
        _fail(where, "a 'tags' list is required (the SDK reads one; it may be empty)")
    _tags(obj["tags"], meta, where)


def check_ann(ann, meta: Meta, where: str) -> None:
    """Check one image annotation against the meta; `where` names the item ('dataset ds0, item a.jpg')."""
    if not isinstance(ann, dict):
        _fail(where, "the annotation must be a JSON object")
    _finite(ann, where)
    n = _json_size(ann)
    if n > MAX_ANN_BYTES:
        _fail(where, f"the annotation is {n} bytes; the limit is {MAX_ANN_BYTES}")
    size = ann.get("size")
    if not (isinstance(size, dict)
            and all(isinstance(size.get(k), int) and not isinstance(size.get(k), bool) and size[k] > 0
                    for k in ("height", "width"))):
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
    for i, obj in enumerate(objects, 1):
        _object(obj, meta, f"{where}, object {i}")
