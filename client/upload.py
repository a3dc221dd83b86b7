"""The one way a folder becomes a project or a model on the server (the CLI and UserClient use it).

Project layout: a folder with `meta.json` at its top is a Supervisely project (protocol/sly_format.py:
`<dataset>/img/<item>` and `<dataset>/ann/<item>.json`), checked as the server checks it, then sent
with its meta and annotations. Any other folder is plain: each top-level sub-folder is a dataset and
its files (at any depth) are items; files directly in the folder go to dataset `ds0`, as the
console does. Model layout: every file keeps its path relative to the folder. Each file is hashed,
then sent with `PUT` only when the server does not have that sha256 yet (`HEAD`), so a blob
crosses the wire at most once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from client import sly_format

CHUNK = 1 << 20
TOP_DATASET = "ds0"

# progress(done, total, note): bytes of work done out of total (hashing and sending each count
# a file's size once), and what is happening now ("hashing a.png", "sending a.png", "have a.png").
Progress = Callable[[int, int, str], None]


class NotAFolder(ValueError):
    """The path to upload is not a folder, or holds no files."""


def list_files(root: Path) -> list[Path]:
    """Every file under root (a symlink to a file counts as that file), sorted by path."""
    if not root.is_dir():
        raise NotAFolder(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise NotAFolder(f"{root} holds no files")
    return files


def sha256_file(path: Path, on_chunk: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
            if on_chunk:
                on_chunk(len(b))
    return h.hexdigest()


class _CountingReader:
    """A file wrapper whose reads report progress; its __len__ lets requests send a Content-Length."""

    def __init__(self, f, size: int, on_chunk: Callable[[int], None]):
        self.f, self.size, self.on_chunk = f, size, on_chunk

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.on_chunk(len(b))
        return b


def upload_one(client, path: Path, on_chunk: Callable[[int, str], None] | None = None, note: str = "") -> str:
    """Hash `path` and PUT it unless the server has that blob; return its sha256.

    on_chunk(n, what) is called for every n bytes hashed and sent (a skipped file counts its size
    once as "have"), so hashing plus sending moves 2 * size in all.
    """
    tick = on_chunk or (lambda n, what: None)
    note = note or path.name
    size = path.stat().st_size
    sha = sha256_file(path, lambda n: tick(n, f"hashing {note}"))
    if client.blob_exists(sha):
        tick(size, f"have {note}")
    else:
        with open(path, "rb") as f:
            client.put_blob(sha, _CountingReader(f, size, lambda n: tick(n, f"sending {note}")))
    return sha


def upload_files(client, root: Path, files: list[Path], progress: Progress | None = None) -> list[dict]:
    """Upload files under root; return [{path, sha256, size}] with paths relative to root (posix)."""
    sizes = {f: f.stat().st_size for f in files}
    total = 2 * sum(sizes.values())
    done = 0

    def tick(n: int, what: str) -> None:
        nonlocal done
        done = min(total, done + n)
        if progress:
            progress(done, total, what)

    out = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        sha = upload_one(client, f, tick, rel)
        out.append({"path": rel, "sha256": sha, "size": sizes[f]})
    if progress:
        progress(total, total, f"{len(files)} files")
    return out


def project_datasets(entries: list[dict]) -> list[dict]:
    """Group uploaded entries into datasets: the first path part is the dataset, top-level files go to ds0."""
    datasets: dict[str, list[dict]] = {}
    for e in entries:
        ds, _, item = e["path"].partition("/")
        if not item:
            ds, item = TOP_DATASET, ds
        datasets.setdefault(ds, []).append({"name": item, "sha256": e["sha256"], "size": e["size"]})
    return [{"name": n, "items": items} for n, items in datasets.items()]


def supervisely_datasets(client, root: Path, progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Upload a Supervisely project folder's images; return its meta and the datasets to create."""
    meta, datasets = sly_format.read_folder(root)
    sly_format.check_folder(meta, datasets)
    entries = iter(upload_files(client, root, [i.path for ds in datasets for i in ds.items], progress))
    out = []
    for ds in datasets:
        items = []
        for item in ds.items:
            e = next(entries)
            items.append({"name": item.name, "sha256": e["sha256"], "size": e["size"]})
            if item.ann is not None:
                items[-1]["ann"] = item.ann
        out.append({"name": ds.name, "items": items})
    return meta, out


def upload_project(client, directory: Path, name: str | None = None, progress: Progress | None = None) -> dict:
    """Upload a folder (Supervisely or plain) as a project; return the server's project."""
    root = Path(directory).resolve()
    if root.is_dir() and sly_format.is_supervisely(root):
        meta, datasets = supervisely_datasets(client, root, progress)
        return client.create_project(name or root.name, datasets, meta=meta)
    entries = upload_files(client, root, list_files(root), progress)
    return client.create_project(name or root.name, project_datasets(entries))


def upload_model(client, directory: Path, name: str | None = None, progress: Progress | None = None) -> dict:
    """Upload a folder as a model; return the server's model."""
    root = Path(directory).resolve()
    return client.create_model(name or root.name, upload_files(client, root, list_files(root), progress))
