"""A small Supervisely project written the way SDK 6.74.51 writes one (field order, `indent=4`,
`\\u` escapes, no trailing newline): classes rectangle/polygon/bitmap, image and object tags,
two datasets, one item without an annotation file."""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path

from PIL import Image

META = {
    "classes": [
        {"title": t, "description": "", "shape": shape, "color": color, "geometry_config": {}, "hotkey": ""}
        for t, shape, color in (
            ("car", "rectangle", "#FF0000"),
            ("road", "polygon", "#00FF00"),
            ("sky", "bitmap", "#0000FF"),
        )
    ],
    "tags": [
        {
            "name": "sunny",
            "value_type": "none",
            "color": "#0F6D8A",
            "hotkey": "",
            "applicable_type": "all",
            "classes": [],
            "target_type": "all",
        },
        {
            "name": "weather",
            "value_type": "oneof_string",
            "color": "#850F8A",
            "values": ["rain", "snow"],
            "hotkey": "",
            "applicable_type": "all",
            "classes": [],
            "target_type": "all",
        },
        {
            "name": "score",
            "value_type": "any_number",
            "color": "#8A0F22",
            "hotkey": "",
            "applicable_type": "all",
            "classes": [],
            "target_type": "all",
        },
    ],
    "projectSettings": {"multiView": {"enabled": False, "tagName": None, "tagId": None, "isSynced": False}},
}


def png(height: int, width: int, shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 2 * shade % 256, 40)).save(buf, format="PNG")
    return buf.getvalue()


def bitmap_data(height: int, width: int) -> str:
    """A filled mask encoded as the SDK's Bitmap.data_2_base64 does (palette PNG, zlib, base64)."""
    im = Image.new("P", (width, height), 1)
    im.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0, optimize=0)
    return base64.b64encode(zlib.compress(buf.getvalue())).decode()


def label(cls: str, shape: str, geometry: dict, tags: list | None = None) -> dict:
    return {
        "classTitle": cls,
        "description": "",
        "tags": tags or [],
        **geometry,
        "geometryType": shape,
        "shape": shape,
        "nnCreated": False,
        "nnUpdated": False,
    }


def ann(height: int, width: int, description: str = "") -> dict:
    return {
        "description": description,
        "size": {"height": height, "width": width},
        "tags": [{"name": "sunny"}, {"name": "weather", "value": "snow"}],
        "objects": [
            label(
                "car",
                "rectangle",
                {"points": {"exterior": [[2, 1], [12, 10]], "interior": []}},
                [{"name": "score", "value": 0.5}],
            ),
            label("road", "polygon", {"points": {"exterior": [[0, 0], [9, 5], [1, 10]], "interior": []}}),
            label("sky", "bitmap", {"bitmap": {"origin": [3, 2], "data": bitmap_data(3, 6)}}),
        ],
        "customBigData": {},
    }


def dump(obj) -> str:
    return json.dumps(obj, indent=4)


def write_sample(root: Path) -> dict[str, bytes]:
    """Write the project under root; return {relative path: bytes} of every file written."""
    files: dict[str, bytes] = {"meta.json": dump(META).encode()}
    for ds, items in (
        ("train", [("a.png", 20, 30, "caf\u00e9"), ("b.png", 21, 30, "")]),
        ("val", [("c.png", 16, 16, "x")]),
    ):
        for k, (name, h, w, desc) in enumerate(items):
            files[f"{ds}/img/{name}"] = png(h, w, k * 50)
            files[f"{ds}/ann/{name}.json"] = dump(ann(h, w, desc)).encode()
    files["val/img/bare.png"] = png(7, 9)  # no ann file: the server gives it an empty annotation
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files
