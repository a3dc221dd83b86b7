"""Write a small annotated Supervisely-format image project (standard library only, no SDK).

The layout and JSON are the Supervisely SDK's own (supervisely/project/project.py,
annotation/annotation.py, project/project_meta.py, geometry/bitmap.py, SDK 6.74.51):

    <dir>/meta.json                  object classes (title, shape, color) and tag metas
    <dir>/<ds>/img/<item>            the image
    <dir>/<ds>/ann/<item>.json       size, image tags, objects with geometry, class and tags

Every annotation is written in the exact form `sly.Annotation.to_json()` produces, so an SDK
round trip (from_json -> to_json) gives the same JSON back. The pictures are deterministic: a
noisy grey background, a red rectangle ("square"), a green triangle ("triangle", a polygon) and
a blue disc ("blob", a bitmap), so a model that learns per-class mean colours learns something.

    python -m tools.sample_project DIR [--name sample] [--datasets ds0=3,ds1=2]
"""

from __future__ import annotations

import base64
import json
import os
import random
import struct
import zlib

# class title -> (shape, colour of the class in meta.json, fill colour drawn in the image)
CLASSES = {
    "square": ("rectangle", "#E53935", (220, 40, 40)),
    "triangle": ("polygon", "#43A047", (40, 200, 60)),
    "blob": ("bitmap", "#1E88E5", (40, 80, 220)),
}
WEATHER = ["sunny", "cloudy", "rainy"]
TAG_METAS = [
    {
        "name": "weather",
        "value_type": "oneof_string",
        "color": "#F9A825",
        "values": WEATHER,
        "hotkey": "",
        "applicable_type": "imagesOnly",
        "classes": [],
        "target_type": "all",
    },
    {
        "name": "difficult",
        "value_type": "none",
        "color": "#8E24AA",
        "hotkey": "",
        "applicable_type": "objectsOnly",
        "classes": [],
        "target_type": "all",
    },
    {
        "name": "confidence",
        "value_type": "any_number",
        "color": "#00897B",
        "hotkey": "",
        "applicable_type": "all",
        "classes": [],
        "target_type": "all",
    },
]


def project_meta() -> dict:
    """The project's meta.json: three classes (rectangle, polygon, bitmap) and three tag metas."""
    classes = [
        {"title": name, "description": "", "shape": shape, "color": color, "geometry_config": {}, "hotkey": ""}
        for name, (shape, color, _) in CLASSES.items()
    ]
    return {
        "classes": classes,
        "tags": [dict(t) for t in TAG_METAS],
        "projectType": "images",
        "projectSettings": {"multiView": {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}},
    }


def png_bytes(
    width: int, height: int, rows: list[bytes], color_type: int, chunks: tuple[tuple[bytes, bytes], ...] = ()
) -> bytes:
    """An 8-bit PNG from raw scanlines (colour type 2 = RGB, 3 = palette), unfiltered."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + row for row in rows))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + b"".join(chunk(t, d) for t, d in chunks)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def bitmap_data(mask_rows: list[list[bool]]) -> str:
    """A mask as the SDK stores it: base64 of zlib-compressed PNG (palette, index 0 transparent).

    The same form as `sly.Bitmap.data_2_base64`, whose reader takes the PNG's alpha channel as
    the mask; the PNG bytes themselves differ from Pillow's (8-bit here, 1-bit there).
    """
    rows = [bytes(1 if v else 0 for v in row) for row in mask_rows]
    png = png_bytes(len(mask_rows[0]), len(mask_rows), rows, 3, ((b"PLTE", b"\0\0\0\xff\xff\xff"), (b"tRNS", b"\0")))
    return base64.b64encode(zlib.compress(png)).decode("utf-8")


def _label(class_title: str, geometry: dict, tags: list[dict] | None = None) -> dict:
    shape = CLASSES[class_title][0]
    return {
        "classTitle": class_title,
        "description": "",
        "tags": tags or [],
        **geometry,
        "geometryType": shape,
        "shape": shape,
        "nnCreated": False,
        "nnUpdated": False,
    }


def _inside_triangle(x: int, y: int, tri: list[list[int]]) -> bool:
    (ax, ay), (bx, by), (cx, cy) = tri
    d1 = (x - bx) * (ay - by) - (ax - bx) * (y - by)
    d2 = (x - cx) * (by - cy) - (bx - cx) * (y - cy)
    d3 = (x - ax) * (cy - ay) - (cx - ax) * (y - ay)
    return not ((d1 < 0 or d2 < 0 or d3 < 0) and (d1 > 0 or d2 > 0 or d3 > 0))


def _draw_item(rng: random.Random, width: int, height: int) -> tuple[bytes, dict]:
    """One picture (PNG bytes) and its annotation JSON."""
    pixels = [[tuple(rng.randint(90, 140) for _ in range(3)) for _ in range(width)] for _ in range(height)]
    objects = []

    # rectangle: points are [[left, top], [right, bottom]], inclusive pixel coordinates
    x0, y0 = rng.randint(1, width // 3), rng.randint(1, height // 3)
    x1, y1 = x0 + rng.randint(6, width // 4), y0 + rng.randint(6, height // 4)
    for y in range(y0, y1 + 1):
        for x in range(x0, x1 + 1):
            pixels[y][x] = CLASSES["square"][2]
    tags = [{"name": "difficult"}] if rng.random() < 0.5 else []
    objects.append(_label("square", {"points": {"exterior": [[x0, y0], [x1, y1]], "interior": []}}, tags))

    # polygon: exterior ring of [x, y] points
    cx, cy = rng.randint(width // 2, width - 12), rng.randint(4, height // 2)
    tri = [[cx, cy], [cx + 10, cy + 14], [cx - 10, cy + 14]]
    for y in range(cy, cy + 15):
        for x in range(cx - 10, cx + 11):
            if _inside_triangle(x, y, tri):
                pixels[y][x] = CLASSES["triangle"][2]
    objects.append(
        _label(
            "triangle",
            {"points": {"exterior": tri, "interior": []}},
            [{"name": "confidence", "value": round(rng.uniform(0.5, 1.0), 2)}],
        )
    )

    # bitmap: a disc; origin is [x, y] of the mask's top-left, the mask is cropped to its bbox
    r = rng.randint(4, 7)
    bx, by = rng.randint(r, width // 2), rng.randint(height // 2, height - r - 1)
    mask = [[(x - r) ** 2 + (y - r) ** 2 <= r * r for x in range(2 * r + 1)] for y in range(2 * r + 1)]
    for y, row in enumerate(mask):
        for x, on in enumerate(row):
            if on:
                pixels[by - r + y][bx - r + x] = CLASSES["blob"][2]
    objects.append(_label("blob", {"bitmap": {"data": bitmap_data(mask), "origin": [bx - r, by - r]}}))

    ann = {
        "description": "",
        "size": {"height": height, "width": width},
        "tags": [{"name": "weather", "value": rng.choice(WEATHER)}],
        "objects": objects,
        "customBigData": {},
    }
    png = png_bytes(width, height, [bytes(c for px in row for c in px) for row in pixels], 2)
    return png, ann


def write_sample_project(
    dest: str,
    name: str = "sample",
    datasets: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> dict:
    """Write project `name` under `dest` (dest/name/...) and return a summary of what was written.

    The summary has `path`, `name` and `items`: {"ds/item.png": {"labels": [classes...],
    "tags": [image tag names]}}, the shape `tests/sdk/sdk_check.py` reports for comparison.
    """
    datasets = datasets or {"ds0": 3, "ds1": 2}
    width, height = size
    root = os.path.join(dest, name)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(project_meta(), f, indent=4)
    rng = random.Random(seed)
    items = {}
    for ds, count in datasets.items():
        os.makedirs(os.path.join(root, ds, "img"), exist_ok=True)
        os.makedirs(os.path.join(root, ds, "ann"), exist_ok=True)
        for i in range(count):
            item = f"{ds}_{i:03d}.png"
            png, ann = _draw_item(rng, width, height)
            with open(os.path.join(root, ds, "img", item), "wb") as f:
                f.write(png)
            with open(os.path.join(root, ds, "ann", item + ".json"), "w") as f:
                json.dump(ann, f, indent=4)
            items[f"{ds}/{item}"] = {
                "labels": sorted(o["classTitle"] for o in ann["objects"]),
                "tags": [t["name"] for t in ann["tags"]],
            }
    return {"path": root, "name": name, "items": items}


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.sample_project", description=__doc__.splitlines()[0])
    ap.add_argument("dest", help="the project is written to DEST/NAME")
    ap.add_argument("--name", default="sample")
    ap.add_argument("--datasets", default="ds0=3,ds1=2", help="NAME=COUNT,... (default ds0=3,ds1=2)")
    ap.add_argument("--size", default="64x48", help="WIDTHxHEIGHT of every image")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    datasets = {k: int(v) for k, v in (p.split("=") for p in args.datasets.split(","))}
    w, h = (int(v) for v in args.size.split("x"))
    summary = write_sample_project(args.dest, args.name, datasets, (w, h), args.seed)
    print(f"wrote {len(summary['items'])} items to {summary['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
