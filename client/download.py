"""The one way a project or a model on the server becomes a folder (the CLI and UserClient use it).

A project is written as a Supervisely project folder that `sly.Project(DIR, sly.OpenMode.READ)`
opens (protocol/sly_format.py); a model as its files at the folder's root, subfolders kept.

A project is read a page of items at a time (`GET /projects/{id}/items?dataset=`), never whole:
while one page's blobs arrive, the next page is listed. Its small blobs come in bulk downloads
(protocol/bulk.py), a few at once, big ones by their own GET; a blob that several items share
crosses the wire once and is copied for the others. Every blob is hashed while it streams into
`<file>.part` and renamed into place only when its sha256 matches, so a wrong or cut-short
answer leaves no file behind. Names from the server are checked before anything of theirs is
written (dataset names before anything at all, item names a page at a time, a name repeated on
a later page included), so nothing lands outside DIR, and a non-empty DIR is refused unless the
caller forces it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import NamedTuple

from client.sly_format import BadProject, check_name, check_relpath
from client.transfer import PARALLEL, Progress, Tally
from protocol import bulk, sly_format
from protocol import endpoints as ep

log = logging.getLogger(__name__)
CHUNK = 1 << 20
BLOB_TIMEOUT = 600.0  # a blob may be gigabytes; a client's own timeout is for small JSON answers
PAGE_ITEMS = 5_000  # items per page listed (the server's most)
BATCH_FILES = 2_000  # blobs per bulk download
BATCH_BYTES = 64 * 1024 * 1024  # bytes per bulk download
MIN_BATCH_FILES = 100  # fewer blobs per batch would cost more in requests than it gains in parallel


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


def write_verified(dest: Path, sha256: str, chunks: Iterable[bytes], on_chunk=None) -> Path:
    """Stream chunks into `<dest>.part`, hashing them; dest is replaced only by bytes that match sha256.
    Whatever goes wrong (a wrong hash, chunks that raise), no .part file is left."""
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        # O_NOFOLLOW: a planted symlink at the .part name cannot redirect the write
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
        if h.hexdigest() != sha256:
            raise DownloadError(f"{dest.name}: the server sent bytes with sha256 {h.hexdigest()}, not {sha256}")
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def fetch_blob(client, sha256: str, dest: Path, on_chunk=None) -> Path:
    """Stream blob sha256 (one GET) into dest, verified; dest is replaced only by bytes that match the hash."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    r = client.request(
        "GET", ep.path(ep.USER_BLOB, sha256=sha256), stream=True, timeout=max(client.timeout, BLOB_TIMEOUT)
    )
    with r:
        return write_verified(dest, sha256, r.iter_content(CHUNK), on_chunk)


class File(NamedTuple):
    """A file to write: the blob it holds, its size as the server lists it, where it goes, and the
    project item it is the image of (None for a model's file)."""

    sha256: str
    size: int
    dest: Path
    item: dict | None = None


class Pending(NamedTuple):
    """Files on their way: the batches fetching some, and the others, copies of a blob fetched once."""

    futures: list[Future]
    copies: list[File]


class Receiver:
    """Fetches blobs into files for one download on a pool of threads: each blob once (a later
    file with the same bytes is a copy of the first), small ones in bulk batches, big ones (over
    bulk.SMALL_BLOB) by their own GET. on_written(file) runs, on the same thread, after each file
    is in place (a project's annotation is written there). The first failure stops the batches
    at their next blob."""

    def __init__(
        self,
        client,
        pool: ThreadPoolExecutor,
        parallel: int,
        tally: Tally,
        on_written: Callable[[File], None] | None = None,
    ):
        self.client, self.pool, self.parallel, self.tally = client, pool, parallel, tally
        self.on_written = on_written
        self.first: dict[str, Path] = {}  # sha256 -> the file it is (being) fetched into
        self.stop = threading.Event()

    def submit(self, files: list[File]) -> Pending:
        """Start fetching `files` (their folders exist); finish() waits for them."""
        fetch: list[File] = []
        copies: list[File] = []
        for f in files:
            if f.sha256 in self.first:
                copies.append(f)
            else:
                self.first[f.sha256] = f.dest
                fetch.append(f)
        small = [f for f in fetch if f.size <= bulk.SMALL_BLOB]
        per_batch = max(MIN_BATCH_FILES, min(BATCH_FILES, -(-len(small) // max(1, self.parallel))))
        futures = [self.pool.submit(self._batch, b) for b in _batches(small, per_batch)]
        futures += [self.pool.submit(self._big, f) for f in fetch if f.size > bulk.SMALL_BLOB]
        return Pending(futures, copies)

    def finish(self, pending: Pending) -> None:
        """Wait for the files of `pending`, then write its copies (from files already verified)."""
        try:
            for fut in pending.futures:
                fut.result()
        except BaseException:
            self.stop.set()
            raise
        for f in pending.copies:
            with open(self.first[f.sha256], "rb") as src:
                write_verified(f.dest, f.sha256, iter(partial(src.read, CHUNK), b""), self._bytes)
            self._written(f)

    def _bytes(self, n: int) -> None:
        self.tally.add(0, n)

    def _written(self, f: File) -> None:
        if self.on_written:
            self.on_written(f)
        self.tally.add(1, 0, f.dest.name)

    def _batch(self, files: list[File]) -> None:
        want = {f.sha256: f for f in files}
        got: set[str] = set()
        try:
            with closing(self.client.download_blobs(list(want))) as entries:
                for sha, _, chunks in entries:
                    if self.stop.is_set():
                        return
                    f = want.get(sha)
                    if f is None or sha in got:
                        raise DownloadError(f"the server sent blob {sha}, which was not asked for (or twice)")
                    write_verified(f.dest, sha, chunks, self._bytes)
                    got.add(sha)
                    self._written(f)
        except bulk.BadBatch as e:
            raise DownloadError(f"a bulk download broke off: {e}") from None
        lacking = [f for sha, f in want.items() if sha not in got]
        if lacking:
            raise DownloadError(
                f"the server did not send {len(lacking)} of the blobs asked for, "
                f"e.g. {lacking[0].sha256} for {lacking[0].dest.name}"
            )

    def _big(self, f: File) -> None:
        if not self.stop.is_set():
            fetch_blob(self.client, f.sha256, f.dest, self._bytes)
            self._written(f)


def _batches(files: list[File], max_files: int) -> Iterator[list[File]]:
    batch: list[File] = []
    nbytes = 0
    for f in files:
        if batch and (len(batch) >= max_files or nbytes + f.size > BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(f)
        nbytes += f.size
    if batch:
        yield batch


def check_dataset_names(datasets: list[dict]) -> None:
    """Every dataset name is one plain path component, not the meta file's, and none repeats."""
    seen = set()
    for ds in datasets:
        name = check_name(ds.get("name"), "dataset name")
        if name == sly_format.META_FILE:
            raise BadProject(f"dataset name {name!r} is the project's meta file; refusing to write it")
        if name in seen:
            raise BadProject(f"dataset {name!r} appears twice")
        seen.add(name)


def check_item_names(dataset: str, items: list[dict], seen: set[str]) -> None:
    """Every item name of a page is one plain path component, new to its dataset; `seen` holds the
    names of the dataset's earlier pages and gets this page's."""
    for item in items:
        name = check_name(item.get("name"), f"item name in dataset {dataset!r}:")
        if name in seen:
            raise BadProject(f"item {name!r} appears twice in dataset {dataset!r}")
        seen.add(name)


def checked_pages(client, project_id: int, datasets: list[dict]) -> Iterator[tuple[str, list[dict]]]:
    """(dataset, items) of the project ({name, sha256, size, ann}), a page at a time, each page's
    names checked (check_item_names) before it is given out."""
    for ds in datasets:
        seen: set[str] = set()
        cursor = None
        while True:
            items, cursor = client.project_items_page(project_id, ds["name"], cursor, PAGE_ITEMS)
            check_item_names(ds["name"], items, seen)
            if items:
                yield ds["name"], items
            if not cursor:
                break


def download_project(
    client,
    project_id: int,
    directory: Path,
    force: bool = False,
    progress: Progress | None = None,
    parallel: int = PARALLEL,
) -> dict:
    """Write project `project_id` into `directory` as a Supervisely project; return the project
    (+ "dir", and "warnings" where an item's header gave no image size)."""
    project = client.get_project(project_id)
    datasets = project.get("datasets") or []
    check_dataset_names(datasets)
    pages = checked_pages(client, project_id, datasets)
    first = next(pages, None)  # a bad name on the first page: refused before anything is written
    root = prepare_dir(directory, force)
    for ds in datasets:
        for d in (sly_format.IMG_DIR, sly_format.ANN_DIR):
            (root / ds["name"] / d).mkdir(parents=True, exist_ok=True)
            _inside(root, root / ds["name"] / d / "x")  # an item name is one plain component: its folder is this one
    _inside(root, root / sly_format.META_FILE)
    (root / sly_format.META_FILE).write_text(sly_format.dumps(project.get("meta") or sly_format.empty_meta()))
    tally = Tally(progress)
    tally.stage("receiving", sum(int(ds.get("items_count") or 0) for ds in datasets), None)
    warnings: list[str] = []
    listed = nbytes = 0
    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="sly-download") as pool:
        receiver = Receiver(client, pool, parallel, tally, partial(write_ann, warnings=warnings))
        prev: Pending | None = None
        try:
            # each page is listed (and its names checked) while the one before it arrives
            for name, items in itertools.chain([first] if first else [], pages):
                img_dir = root / name / sly_format.IMG_DIR
                files = [File(i["sha256"], int(i.get("size") or 0), img_dir / i["name"], i) for i in items]
                listed += len(files)
                nbytes += sum(f.size for f in files)
                pending = receiver.submit(files)
                if prev is not None:
                    receiver.finish(prev)
                prev = pending
            if prev is not None:
                receiver.finish(prev)
        except BadProject:
            if prev is not None:  # the pages before a refused one are written whole
                receiver.finish(prev)
            raise
        except BaseException:
            receiver.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    tally.totals(files_total=listed, bytes_total=nbytes)
    return {**project, "dir": str(root), **({"warnings": warnings} if warnings else {})}


def write_ann(f: File, warnings: list[str]) -> None:
    """Write the annotation of a project item whose image `f` is in place (`<ds>/img/<name>`) as
    `<ds>/ann/<name>.json`; an annotation without the image's size gets it from the header."""
    item = f.item or {}
    name = item.get("name") or f.dest.name
    if not sly_format.is_image_name(name):
        return  # the SDK lists only images as items; a plain file needs no annotation
    ds_dir = f.dest.parent.parent
    ann = item.get("ann")
    size = (ann or {}).get("size") or {}
    if ann is None or size.get("height") is None or size.get("width") is None:
        # the server's empty annotation of a plain item whose size it could not read: read it here
        hw: tuple[int | None, int | None] | None = sly_format.read_image_size(f.dest)
        if hw is None:
            # Not an image after all (a task may name any file .png): its bytes are kept, and
            # its annotation says the size is unknown, which the SDK accepts.
            why = (
                f"{ds_dir.name}/{name}: its header gives no image size; "
                "kept as it is, with an annotation without a size"
            )
            log.warning("%s", why)
            warnings.append(why)
            hw = (None, None)
        ann = sly_format.empty_ann(*hw) if ann is None else dict(ann, size=sly_format.empty_ann(*hw)["size"])
    (ds_dir / sly_format.ANN_DIR / sly_format.ann_name(name)).write_text(sly_format.dumps(ann))


def download_model(
    client,
    model_id: int,
    directory: Path,
    force: bool = False,
    progress: Progress | None = None,
    parallel: int = PARALLEL,
) -> dict:
    """Write model `model_id`'s files into `directory` (paths kept); return the model (+ "dir")."""
    model = client.get_model(model_id)
    entries = model.get("files") or []
    for e in entries:
        check_relpath(e.get("path"), "model file")
    root = prepare_dir(directory, force)
    files = []
    for e in entries:
        dest = root.joinpath(*e["path"].split("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        files.append(File(e["sha256"], int(e.get("size") or 0), _inside(root, dest)))
    receive_all(client, files, parallel, Tally(progress))
    return {**model, "dir": str(root)}


def receive_all(client, files: list[File], parallel: int, tally: Tally) -> None:
    """Fetch `files` (each checked against its sha256 as it is written) on `parallel` threads; on
    any failure the others stop and the error is raised."""
    tally.stage("receiving", len(files), sum(f.size for f in files))
    with ThreadPoolExecutor(max(1, parallel), thread_name_prefix="sly-download") as pool:
        receiver = Receiver(client, pool, parallel, tally)
        try:
            receiver.finish(receiver.submit(files))
        except BaseException:
            receiver.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
