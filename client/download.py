"""The one way a project or a model on the server becomes a folder (the CLI and UserClient use it).

A project is written as a Supervisely project folder that `sly.Project(DIR, sly.OpenMode.READ)`
opens (protocol/sly_format.py); a model as its files at the folder's root, subfolders kept. Every
blob is hashed while it streams into `<file>.part` and renamed into place only when its sha256
matches. Names from the server are checked before anything is written, so nothing lands outside
DIR, and a non-empty DIR is refused unless the caller forces it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from client.sly_format import BadProject, check_name, check_relpath
from protocol import endpoints as ep
from protocol import sly_format
from protocol.errors import APIError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
BLOB_TIMEOUT = 600.0  # a blob may be gigabytes; a client's own timeout is for small JSON answers
# progress(done, total, note): bytes written out of the total size, and what is being fetched.
Progress = Callable[[int, int, str], None]


class DownloadError(ValueError):
    """The target folder cannot be used, or a blob did not arrive as the server described it."""


def prepare_dir(directory: Path, force: bool) -> Path:
    """The resolved target folder, created if missing; DownloadError if it holds anything and not force."""
    root = Path(directory).resolve()
    if root.exists() and not root.is_dir():
        raise DownloadError(f"{root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise DownloadError(f"{root} is not empty (give --force to write into it)")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _inside(root: Path, path: Path) -> Path:
    """path, after checking that its folder (symlinks followed) is inside root."""
    parent = Path(os.path.realpath(path.parent))
    if parent != root and root not in parent.parents:
        raise DownloadError(f"{path} would be written outside {root} (a symlinked folder?); refusing")
    return path


def fetch_blob(client, sha256: str, dest: Path, on_chunk: Callable[[int], None] | None = None) -> Path:
    """Stream blob sha256 into dest, verified; dest is replaced only by bytes that match the hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    r = client.request(
        "GET", ep.path(ep.USER_BLOB, sha256=sha256), stream=True, timeout=max(client.timeout, BLOB_TIMEOUT)
    )
    try:
        # O_NOFOLLOW: a planted symlink at the .part name cannot redirect the write
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with r, os.fdopen(fd, "wb") as f:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                h.update(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
        if h.hexdigest() != sha256:
            raise DownloadError(f"{dest.name}: the server sent bytes with sha256 {h.hexdigest()}, not {sha256}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


class _Ticker:
    """Adds up bytes for a Progress callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress, self.note = 0, total, progress, ""

    def __call__(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self.progress:
            self.progress(self.done, self.total, self.note)

    def finish(self, note: str) -> None:
        if self.progress:
            self.progress(self.total, self.total, note)


def project_items(client, project: dict) -> list[dict]:
    """Every dataset of the project with all its items ({name, sha256, size, ann?}).

    The items come inline in `GET /projects/{id}` when they carry their annotations; otherwise they
    are paged from `GET /projects/{id}/items?dataset=`. A server without that endpoint (404) has no
    annotations to give, and its inline items are used as they are.
    """
    path = ep.path(ep.PROJECT, project_id=project["id"]) + "/items"
    out = []
    for ds in project.get("datasets") or []:
        inline = ds.get("items")
        if inline is not None and all("ann" in i for i in inline):
            items = inline
        else:
            try:
                items = client._list(path, {"dataset": ds["name"]})
            except APIError as e:
                if e.status != 404 or inline is None:
                    raise
                items = inline
        out.append({"name": ds["name"], "items": items})
    return out


def check_project_names(datasets: list[dict]) -> None:
    """Every dataset and item name is one plain path component, and no two collide."""
    seen = set()
    for ds in datasets:
        name = check_name(ds["name"], "dataset name")
        if name == sly_format.META_FILE:
            raise BadProject(f"dataset name {name!r} is the project's meta file; refusing to write it")
        if name in seen:
            raise BadProject(f"dataset {name!r} appears twice")
        seen.add(name)
        items = set()
        for item in ds["items"]:
            iname = check_name(item.get("name"), f"item name in dataset {name!r}:")
            if iname in items:
                raise BadProject(f"item {iname!r} appears twice in dataset {name!r}")
            items.add(iname)


def download_project(
    client, project_id: int, directory: Path, force: bool = False, progress: Progress | None = None
) -> dict:
    """Write project `project_id` into `directory` as a Supervisely project; return the project (+ "dir")."""
    project = client.get_project(project_id)
    datasets = project_items(client, project)
    check_project_names(datasets)
    root = prepare_dir(directory, force)
    tick = _Ticker(sum(int(i.get("size") or 0) for ds in datasets for i in ds["items"]), progress)
    _inside(root, root / sly_format.META_FILE)
    (root / sly_format.META_FILE).write_text(sly_format.dumps(project.get("meta") or sly_format.empty_meta()))
    count = 0
    warnings: list[str] = []
    for ds in datasets:
        img_dir = root / ds["name"] / sly_format.IMG_DIR
        ann_dir = root / ds["name"] / sly_format.ANN_DIR
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for item in ds["items"]:
            tick.note = f"{ds['name']}/{item['name']}"
            img = fetch_blob(client, item["sha256"], _inside(root, img_dir / item["name"]), tick)
            if not sly_format.is_image_name(item["name"]):
                continue  # the SDK lists only images as items; a plain file needs no annotation
            ann = item.get("ann")
            size = (ann or {}).get("size") or {}
            if ann is None or size.get("height") is None or size.get("width") is None:
                # the server's empty annotation of a plain item whose size it could not read: read it here
                hw = sly_format.read_image_size(img)
                if hw is None:
                    # Not an image after all (a task may name any file .png): its bytes are kept, and
                    # its annotation says the size is unknown, which the SDK accepts.
                    why = (
                        f"{ds['name']}/{item['name']}: its header gives no image size; "
                        "kept as it is, with an annotation without a size"
                    )
                    log.warning("%s", why)
                    warnings.append(why)
                    hw = (None, None)
                ann = sly_format.empty_ann(*hw) if ann is None else dict(ann, size=sly_format.empty_ann(*hw)["size"])
            ann_path = _inside(root, ann_dir / sly_format.ann_name(item["name"]))
            ann_path.write_text(sly_format.dumps(ann))
            count += 1
    tick.finish(f"{count} items")
    return {**project, "datasets": datasets, "dir": str(root), **({"warnings": warnings} if warnings else {})}


def download_model(
    client, model_id: int, directory: Path, force: bool = False, progress: Progress | None = None
) -> dict:
    """Write model `model_id`'s files into `directory` (paths kept); return the model (+ "dir")."""
    model = client.get_model(model_id)
    files = model.get("files") or []
    for f in files:
        check_relpath(f.get("path"), "model file")
    root = prepare_dir(directory, force)
    tick = _Ticker(sum(int(f.get("size") or 0) for f in files), progress)
    for f in files:
        tick.note = f["path"]
        dest = root.joinpath(*f["path"].split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch_blob(client, f["sha256"], _inside(root, dest), tick)
    tick.finish(f"{len(files)} files")
    return {**model, "dir": str(root)}
