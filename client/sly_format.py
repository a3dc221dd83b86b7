"""Reading a Supervisely project folder on the user's side; the format itself (layout names, JSON
dump, empty meta and annotation, image sizes, the checks) is protocol/sly_format.py.

Annotation files are named after the whole item name (`a.png.json`); the SDK still reads the old
form without the image extension (`a.json`), and so does `read_folder`. Items are the files
directly in `img/` with an image extension the SDK knows; other folders of a dataset (`img_info/`,
`meta/`, `seg/`, `blob/`) are not part of a project here. Nested datasets (`<ds>/datasets/<child>/`,
newer SDKs) are refused with an error rather than flattened.

`read_folder` lists the items and names their annotation files; the annotations are read one at a
time when they are checked (`check_folder`) and again when they are sent, so a project of 10^6
items is never held in memory whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from protocol.sly_format import (
    ANN_DIR,
    ANN_EXT,
    IMG_DIR,
    MAX_REQUEST_MASK_BYTES,
    META_FILE,
    NESTED_DIR,
    BadFormat,
    Budget,
    ann_name,
    check_ann,
    check_meta,
    is_image_name,
)


class BadProject(ValueError):
    """A project folder (or a project from the server) that cannot be read or written as asked."""


@dataclass(slots=True)
class Item:
    """An image of a dataset: its file is `<dataset>/img/<name>`; its annotation is read when needed
    (a project of 10^6 items is never held whole), and what its bitmaps cost to check is noted."""

    name: str
    ann_file: str | None = None  # its annotation file, relative to the project (posix)
    mask_bytes: int = 0  # bytes its bitmaps inflate to, as the server's check counts them


@dataclass
class Dataset:
    name: str
    items: list[Item] = field(default_factory=list)


def is_supervisely(root: Path) -> bool:
    """A folder is a Supervisely project when meta.json sits at its top."""
    return (root / META_FILE).is_file()


def load_object(path: Path, root: Path) -> dict:
    """A JSON object from a file, or BadProject naming the file (relative to the project)."""
    return parse_object(path.read_bytes(), path.relative_to(root).as_posix())


def parse_object(data: bytes, rel: str) -> dict:
    """A JSON object from a file's bytes, or BadProject naming the file `rel`."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadProject(f"{rel}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadProject(f"{rel}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(obj, dict):
        raise BadProject(f"{rel}: a JSON object was expected, not {type(obj).__name__}")
    return obj


def load_ann(root: Path, item: Item) -> dict | None:
    """The item's annotation from its file; None when it has none."""
    return None if item.ann_file is None else load_object(root / item.ann_file, root)


def _ann_file(ann_dir: Path, item: str) -> Path | None:
    for name in (ann_name(item), Path(item).stem + ANN_EXT):
        p = ann_dir / name
        if p.is_file():
            return p
    return None


def read_folder(root: Path) -> tuple[dict, list[Dataset]]:
    """The meta and datasets of a Supervisely project folder, each item with the name of its
    annotation file (None without one); the annotations are read by check_folder and load_ann."""
    meta = load_object(root / META_FILE, root)
    datasets = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        img, ann = d / IMG_DIR, d / ANN_DIR
        if (d / NESTED_DIR).is_dir():
            raise BadProject(
                f"{d.name}/{NESTED_DIR}/: nested datasets are not supported; "
                "give each dataset its own folder at the top of the project"
            )
        if not img.is_dir() and not ann.is_dir():
            continue  # not a dataset (the SDK skips it too)
        ds = Dataset(d.name)
        files = sorted(p.name for p in img.iterdir() if p.is_file() and is_image_name(p.name)) if img.is_dir() else []
        used: dict[Path, str] = {}
        for f in files:
            af = _ann_file(ann, f) if ann.is_dir() else None
            if af is not None and af in used:
                raise BadProject(
                    f"{af.relative_to(root).as_posix()}: matches two images, "
                    f"{used[af]!r} and {f!r}; name it {ann_name(f)}"
                )
            if af is not None:
                used[af] = f
            ds.items.append(Item(f, af.relative_to(root).as_posix() if af is not None else None))
        datasets.append(ds)
    if not any(ds.items for ds in datasets):
        raise BadProject(
            f"{root}: a Supervisely project (it has {META_FILE}) with no images in any <dataset>/{IMG_DIR}/"
        )
    return meta, datasets


def check_folder(root: Path, meta: dict, datasets: list[Dataset]) -> None:
    """The server's checks of the meta and of every annotation, run here so that a bad file is
    named by its path before anything is sent; BadProject names the first one. The annotations
    are read one at a time and let go; each item notes what its bitmaps cost (`mask_bytes`), so
    that a page of items sent together stays within what the server checks in one request."""
    try:
        checked = check_meta(meta, META_FILE)
        for ds in datasets:
            for item in ds.items:
                ann = load_ann(root, item)
                if ann is not None:
                    budget = Budget()
                    check_ann(ann, checked, str(item.ann_file), budget)
                    item.mask_bytes = MAX_REQUEST_MASK_BYTES - budget.mask_bytes
    except BadFormat as e:
        raise BadProject(str(e)) from None


def check_name(name, what: str) -> str:
    """A name that is one plain path component, so joining it to a folder stays inside that folder."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or ":" in name[:2]
    ):
        raise BadProject(
            f"{what} {name!r} is not a plain file name (no '/', '\\', '..' or drive); refusing to write it"
        )
    return name


def check_relpath(path, what: str) -> str:
    """A relative posix path whose every part passes check_name."""
    if not isinstance(path, str) or not path:
        raise BadProject(f"{what} {path!r} is empty")
    for part in path.split("/"):
        check_name(part, f"{what} {path!r}: part")
    return path
