"""The one way a folder becomes a project or a model on the server (the CLI and UserClient use it).

Project layout: a folder with `meta.json` at its top is a Supervisely project (protocol/sly_format.py:
`<dataset>/img/<item>` and `<dataset>/ann/<item>.json`), checked as the server checks it, then sent
with its meta and annotations. Any other folder is plain: each top-level sub-folder is a dataset and
its files (at any depth) are items; files directly in the folder go to dataset `ds0`, as the
console does. Model layout: every file keeps its path relative to the folder.

The way there, for 10^4-10^6 small files (protocol/bulk.py): every file is hashed (on a few
threads), the server is asked which of those sha256s it lacks (MAX_COUNT a time), and only those
cross the wire, each once: the small ones in bulk batches (a tar stream read from the files as it
is sent), a few batches at once, the big ones by their own PUT. Then the project is made with its
meta and empty datasets, and its items are added a page at a time, each annotation read from its
file as its page is built: no request, and no list in memory, holds every annotation.
Progress (client/transfer.py) goes through the stages hashing, sending and (projects) items.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from client import sly_format
from client.transfer import PARALLEL, Progress, Tally, run_all
from protocol import bulk
from protocol.sly_format import MAX_REQUEST_MASK_BYTES

CHUNK = 1 << 20
TOP_DATASET = "ds0"
HASH_THREADS = 8  # files are hashed on this many threads (reads of many small files wait on the disk)
HASH_GROUP = 64  # files per hashing job
BATCH_FILES = 2_000  # files per bulk upload
BATCH_BYTES = 64 * 1024 * 1024  # bytes per bulk upload
MIN_BATCH_FILES = 100  # fewer files per batch would cost more in requests than it gains in parallel
PAGE_ITEMS = 1_000  # items per page added to a project
PAGE_JSON_BYTES = 8 * 1024 * 1024  # annotation bytes per page (the server takes 64 MiB per request)
ITEM_JSON_BYTES = 256  # an item's JSON besides its annotation (name, sha256, size), at most about


class NotAFolder(ValueError):
    """The path to upload is not a folder, or holds no files."""


class UploadError(ValueError):
    """The server did not keep a file that was sent (its bytes changed while it was sent, or the
    server refused it, e.g. out of space)."""


def list_files(root: Path) -> list[Path]:
    """Every file under root (a symlink to a file counts as that file), sorted by path."""
    if not root.is_dir():
        raise NotAFolder(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise NotAFolder(f"{root} holds no files")
    return files


def sha256_file(path: str | os.PathLike, on_chunk: Callable[[int], None] | None = None) -> str:
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


def upload_one(client, path: Path) -> str:
    """Hash `path` and PUT it unless the server has that blob (HEAD); return its sha256."""
    sha = sha256_file(path)
    if not client.blob_exists(sha):
        with open(path, "rb") as f:
            client.put_blob(sha, _CountingReader(f, path.stat().st_size, lambda n: None))
    return sha


# --- files to blobs ---


def hash_files(paths: Sequence[str | os.PathLike], tally: Tally) -> tuple[list[str], list[int]]:
    """The sha256 and size (the bytes hashed) of each file, in order, hashed on a few threads."""
    tally.stage("hashing", len(paths), None)

    def job(start: int) -> list[tuple[str, int]]:
        out = []
        for p in paths[start : start + HASH_GROUP]:
            h, n, counted = hashlib.sha256(), 0, 0
            with open(p, "rb") as f:
                while b := f.read(CHUNK):
                    h.update(b)
                    n += len(b)
                    if n - counted >= CHUNK:  # a big file's bytes count as they go
                        tally.add(0, n - counted)
                        counted = n
            out.append((h.hexdigest(), n))
            tally.add(1, n - counted)
        return out

    shas: list[str] = []
    sizes: list[int] = []
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="sly-hash") as pool:
        try:
            for group in pool.map(job, range(0, len(paths), HASH_GROUP)):
                for sha, size in group:
                    shas.append(sha)
                    sizes.append(size)
        except BaseException:  # a file that cannot be read: the rest is not worth hashing
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return shas, sizes


def send_files(
    client,
    root: Path,
    paths: Sequence[str | os.PathLike],
    shas: list[str],
    sizes: list[int],
    tally: Tally,
    parallel: int = PARALLEL,
) -> None:
    """Send the server every blob of `paths` it lacks, each once: small ones in bulk batches, at
    most `parallel` requests at once; big ones (over bulk.SMALL_BLOB) by their own PUT. A file the
    server has already (or that repeats another's bytes) counts as done at once."""
    tally.stage("sending", len(paths), sum(sizes))
    missing = client.check_blobs(shas)
    first: dict[str, int] = {}  # sha256 -> the file that sends it
    have_files = have_bytes = 0
    for i, sha in enumerate(shas):
        if sha in missing and sha not in first:
            first[sha] = i
        else:
            have_files += 1
            have_bytes += sizes[i]
    tally.add(have_files, have_bytes, f"the server has {have_files:,} of {len(paths):,} files")
    small = [i for i in first.values() if sizes[i] <= bulk.SMALL_BLOB]
    big = [i for i in first.values() if sizes[i] > bulk.SMALL_BLOB]
    # Enough batches to keep `parallel` requests busy, none too small to be worth a request.
    per_batch = max(MIN_BATCH_FILES, min(BATCH_FILES, -(-len(small) // max(1, parallel))))
    jobs: list[Callable[[], object]] = [
        partial(_send_batch, client, root, [(shas[i], paths[i], sizes[i]) for i in batch], tally)
        for batch in _batches(small, sizes, per_batch)
    ]
    jobs += [partial(_send_big, client, shas[i], paths[i], sizes[i], tally) for i in big]
    run_all(jobs, parallel)


def _batches(indices: list[int], sizes: list[int], max_files: int) -> Iterator[list[int]]:
    batch: list[int] = []
    nbytes = 0
    for i in indices:
        if batch and (len(batch) >= max_files or nbytes + sizes[i] > BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(i)
        nbytes += sizes[i]
    if batch:
        yield batch


def _send_batch(client, root: Path, entries: list[tuple[str, str | os.PathLike, int]], tally: Tally) -> None:
    answers = client.upload_blobs([(sha, p) for sha, p, _ in entries], on_sent=lambda f, n: tally.add(f, n))
    if len(answers) != len(entries):
        raise UploadError(f"the server answered for {len(answers)} of the {len(entries)} files sent")
    for (sha, p, _), a in zip(entries, answers, strict=True):
        rel = _rel(root, p)
        if a.get("sha256") != sha:
            raise UploadError(f"{rel}: the server answered for blob {str(a.get('sha256'))[:64]!r}, not {sha}")
        if a.get("error") == "hash_mismatch":
            raise UploadError(f"{rel}: its bytes changed while it was being uploaded; upload again")
        if "error" in a:
            raise UploadError(f"{rel}: the server did not keep it: {a['error']}: {a.get('detail', '')}")


def _send_big(client, sha: str, path: str | os.PathLike, size: int, tally: Tally) -> None:
    with open(path, "rb") as f:
        client.put_blob(sha, _CountingReader(f, size, lambda n: tally.add(0, n)))
    tally.add(1, 0)


def _rel(root: Path, p: str | os.PathLike) -> str:
    try:
        return Path(p).relative_to(root).as_posix()
    except ValueError:
        return os.fspath(p)


# --- projects and models ---


def add_pages(
    client, project_id: int, datasets: Iterable[tuple[str, Iterable[tuple[dict, int, int]]]], tally: Tally
) -> None:
    """Add each dataset's items (item, its JSON bytes about, what its bitmaps cost to check) to the
    project a page at a time: at most PAGE_ITEMS items, PAGE_JSON_BYTES of JSON and what the server
    checks of bitmaps in one request (MAX_REQUEST_MASK_BYTES). The pages go one at a time, in
    order, from a thread of their own: the next page is read from disk while the server checks
    the last."""
    with ThreadPoolExecutor(1, thread_name_prefix="sly-pages") as poster:
        last: Future | None = None

        def send(dataset: str, page: list[dict]) -> None:
            nonlocal last
            if last is not None:
                last.result()
            last = poster.submit(_add_page, client, project_id, dataset, page, tally)

        for dataset, items in datasets:
            page: list[dict] = []
            nbytes = masks = 0
            for item, size, cost in items:
                if page and (
                    len(page) >= PAGE_ITEMS or nbytes + size > PAGE_JSON_BYTES or masks + cost > MAX_REQUEST_MASK_BYTES
                ):
                    send(dataset, page)
                    page, nbytes, masks = [], 0, 0
                page.append(item)
                nbytes += size
                masks += cost
            if page:
                send(dataset, page)
        if last is not None:
            last.result()


def _add_page(client, project_id: int, dataset: str, page: list[dict], tally: Tally) -> None:
    client.add_items(project_id, dataset, page)
    tally.add(len(page), 0)


def _sly_items(root: Path, ds: sly_format.Dataset, blobs: Iterator[tuple[str, int]]) -> Iterator[tuple[dict, int, int]]:
    """The items of a Supervisely dataset, each annotation read from its file as it is asked for."""
    for item in ds.items:
        sha, size = next(blobs)
        out: dict = {"name": item.name, "sha256": sha, "size": size}
        nbytes = ITEM_JSON_BYTES
        if item.ann_file is not None:
            data = (root / item.ann_file).read_bytes()
            out["ann"] = sly_format.parse_object(data, item.ann_file)
            nbytes += len(data)
        yield out, nbytes, item.mask_bytes


def upload_project(
    client,
    directory: Path,
    name: str | None = None,
    progress: Progress | None = None,
    parallel: int = PARALLEL,
) -> dict:
    """Upload a folder (Supervisely or plain) as a project; return the server's project
    ({id, name, meta, datasets: [{name, items_count}]})."""
    root = Path(directory).resolve()
    tally = Tally(progress)
    if root.is_dir() and sly_format.is_supervisely(root):
        meta, datasets = sly_format.read_folder(root)
        sly_format.check_folder(root, meta, datasets)
        paths = [os.path.join(root, ds.name, sly_format.IMG_DIR, i.name) for ds in datasets for i in ds.items]
        shas, sizes = hash_files(paths, tally)
        send_files(client, root, paths, shas, sizes, tally, parallel)
        project = client.create_project(name or root.name, [{"name": ds.name, "items": []} for ds in datasets], meta)
        tally.stage("items", len(paths), None)
        blobs = zip(shas, sizes, strict=True)
        add_pages(client, project["id"], ((ds.name, _sly_items(root, ds, blobs)) for ds in datasets), tally)
    else:
        files = list_files(root)
        shas, sizes = hash_files(files, tally)
        send_files(client, root, files, shas, sizes, tally, parallel)
        groups: dict[str, list[int]] = {}  # dataset -> its files, in the order first met
        for i, f in enumerate(files):
            top, _, below = f.relative_to(root).as_posix().partition("/")
            groups.setdefault(top if below else TOP_DATASET, []).append(i)
        project = client.create_project(name or root.name, [{"name": g, "items": []} for g in groups])
        tally.stage("items", len(files), None)
        plain = ((g, _plain_items(root, files, shas, sizes, members)) for g, members in groups.items())
        add_pages(client, project["id"], plain, tally)
    return client.get_project(project["id"])


def _plain_items(
    root: Path, files: list[Path], shas: list[str], sizes: list[int], members: list[int]
) -> Iterator[tuple[dict, int, int]]:
    """The items of a plain folder's dataset (no annotations: the server reads each image's size)."""
    for i in members:
        yield {"name": _item_name(root, files[i]), "sha256": shas[i], "size": sizes[i]}, ITEM_JSON_BYTES, 0


def _item_name(root: Path, f: Path) -> str:
    """A plain folder's file as an item name: its path below its dataset's folder (the top's files: theirs)."""
    ds, _, item = f.relative_to(root).as_posix().partition("/")
    return item or ds


def upload_model(
    client, directory: Path, name: str | None = None, progress: Progress | None = None, parallel: int = PARALLEL
) -> dict:
    """Upload a folder as a model; return the server's model."""
    root = Path(directory).resolve()
    files = list_files(root)
    tally = Tally(progress)
    shas, sizes = hash_files(files, tally)
    send_files(client, root, files, shas, sizes, tally, parallel)
    entries = [
        {"path": f.relative_to(root).as_posix(), "sha256": sha, "size": size}
        for f, sha, size in zip(files, shas, sizes, strict=True)
    ]
    return client.create_model(name or root.name, entries)
