"""Project rows: checking a posted Supervisely project, storing it, and reading it back.

A project is its row in `projects` (name, meta, dataset summary) and one `project_items` row
per image (blob + annotation), inserted in order so that the item id orders and pages them.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from sqlalchemy import insert, select

from protocol.errors import APIError
from protocol.sly_format import BadFormat, Budget, check_ann, check_meta, empty_ann, empty_meta
from server import db
from server.blobs import refs as blob_refs
from server.db import rows
from server.projects.images import image_size
from server.schemas import check_files, check_relpath

# Checks running at once per `who` (a node): a check is seconds of CPU in a worker thread, so one
# node posting many at once would take the thread pool and the cores from everyone else.
CHECKS_PER_WHO = 1
CHECK_RETRY_AFTER_S = 5
_running: dict[str, int] = {}
_running_lock = threading.Lock()

INSERT_BATCH = 500  # project items per INSERT statement
SAME_PAGE_ITEMS = 500  # stored items read per page when comparing a re-posted project
SAME_PAGE_OBJECTS = 20_000  # fewer items per page when their annotations hold this many objects


@contextmanager
def _check_slot(who: str | None):
    """A slot of `who`'s checks, or 429 `too_many_checks` at once (waiting would hold a thread too)."""
    if who is None:
        yield
        return
    with _running_lock:
        if _running.get(who, 0) >= CHECKS_PER_WHO:
            raise APIError(
                429,
                "too_many_checks",
                f"{who} has {CHECKS_PER_WHO} project check(s) running already; retry when it is done",
                retry_after=CHECK_RETRY_AFTER_S,
            )
        _running[who] = _running.get(who, 0) + 1
    try:
        yield
    finally:
        with _running_lock:
            if _running[who] <= 1:
                del _running[who]
            else:
                _running[who] -= 1


def prepare(blobs, meta, datasets: list, *, who: str | None = None) -> tuple[dict, list[dict]]:
    """Check a posted project; returns (meta, datasets with every item's annotation filled in).

    `datasets` is a list of DatasetIn. An item without `ann` gets the empty annotation with the
    size read from its image's header. A 400 names the dataset and the item at fault. `who` (e.g.
    "agent:7") may run CHECKS_PER_WHO checks at once; one more is a 429 `too_many_checks`.
    Blocking, CPU-bound: call it in a thread.
    """
    with _check_slot(who):
        try:
            return _prepare(blobs, meta, datasets)
        except BadFormat as e:
            raise APIError(400, e.code, str(e)) from None


def _prepare(blobs, meta, datasets: list) -> tuple[dict, list[dict]]:
    checked = check_meta(meta if meta is not None else empty_meta())
    meta = meta if meta is not None else empty_meta()
    names = set()
    for ds in datasets:
        check_relpath(ds.name, "dataset name", single=True)
        if ds.name in names:
            raise APIError(400, "duplicate_path", f"dataset {ds.name!r} appears twice")
        names.add(ds.name)
    budget = Budget()
    sizes: dict[str, tuple] = {}  # items may share a blob: read each header once
    out = []
    for ds in datasets:
        check_files(blobs, ds.items, "name", f"dataset {ds.name}, item")
        items = []
        for it in ds.items:
            if it.ann is None:
                if it.sha256 not in sizes:
                    sizes[it.sha256] = image_size(blobs.path(it.sha256))
                ann = empty_ann(*sizes[it.sha256])
            else:
                check_ann(it.ann, checked, f"dataset {ds.name}, item {it.name}", budget)
                ann = it.ann
            items.append({"name": it.name, "sha256": it.sha256, "size": it.size, "ann": ann})
        out.append({"name": ds.name, "items": items})
    return meta, out


def insert_project(conn, name: str, meta: dict, datasets: list[dict], now: float, task_id: int | None = None) -> int:
    """Store a prepared project; returns its id."""
    counts = [{"name": ds["name"], "items_count": len(ds["items"])} for ds in datasets]
    pid = conn.execute(
        insert(db.projects).values(name=name, meta=meta, datasets=counts, task_id=task_id, created_at=now)
    ).inserted_primary_key[0]
    # In batches: one INSERT of every item would hold all the annotations serialised at once.
    hashes = []
    batch: list[dict] = []
    for ds in datasets:
        for it in ds["items"]:
            batch.append({"project_id": pid, "dataset": ds["name"], **it})
            hashes.append(it["sha256"])
            if len(batch) >= INSERT_BATCH:
                conn.execute(insert(db.project_items), batch)
                batch = []
    if batch:
        conn.execute(insert(db.project_items), batch)
    blob_refs.add(conn, blob_refs.PROJECT, pid, hashes)
    return pid


def read_project(conn, pid: int, anns: bool) -> dict | None:
    """A project with its datasets and items inlined (each item with `ann` only when `anns`)."""
    row = conn.execute(select(db.projects).where(db.projects.c.id == pid)).mappings().first()
    if row is None:
        return None
    p = dict(row)
    c = db.project_items.c
    cols = [c.dataset, c.name, c.sha256, c.size] + ([c.ann] if anns else [])
    by_ds: dict[str, list] = {d["name"]: [] for d in p["datasets"]}
    for r in conn.execute(select(*cols).where(c.project_id == pid).order_by(c.id)).mappings():
        it = dict(r)
        by_ds.setdefault(it.pop("dataset"), []).append(it)
    p["datasets"] = [{"name": name, "items": items} for name, items in by_ds.items()]
    return p


def get_project(conn, pid: int) -> dict:
    """The project with its items inlined, annotations left out; 404 `project_not_found`."""
    p = read_project(conn, pid, anns=False)
    if p is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return p


def check_exists(conn, pid: int) -> None:
    """404 `project_not_found` unless project `pid` exists."""
    if conn.execute(select(db.projects.c.id).where(db.projects.c.id == pid)).first() is None:
        raise APIError(404, "project_not_found", f"no project {pid}")


def summary(p: dict) -> dict:
    """A listed project: its row without the meta (datasets summarised already: name, items_count)."""
    p.pop("meta", None)
    return p


def list_projects(conn, limit: int, before: int | None) -> list[dict]:
    """Up to limit + 1 projects, newest first, summarised."""
    return [summary(p) for p in rows.list_rows(conn, db.projects, limit, before)]


def items_page(conn, pid: int, dataset: str | None, after: int | None, limit: int) -> list[dict]:
    """Up to limit + 1 items of a project in order (the page helper needs the extra one), each with its ann."""
    c = db.project_items.c
    q = select(c.id, c.dataset, c.name, c.sha256, c.size, c.ann).where(c.project_id == pid)
    if dataset is not None:
        q = q.where(c.dataset == dataset)
    if after is not None:
        q = q.where(c.id > after)
    return [dict(r) for r in conn.execute(q.order_by(c.id).limit(limit + 1)).mappings()]


def same_project(conn, pid: int, meta: dict, datasets: list[dict]) -> bool:
    """Whether project `pid` holds exactly this meta and these items (a re-posted result).

    The stored items are read a page at a time in id order (their dataset and item order) and the
    reading stops at the first difference: the whole project read at once, annotations included,
    would hold a second copy of the posted one (hundreds of MB for a 60 MiB result)."""
    p = db.projects.c
    row = conn.execute(select(p.meta, p.datasets).where(p.id == pid)).mappings().first()
    if row is None or row["meta"] != meta or [d["name"] for d in row["datasets"]] != [ds["name"] for ds in datasets]:
        return False
    posted = [(ds["name"], it) for ds in datasets for it in ds["items"]]
    c = db.project_items.c
    start, after = 0, None
    while True:
        # As many rows as the next posted items up to SAME_PAGE_ITEMS, fewer when their objects (most
        # of an annotation's memory) pass SAME_PAGE_OBJECTS.
        end, weight = start, 0
        while end < len(posted) and end - start < SAME_PAGE_ITEMS and (end == start or weight < SAME_PAGE_OBJECTS):
            weight += _objects(posted[end][1])
            end += 1
        last = end == len(posted)
        q = select(c.id, c.dataset, c.name, c.sha256, c.size, c.ann).where(c.project_id == pid)
        if after is not None:
            q = q.where(c.id > after)
        # On the last page one row more: a stored project longer than the posted one shows it.
        got = conn.execute(q.order_by(c.id).limit(end - start + last)).mappings().all()
        if len(got) != end - start:
            return False
        for r, (ds_name, it) in zip(got, posted[start:end], strict=True):
            if (
                r["dataset"] != ds_name
                or {"name": r["name"], "sha256": r["sha256"], "size": r["size"], "ann": r["ann"]} != it
            ):
                return False
        if last:
            return True
        start, after = end, got[-1]["id"]


def _objects(item: dict) -> int:
    ann = item.get("ann")
    objects = ann.get("objects") if isinstance(ann, dict) else None
    return 1 + (len(objects) if isinstance(objects, list) else 0)
