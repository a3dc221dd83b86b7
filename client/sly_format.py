"""The Supervisely project folder, as the SDK reads and writes it (`supervisely/project/project.py`).

    meta.json                  the project meta: {"classes": [...], "tags": [...], ...}
    <dataset>/img/<item>       the image
    <dataset>/ann/<item>.json  its annotation: {"description", "size", "tags", "objects", ...}

Annotation files are named after the whole item name (`a.png.json`); the SDK still reads the old
form without the image extension (`a.json`), and so does `read_folder`. Items are the files
directly in `img/` with an image extension the SDK knows; other folders of a dataset (`img_info/`,
`meta/`, `seg/`, `blob/`) are not part of a project here. Nested datasets (`<ds>/datasets/<child>/`,
newer SDKs) are refused with an error rather than flattened.

JSON is written as the SDK's `dump_json_file` does (`json.dump(obj, f, indent=4)`), so a meta or
an annotation that the SDK wrote comes back byte-identical after an upload and a download.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

META_FILE = "meta.json"
IMG_DIR, ANN_DIR, NESTED_DIR = "img", "ann", "datasets"
ANN_EXT = ".json"
# supervisely/imaging/image.py SUPPORTED_IMG_EXTS: what the SDK lists as items of img/
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".mpo", ".bmp", ".png", ".webp", ".tiff", ".tif", ".nrrd", ".jfif"})
EMPTY_META = {"classes": [], "tags": []}


class BadProject(ValueError):
    """A project folder (or a project from the server) that cannot be read or written as asked."""


@dataclass
class Item:
    name: str
    path: Path
    ann: dict | None = None


@dataclass
class Dataset:
    name: str
    items: list[Item] = field(default_factory=list)


def is_supervisely(root: Path) -> bool:
    """A folder is a Supervisely project when meta.json sits at its top."""
    return (root / META_FILE).is_file()


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def dumps(obj) -> str:
    """JSON text exactly as the SDK writes meta.json and annotation files."""
    return json.dumps(obj, indent=4)


def load_object(path: Path, root: Path) -> dict:
    """A JSON object from a file, or BadProject naming the file (relative to the project)."""
    rel = path.relative_to(root).as_posix()
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadProject(f"{rel}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadProject(f"{rel}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise BadProject(f"{rel}: a JSON object was expected, not {type(data).__name__}")
    return data


def _ann_file(ann_dir: Path, item: str) -> Path | None:
    for name in (item + ANN_EXT, Path(item).stem + ANN_EXT):
        p = ann_dir / name
        if p.is_file():
            return p
    return None


def read_folder(root: Path) -> tuple[dict, list[Dataset]]:
    """The meta and datasets of a Supervisely project folder; items without an ann file get ann=None."""
    meta = load_object(root / META_FILE, root)
    datasets = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        img, ann = d / IMG_DIR, d / ANN_DIR
        if (d / NESTED_DIR).is_dir():
            raise BadProject(f"{d.name}/{NESTED_DIR}/: nested datasets are not supported; "
                             "give each dataset its own folder at the top of the project")
        if not img.is_dir() and not ann.is_dir():
            continue                                   # not a dataset (the SDK skips it too)
        ds = Dataset(d.name)
        files = sorted(p for p in img.iterdir() if p.is_file() and is_image_name(p.name)) if img.is_dir() else []
        used: dict[Path, str] = {}
        for f in files:
            af = _ann_file(ann, f.name) if ann.is_dir() else None
            if af is not None and af in used:
                raise BadProject(f"{af.relative_to(root).as_posix()}: matches two images, "
                                 f"{used[af]!r} and {f.name!r}; name it {f.name}{ANN_EXT}")
            if af is not None:
                used[af] = f.name
            ds.items.append(Item(f.name, f, load_object(af, root) if af is not None else None))
        datasets.append(ds)
    if not any(ds.items for ds in datasets):
        raise BadProject(f"{root}: a Supervisely project (it has {META_FILE}) with no images in any <dataset>/{IMG_DIR}/")
    return meta, datasets


def check_name(name, what: str) -> str:
    """A name that is one plain path component, so joining it to a folder stays inside that folder."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or ":" in name[:2]):
        raise BadProject(f"{what} {name!r} is not a plain file name (no '/', '\\', '..' or drive); refusing to write it")
    return name


def check_relpath(path, what: str) -> str:
    """A relative posix path whose every part passes check_name."""
    if not isinstance(path, str) or not path:
        raise BadProject(f"{what} {path!r} is empty")
    for part in path.split("/"):
        check_name(part, f"{what} {path!r}: part")
    return path


def empty_ann(height: int, width: int) -> dict:
    """What the SDK writes for an image without labels (`sly.Annotation((h, w)).to_json()`)."""
    return {"description": "", "size": {"height": height, "width": width}, "tags": [], "objects": [],
            "customBigData": {}}


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image's header."""
    from PIL import Image, UnidentifiedImageError        # only downloads of plain projects need it

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as e:
        raise BadProject(f"{path.name}: cannot read the image size for its empty annotation: {e}") from None
    return height, width
