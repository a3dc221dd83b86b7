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
from server.schemas import check_files, check_relpath
from server.projects.images import image_size

# Checks running at once per `who` (a node): a check is seconds of CPU in a worker thread, so one
# node posting many at once would take the thread pool and the cores from everyone else.
CHECKS_PER_WHO = 1
CHECK_RETRY_AFTER_S = 5
_running: dict[str, int] = {}
_running_lock = threading.Lock()


@contextmanager
def _check_slot(who: str | None):
    """A slot of `who`'s checks, or 429 `too_many_checks` at once (waiting would hold a thread too)."""
    if who is None:
        yield
        return
    with _running_lock:
        if _running.get(who, 0) >= CHECKS_PER_WHO:
            raise APIError(429, "too_many_checks",
                           f"{who} has {CHECKS_PER_WHO} project check(s) running already; retry when it is done",
                           retry_after=CHECK_RETRY_AFTER_S)
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
    sizes: dict[str, tuple] = {}    # items may share a blob: read each header once
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
    summary = [{"name": ds["name"], "items_count": len(ds["items"])} for ds in datasets]
    pid = conn.execute(insert(db.projects).values(name=name, meta=meta, datasets=summary, task_id=task_id,
                                                  created_at=now)).inserted_primary_key[0]
    rows = [{"project_id": pid, "dataset": ds["name"], **it} for ds in datasets for it in ds["items"]]
    if rows:
        conn.execute(insert(db.project_items), rows)
    blob_refs.add(conn, blob_refs.PROJECT, pid, [r["sha256"] for r in rows])
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
    """Whether project `pid` holds exactly this meta and these items (a re-posted result)."""
    p = read_project(conn, pid, anns=True)
    if p is None or p["meta"] != meta:
        return False
    return p["datasets"] == datasets
