"""Our rows as the JSON "infos" the Supervisely server answers (SDK 6.74.51, `supervisely/api/*`).

The SDK turns each answer into a NamedTuple by reading the fields its Api's `info_sequence()`
names (camelCase, `ApiField`), a missing one as None. So every field here is one the SDK reads,
and a field is left out (None to the SDK) where the only value we could give would mislead or
break it:
- a dataset's `customData` is never sent: `api.dataset.tree()` uses DatasetInfo as a dict key,
  and a dict field makes the tuple unhashable;
- an image's `pathOriginal`/`fullStorageUrl`/`link` are None: the bytes are served by the
  `images.download*` methods only, never by a storage URL.

Conventions the rest of the public API shares:
- **Hashes.** The SDK's image hash is base64(sha256(bytes)) (`supervisely._utils.get_bytes_hash`);
  our blobs are named by the hex sha256 of the same bytes. `sly_hash` and `sha256_of` convert
  exactly, so an image's `hash` is what the SDK computes locally (`upload_paths` checks it with
  `images.internal.hashes.list`) and `upload_hashes` names a blob we have.
- **Dates** are ISO-8601 UTC with milliseconds and a `Z`, as Supervisely writes them. An image
  has no time of its own here: it carries its project's `created_at`.
- **Coordinates.** The server speaks the labeling tool's subpixel coordinates: the SDK converts
  what it downloads to pixel coordinates and what it uploads to subpixel ones
  (`Annotation._to_pixel/_to_subpixel_coordinate_system_json`). Our stored annotations are in the
  pixel coordinates of the Supervisely format on disk, so `ann_to_subpixel` is applied to every
  annotation we answer and `ann_to_pixel` to every one an App posts: the round trip gives back
  integer pixel coordinates unchanged.
"""

from __future__ import annotations

import base64
import binascii
import copy
import math
import posixpath
from datetime import UTC, datetime

from sqlalchemy import select

from server import db

TEAM_ROLE = "admin"  # what the App's token may do in the one team: read and write its projects and files
EPOCH = 0.0  # the default team and workspace have no row: a fixed creation time keeps their infos stable
NAME_BATCH = 500  # dataset names per query (SQLite binds a bounded number of parameters)
PROJECT_TYPE = "images"

# The MIME type answered for an image name's extension. The SDK (ImageApi._convert_json_info)
# appends `.<subtype>` to a name whose extension differs from the MIME subtype (jpg/jpeg/mpo
# match "jpeg"), so the subtype is the extension itself wherever no standard one matches it.
_JPEG = {"jpg", "jpeg", "jpe", "mpo", "jfif"}


def iso(ts: float | None) -> str | None:
    """Epoch seconds as Supervisely writes a time: `2021-03-02T10:04:33.973Z`."""
    if ts is None:
        return None
    ms = int(round(ts * 1000))
    return datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def sly_hash(sha256_hex: str) -> str:
    """The SDK's hash of the bytes whose sha256 is `sha256_hex`: base64 of the digest."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def sha256_of(h: object) -> str | None:
    """The hex sha256 an SDK hash names, or None when `h` is not one (44 base64 characters of 32 bytes)."""
    if not isinstance(h, str) or len(h) != 44:
        return None
    try:
        raw = base64.b64decode(h, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def mime_of(name: str) -> str:
    """The MIME type answered for an image named `name` (see _JPEG's comment)."""
    ext = posixpath.splitext(name)[1][1:].lower()
    if ext in _JPEG:
        return "image/jpeg"
    return "image/" + (ext or "jpeg")


def team_info() -> dict:
    """The one team (db.DEFAULT_TEAM_ID) as TeamApi reads it."""
    return {
        "id": db.DEFAULT_TEAM_ID,
        "name": db.DEFAULT_TEAM_NAME,
        "description": "",
        "role": TEAM_ROLE,
        "createdAt": iso(EPOCH),
        "updatedAt": iso(EPOCH),
        "usage": None,
    }


def workspace_info() -> dict:
    """The one workspace (db.DEFAULT_WORKSPACE_ID) of the team, as WorkspaceApi reads it."""
    return {
        "id": db.DEFAULT_WORKSPACE_ID,
        "name": db.DEFAULT_WORKSPACE_NAME,
        "description": "",
        "teamId": db.DEFAULT_TEAM_ID,
        "createdAt": iso(EPOCH),
        "updatedAt": iso(EPOCH),
    }


def project_info(row: dict, size: int | None = None) -> dict:
    """A `projects` row (id, name, datasets summary, created_at) as ProjectApi reads it.

    Counts come from the row's datasets summary; `size` (the bytes of its images, a string as
    Supervisely sends it) when the caller summed it."""
    summary = row.get("datasets") or []
    count = sum(int(d.get("items_count", 0)) for d in summary)
    return {
        "id": row["id"],
        "name": row["name"],
        "description": "",
        "size": str(size or 0),
        "readme": "",
        "workspaceId": db.DEFAULT_WORKSPACE_ID,
        "imagesCount": count,
        "itemsCount": count,
        "datasetsCount": len(summary),
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["created_at"]),
        "type": PROJECT_TYPE,
        "referenceImageUrl": None,
        "customData": {},
        "backupArchive": {},
        "teamId": db.DEFAULT_TEAM_ID,
        "settings": {},
        "importSettings": {},
        "version": None,
        "createdBy": None,
        "embeddingsEnabled": False,
        "embeddingsUpdatedAt": None,
        "embeddingsInProgress": False,
    }


def project_meta(meta: dict) -> dict:
    """The stored Supervisely meta as `projects.meta` answers it: with its `projectType`."""
    out = dict(meta)
    out.setdefault("classes", [])
    out.setdefault("tags", [])
    out.setdefault("projectType", PROJECT_TYPE)
    return out


def dataset_info(ds: dict, items_count: int, size: int | None = None) -> dict:
    """A `datasets` row (id, project_id, name, created_at) as DatasetApi reads it; datasets are
    never nested here (`parentId` None). No `customData`: see the module docstring."""
    return {
        "id": ds["id"],
        "name": ds["name"],
        "description": "",
        "size": str(size or 0),
        "projectId": ds["project_id"],
        "imagesCount": items_count,
        "itemsCount": items_count,
        "createdAt": iso(ds["created_at"]),
        "updatedAt": iso(ds["created_at"]),
        "referenceImageUrl": None,
        "teamId": db.DEFAULT_TEAM_ID,
        "workspaceId": db.DEFAULT_WORKSPACE_ID,
        "parentId": None,
        "createdBy": None,
    }


def image_tags(tags, tag_ids: dict[str, int]) -> list[dict]:
    """An annotation's image tags as the API lists them on an image (`tagId`, `value`): only those
    whose tag meta has an id (`tag_ids`: name -> id), since the SDK maps them back by that id."""
    out = []
    for t in tags if isinstance(tags, list) else []:
        if isinstance(t, dict) and t.get("name") in tag_ids:
            out.append({"tagId": tag_ids[t["name"]], "value": t.get("value")})
    return out


def image_info(item: dict, dataset_id: int, project_id: int, created_at: float, tag_ids: dict | None = None) -> dict:
    """A `project_items` row as ImageApi reads it: id, name, sha256, size, and either its `ann` or
    the few parts of it an info needs (`width`, `height`, `labels`: the objects count, `tags`:
    the image tags), which a listing reads in SQL rather than loading every annotation whole."""
    if "ann" in item:
        ann = item["ann"] or {}
        size = ann.get("size") or {}
        objects = ann.get("objects")
        width, height = size.get("width"), size.get("height")
        labels, tags = (len(objects) if isinstance(objects, list) else 0), ann.get("tags")
    else:
        width, height, labels, tags = item["width"], item["height"], item["labels"] or 0, item["tags"]
    mime = mime_of(item["name"])
    return {
        "id": item["id"],
        "name": item["name"],
        "link": None,
        "hash": sly_hash(item["sha256"]),
        "mime": mime,
        "ext": mime.split("/", 1)[1],
        "size": item["size"],
        "width": width,
        "height": height,
        "labelsCount": labels,
        "datasetId": dataset_id,
        "createdAt": iso(created_at),
        "updatedAt": iso(created_at),
        "meta": {},
        "pathOriginal": None,
        "fullStorageUrl": None,
        "tags": image_tags(tags, tag_ids or {}),
        "createdBy": None,
        "relatedDataId": None,
        "downloadId": None,
        "offsetStart": None,
        "offsetEnd": None,
        "aiSearchMeta": None,
        "embeddingsUpdatedAt": None,
        "projectId": project_id,
        "description": "",
        "parentId": None,
    }


def annotation_info(item: dict, dataset_id: int, created_at: float) -> dict:
    """A `project_items` row's annotation as AnnotationApi reads it, in subpixel coordinates."""
    return {
        "imageId": item["id"],
        "imageName": item["name"],
        "annotation": ann_to_subpixel(item["ann"]),
        "createdAt": iso(created_at),
        "updatedAt": iso(created_at),
        "datasetId": dataset_id,
    }


# --- coordinates (see the module docstring) ---
# Per geometry, as the Supervisely format stores it:
# - rectangle / oriented_bbox: points [[left, top], [right, bottom]] in pixel coordinates name the
#   first and last pixel inside; in subpixel ones the right and bottom edges are one further;
# - point, polygon, line (points.exterior/interior) and multipolygon parts: a pixel's centre is
#   half a pixel from its corner;
# - graph (nodes.*.loc): the centre of the pixel it is in;
# - bitmap / alpha mask origin: a pixel corner, the same in both.


def ann_to_subpixel(ann: dict) -> dict:
    """A stored (pixel) annotation as the server answers it (subpixel); the input is not changed."""
    return _convert(ann, _label_to_subpixel)


def ann_to_pixel(ann: dict) -> dict:
    """An annotation an App posted (subpixel) as it is stored (pixel); the input is not changed."""
    size = ann.get("size") if isinstance(ann, dict) else None
    h = size.get("height") if isinstance(size, dict) else None
    w = size.get("width") if isinstance(size, dict) else None
    return _convert(ann, lambda label: _label_to_pixel(label, h, w))


def _convert(ann: dict, fn) -> dict:
    if not isinstance(ann, dict) or not isinstance(ann.get("objects"), list):
        return ann
    out = dict(ann)
    out["objects"] = [fn(copy.deepcopy(o)) if isinstance(o, dict) else o for o in ann["objects"]]
    return out


def _is_xy(p) -> bool:
    return (
        isinstance(p, list)
        and len(p) >= 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in p[:2])
    )


def _shift(points, d: float, h=None, w=None) -> None:
    """Move each [x, y] of a list by d in place; to pixels (d < 0) a coordinate is floored, and one
    on the far edge of the image (x == width, y == height) stays on its last pixel."""
    if not isinstance(points, list):
        return
    for p in points:
        if not _is_xy(p):
            continue
        if d > 0:
            p[0], p[1] = p[0] + d, p[1] + d
        else:
            p[0] = _to_px(p[0], w)
            p[1] = _to_px(p[1], h)


def _to_px(v: float, edge) -> int:
    f = math.floor(v)
    return f - 1 if edge is not None and v == edge else f


def _rect_corners(points):
    """(left, top, right, bottom) of a rectangle's two corners, or None if they are not two points."""
    if not (isinstance(points, list) and len(points) == 2 and all(_is_xy(p) for p in points)):
        return None
    left, right = sorted((points[0][0], points[1][0]))
    top, bottom = sorted((points[0][1], points[1][1]))
    return left, top, right, bottom


def _label_to_subpixel(o: dict) -> dict:
    gt = o.get("geometryType")
    pts = o.get("points")
    if gt == "rectangle" and isinstance(pts, dict):
        c = _rect_corners(pts.get("exterior"))
        if c is not None:
            left, top, right, bottom = c
            pts["exterior"] = [[left, top], [max(left, right + 1), max(top, bottom + 1)]]
        return o
    if gt == "oriented_bbox":
        c = _rect_corners(pts)
        if c is not None:
            left, top, right, bottom = c
            o["points"] = [[left, top], [max(left, right + 1), max(top, bottom + 1)]]
        return o
    _each_point_list(o, lambda ps: _shift(ps, 0.5))
    if isinstance(o.get("nodes"), dict):
        for node in o["nodes"].values():
            if isinstance(node, dict) and _is_xy(node.get("loc")):
                node["loc"] = [math.floor(node["loc"][0]) + 0.5, math.floor(node["loc"][1]) + 0.5]
    _floor_origin(o)
    return o


def _label_to_pixel(o: dict, h, w) -> dict:
    gt = o.get("geometryType")
    pts = o.get("points")
    if gt == "rectangle" and isinstance(pts, dict):
        c = _rect_corners(pts.get("exterior"))
        if c is not None:
            left, top, right, bottom = _round_rect(*c)
            pts["exterior"] = [[left, top], [max(left, right - 1), max(top, bottom - 1)]]
        return o
    if gt == "oriented_bbox":
        c = _rect_corners(pts)
        if c is not None:
            left, top, right, bottom = _round_rect(*c)
            o["points"] = [[left, top], [max(left, right - 1), max(top, bottom - 1)]]
        return o
    _each_point_list(o, lambda ps: _shift(ps, -0.5, h, w))
    if isinstance(o.get("nodes"), dict):
        for node in o["nodes"].values():
            if isinstance(node, dict) and _is_xy(node.get("loc")):
                node["loc"] = [_to_px(node["loc"][0], w), _to_px(node["loc"][1], h)]
    _floor_origin(o)
    return o


def _round_rect(left, top, right, bottom) -> tuple[int, int, int, int]:
    """A subpixel rectangle's edges on pixel edges: a pixel counts as inside when at least 0.3 of
    it is (the labeling tool's rule: left/top round down below .7, right/bottom round up above .3)."""

    def low(v):
        return math.floor(v) if v - math.floor(v) < 0.7 else math.ceil(v)

    def high(v):
        return math.ceil(v) if v - math.floor(v) > 0.3 else math.floor(v)

    return low(left), low(top), high(right), high(bottom)


def _each_point_list(o: dict, fn) -> None:
    """Call fn on every list of [x, y] points of a label: points.exterior, each points.interior
    ring, and each multipolygon part's exterior and interior rings."""
    pts = o.get("points")
    if isinstance(pts, dict):
        fn(pts.get("exterior"))
        for ring in pts.get("interior") or []:
            fn(ring)
    parts = o.get("parts")
    if isinstance(parts, list):
        for part in parts:
            if isinstance(part, dict):
                fn(part.get("exterior"))
                for ring in part.get("interior") or []:
                    fn(ring)


def _floor_origin(o: dict) -> None:
    for key in ("bitmap", "alphaMask"):
        b = o.get(key)
        if isinstance(b, dict) and _is_xy(b.get("origin")):
            b["origin"] = [math.floor(b["origin"][0]), math.floor(b["origin"][1])]


# --- dataset ids: a dataset is (project_id, name) in project_items, and an id in db.datasets ---


def dataset_ids(conn, project_id: int, names) -> dict[str, int]:
    """{name: dataset id} for the named datasets of a project, NAME_BATCH names per query."""
    c = db.datasets.c
    names = list(dict.fromkeys(names))
    out: dict[str, int] = {}
    for i in range(0, len(names), NAME_BATCH):
        q = select(c.name, c.id).where(c.project_id == project_id, c.name.in_(names[i : i + NAME_BATCH]))
        out.update({name: did for name, did in conn.execute(q)})
    return out


def dataset_row(conn, dataset_id: int) -> dict | None:
    """The `datasets` row (id, project_id, name, created_at) of an id, or None."""
    row = conn.execute(select(db.datasets).where(db.datasets.c.id == dataset_id)).mappings().first()
    return dict(row) if row is not None else None
