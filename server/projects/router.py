"""User side: projects (Supervisely projects: a meta, datasets, items = image blob + annotation)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from protocol import endpoints
from server.http.deps import AdminDep, ParsedJSONRoute, StateDep, cursor_id, page
from server.http.strict import RowId, dumps_bytes
from server.projects import service
from server.projects.schemas import PAGE_MAX, ProjectIn, ProjectItemsIn
from server.projects.stats import StatsCache

router = APIRouter(tags=["user"], route_class=ParsedJSONRoute)


@router.post(endpoints.PROJECTS)
async def create_project(body: ProjectIn, state: StateDep, _: AdminDep):
    """A Supervisely project referencing uploaded blobs: meta and annotations checked (400 names the item).
    Answers the project's row (datasets: name, items_count); datasets may be left empty and filled by pages."""
    # Checking thousands of annotations takes a while: off the event loop, which serves the long-polls.
    meta, datasets = await run_in_threadpool(service.prepare, state.blobs, body.meta, body.datasets)

    def create() -> dict:
        with state.db.engine.begin() as conn:
            pid = service.insert_project(conn, body.name, meta, datasets, time.time())
        with state.db.engine.connect() as conn:
            return service.get_project(conn, pid)

    return await state.db.run(create)


@router.get(endpoints.PROJECTS)
async def list_projects(
    state: StateDep, _: AdminDep, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None
):
    """Projects, newest first (datasets summarised: name, items_count; no meta)."""
    before = cursor_id(cursor)

    def read() -> list[dict]:
        with state.db.engine.connect() as conn:
            return service.list_projects(conn, limit, before)

    return page(await state.db.run(read), limit)


@router.get(endpoints.PROJECT)
async def read_one(project_id: RowId, state: StateDep, _: AdminDep):
    """The project with its meta and datasets (name, items_count); the items: GET .../items, a page at a time."""

    def read() -> dict:
        with state.db.engine.connect() as conn:
            return service.get_project(conn, project_id)

    return await state.db.run(read)


@router.get(endpoints.PROJECT_ITEMS)
async def list_items(
    project_id: RowId,
    state: StateDep,
    _: AdminDep,
    dataset: str | None = None,
    limit: int = Query(100, ge=1, le=PAGE_MAX),
    cursor: str | None = None,
):
    """A page of the project's items in order, each with its annotation (`ann`); `dataset=` filters."""
    after = cursor_id(cursor)

    def read() -> bytes:
        with state.db.engine.connect() as conn:
            service.check_exists(conn, project_id)
            items = service.items_page(conn, project_id, dataset, after, limit)
        return dumps_bytes(page(items, limit))

    # Annotations are plain JSON already: skip FastAPI's per-value encoder (10x slower on big anns),
    # and encode the page with orjson on the database thread, off the event loop.
    return Response(await state.db.run(read), media_type="application/json")


@router.post(endpoints.PROJECT_ITEMS)
async def add_items(project_id: RowId, body: ProjectItemsIn, state: StateDep, _: AdminDep):
    """Add a page of items to a dataset (made after the others if new): checked as creation checks them,
    against the project's stored meta; a name the dataset holds already is a 400 `duplicate_path`, and
    nothing of a refused page is stored. Answers {dataset, added, items_count (the dataset's, after)}."""

    def meta() -> dict:
        with state.db.engine.connect() as conn:
            return service.project_meta(conn, project_id)

    # Read before the check, which runs off the event loop; an App may change the meta meanwhile
    # (projects.meta.update): append_items compares it under the project's lock.
    checked_meta = await state.db.run(meta)
    items = await run_in_threadpool(service.prepare_page, state.blobs, checked_meta, body.dataset, body.items)

    def append() -> dict:
        with state.db.engine.begin() as conn:
            return service.append_items(conn, project_id, body.dataset, items, checked_meta)

    return await state.db.run(append)


@router.get(endpoints.PROJECT_STATS)
async def project_stats(project_id: RowId, request: Request, state: StateDep, _: AdminDep):
    """Objects per class (`classes: {title: {objects, items}}`), images per image tag (`tags`), objects per
    object tag (`object_tags`), and `items`, `labelled` (items with an object), `objects` in all."""
    # Counted once per project, item count and revision (an App's annotation or meta change), and
    # kept with the app.
    cache = getattr(request.app.state, "project_stats", None)
    if cache is None:
        cache = request.app.state.project_stats = StatsCache()

    def read() -> dict:
        with state.db.engine.connect() as conn:
            version = service.revision(conn, project_id)
        return cache.get(state.db.engine, project_id, version)

    return await state.db.run(read)
