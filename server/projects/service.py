"""Project rows: checking a posted Supervisely project, storing it, adding pages of items to it,
and reading it back a page at a time.

A project is its row in `projects` (name, meta, dataset summary `[{name, items_count}]`) and one
`project_items` row per image (blob + annotation), inserted in order so that the item id orders
and pages them: within a dataset, the order the items were posted in (a project filled by pages
may interleave its datasets' rows).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from sqlalchemy import insert, select, update

from protocol.errors import APIError
from protocol.sly_format import BadFormat, Budget, Meta, check_ann, check_meta, empty_ann, empty_meta
from server import db
from server.blobs import refs as blob_refs
from server.db import rows
from server.http.fields import check_files, check_relpath
from server.projects.images import image_size

# Checks running at once per `who` (a node): a check is seconds of CPU in a worker thread, so one
# node posting many at once would take the thread pool and the cores from everyone else.
CHECKS_PER_WHO = 1
CHECK_RETRY_AFTER_S = 5
_running: dict[str, int] = {}
_running_lock = threading.Lock()

INSERT_BATCH = 500  # project items per INSERT statement
NAME_BATCH = 500  # item names per query of an append's duplicate check (SQLite binds a bounded number)
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


def prepare_page(blobs, meta: dict, dataset: str, items: list) -> list[dict]:
    """Check one page of items (ItemRefs) for `dataset` against a stored project's `meta`; returns
    them with every annotation filled in. The checks of `prepare`; blocking: call it in a thread."""
    check_relpath(dataset, "dataset name", single=True)
    try:
        return _prepare_items(blobs, check_meta(meta), dataset, items, Budget(), {})
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
    out = [
        {"name": ds.name, "items": _prepare_items(blobs, checked, ds.name, ds.items, budget, sizes)} for ds in datasets
    ]
    return meta, out


def _prepare_items(blobs, checked: Meta, dataset: str, refs: list, budget: Budget, sizes: dict) -> list[dict]:
    """The items of one dataset checked (names, blobs, annotations against the checked meta), each
    as a stored row's fields; an absent `ann` becomes the empty one sized from the image's header."""
    check_files(blobs, refs, "name", f"dataset {dataset}, item")
    items = []
    for it in refs:
        if it.ann is None:
            if it.sha256 not in sizes:
                sizes[it.sha256] = image_size(blobs.path(it.sha256))
            ann = empty_ann(*sizes[it.sha256])
        else:
            check_ann(it.ann, checked, f"dataset {dataset}, item {it.name}", budget)
            ann = it.ann
        items.append({"name": it.name, "sha256": it.sha256, "size": it.size, "ann": ann})
    return items


def insert_project(conn, name: str, meta: dict, datasets: list[dict], now: float, task_id: int | None = None) -> int:
    """Store a prepared project; returns its id."""
    pid = conn.execute(
        insert(db.projects).values(name=name, meta=meta, datasets=[], task_id=task_id, created_at=now)
    ).inserted_primary_key[0]
    counts = [
        {"name": ds["name"], "items_count": len(ds["items"]), "id": insert_dataset(conn, pid, ds["name"], now)}
        for ds in datasets
    ]
    conn.execute(update(db.projects).where(db.projects.c.id == pid).values(datasets=counts))
    _insert_items(conn, pid, ((ds["name"], it) for ds in datasets for it in ds["items"]))
    return pid


def insert_dataset(conn, pid: int, name: str, now: float) -> int:
    """A new dataset row of project `pid` (the public API names datasets by id); its id."""
    return conn.execute(insert(db.datasets).values(project_id=pid, name=name, created_at=now)).inserted_primary_key[0]


def _insert_items(conn, pid: int, items) -> None:
    """Insert (dataset, item) pairs in order as project `pid`'s rows and reference their blobs."""
    # In batches: one INSERT of every item would hold all the annotations serialised at once.
    hashes = []
    batch: list[dict] = []
    for dataset, it in items:
        batch.append({"project_id": pid, "dataset": dataset, **it})
        hashes.append(it["sha256"])
        if len(batch) >= INSERT_BATCH:
            conn.execute(insert(db.project_items), batch)
            batch = []
    if batch:
        conn.execute(insert(db.project_items), batch)
    blob_refs.add(conn, blob_refs.PROJECT, pid, hashes)


def get_project(conn, pid: int) -> dict:
    """The project's row: meta and datasets as `[{name, items_count}]` (items: `items_page`); 404
    `project_not_found`. Never the items: a project may hold a million of them."""
    row = conn.execute(select(db.projects).where(db.projects.c.id == pid)).mappings().first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return dict(row)


def project_meta(conn, pid: int) -> dict:
    """The stored meta of project `pid` (a page of items is checked against it); 404 `project_not_found`."""
    meta = conn.execute(select(db.projects.c.meta).where(db.projects.c.id == pid)).first()
    if meta is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return meta[0]


def append_items(conn, pid: int, dataset: str, items: list[dict], checked_meta: dict | None = None) -> dict:
    """Add a prepared page of items to `dataset` of project `pid` (a new dataset goes after the
    others), in the caller's transaction; returns {dataset, added, items_count}.

    The project row is locked first, so appends to one project run one after the other: each sees
    the names and counts the one before committed. An item name the dataset holds already is a 400
    `duplicate_path` and nothing of the page is stored (the caller's transaction rolls back)."""
    datasets = lock_project(conn, pid)
    if checked_meta is not None and project_meta(conn, pid) != checked_meta:
        raise APIError(
            409, "meta_changed", f"project {pid}'s meta changed while the page was checked; send the page again"
        )
    c = db.project_items.c
    names = [it["name"] for it in items]
    for i in range(0, len(names), NAME_BATCH):
        q = select(c.name).where(c.project_id == pid, c.dataset == dataset, c.name.in_(names[i : i + NAME_BATCH]))
        taken = conn.execute(q.limit(1)).first()
        if taken is not None:
            raise APIError(400, "duplicate_path", f"dataset {dataset}, item {taken[0]!r} is in the project already")
    _insert_items(conn, pid, ((dataset, it) for it in items))
    counts = [dict(d) for d in datasets]
    entry = next((d for d in counts if d["name"] == dataset), None)
    if entry is None:
        entry = {"name": dataset, "items_count": 0, "id": insert_dataset(conn, pid, dataset, time.time())}
        counts.append(entry)
    entry["items_count"] += len(items)
    conn.execute(update(db.projects).where(db.projects.c.id == pid).values(datasets=counts))
    return {"dataset": dataset, "added": len(items), "items_count": entry["items_count"]}


def lock_project(conn, pid: int) -> list[dict]:
    """Lock project `pid`'s row until the transaction ends and return its datasets summary; 404
    `project_not_found`. PostgreSQL: SELECT ... FOR UPDATE. SQLite has one writer at a time, but
    pysqlite opens the transaction only at its first write: a write first takes SQLite's write
    lock now, so no other append runs between the reads below and this transaction's commit."""
    p = db.projects.c
    if conn.dialect.name == "sqlite":
        conn.execute(update(db.projects).where(p.id == pid).values(datasets=p.datasets))
    row = conn.execute(select(p.datasets).where(p.id == pid).with_for_update()).first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return row[0]


def bump_revision(conn, pid: int) -> None:
    """Count a change to project `pid`'s meta or stored annotations (items added are counted by
    the datasets' item counts): its kept stats and a page checked against the old meta see it."""
    conn.execute(update(db.projects).where(db.projects.c.id == pid).values(revision=db.projects.c.revision + 1))


def revision(conn, pid: int) -> tuple[int, int]:
    """(items, revision) of project `pid`: its datasets' counts summed and its changes counted; 404
    `project_not_found`."""
    row = conn.execute(select(db.projects.c.datasets, db.projects.c.revision).where(db.projects.c.id == pid)).first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return sum(d["items_count"] for d in row[0]), row[1]


def check_exists(conn, pid: int) -> None:
    """404 `project_not_found` unless project `pid` exists."""
    if conn.execute(select(db.projects.c.id).where(db.projects.c.id == pid)).first() is None:
        raise APIError(404, "project_not_found", f"no project {pid}")


def items_total(conn, pid: int) -> int:
    """How many items project `pid` holds (its datasets' counts summed); 404 `project_not_found`."""
    row = conn.execute(select(db.projects.c.datasets).where(db.projects.c.id == pid)).first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return sum(d["items_count"] for d in row[0])


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


def same_project(conn, pid: int, meta: dict, datasets: list[dict], prefix: bool = False) -> bool:
    """Whether project `pid` holds exactly this meta and these items (a re-posted result);
    `prefix`: these items first, and maybe more after them (the first page of a paged result).

    The stored items are read a page at a time in id order (their dataset and item order) and the
    reading stops at the first difference: the whole project read at once, annotations included,
    would hold a second copy of the posted one (hundreds of MB for a 60 MiB result)."""
    p = db.projects.c
    row = conn.execute(select(p.meta, p.datasets).where(p.id == pid)).mappings().first()
    stored_names = [d["name"] for d in row["datasets"]] if row is not None else []
    posted_names = [ds["name"] for ds in datasets]
    if prefix:
        stored_names = stored_names[: len(posted_names)]
    if row is None or row["meta"] != meta or stored_names != posted_names:
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
        last = end == len(posted) and not prefix
        q = select(c.id, c.dataset, c.name, c.sha256, c.size, c.ann).where(c.project_id == pid)
        if after is not None:
            q = q.where(c.id > after)
        # On the last page one row more: a stored project longer than the posted one shows it.
        got = conn.execute(q.order_by(c.id).limit(end - start + last)).mappings().all()
        if len(got) != end - start:
            return False
        if prefix and end == len(posted):
            last = True
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
