"""User side: projects (Supervisely projects: a meta, datasets, items = image blob + annotation)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy import select

from protocol import endpoints
from protocol.errors import APIError
from server import db
from server.auth.service import require_admin
from server.projects.stats import StatsCache
from server.projects.service import insert_project, items_page, prepare, read_project
from server.http.deps import ParsedJSONRoute, core_of, cursor_id, list_rows, page
from server.schemas import ProjectIn
from server.http.strict import RowId


router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)], route_class=ParsedJSONRoute)


def _summary(p: dict) -> dict:
    p.pop("meta", None)
    return p


def _project(core, pid: int) -> dict:
    with core.engine.connect() as conn:
        p = read_project(conn, pid, anns=False)
    if p is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return p


def _check_project(conn, pid: int) -> None:
    if conn.execute(select(db.projects.c.id).where(db.projects.c.id == pid)).first() is None:
        raise APIError(404, "project_not_found", f"no project {pid}")


@router.post(endpoints.PROJECTS)
async def create_project(body: ProjectIn, request: Request):
    """A Supervisely project referencing uploaded blobs: meta and annotations checked (400 names the item)."""
    core = core_of(request)
    # Checking thousands of annotations takes a while: off the event loop, which serves the long-polls.
    meta, datasets = await run_in_threadpool(prepare, core.blobs, body.meta, body.datasets)

    def create() -> dict:
        with core.engine.begin() as conn:
            pid = insert_project(conn, body.name, meta, datasets, time.time())
        return _project(core, pid)
    return await core.run(create)


@router.get(endpoints.PROJECTS)
async def list_projects(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Projects, newest first (datasets summarised: name, items_count; no meta)."""
    core = core_of(request)
    return await core.run(list_rows, core, db.projects, limit, cursor, _summary)


@router.get(endpoints.PROJECT)
async def read_one(project_id: RowId, request: Request):
    """The project with its meta and every item's {name, sha256, size}; annotations: GET .../items."""
    core = core_of(request)
    return await core.run(_project, core, project_id)


@router.get(endpoints.PROJECT_ITEMS)
async def list_items(project_id: RowId, request: Request, dataset: str | None = None,
                     limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """A page of the project's items in order, each with its annotation (`ann`); `dataset=` filters."""
    core = core_of(request)
    after = cursor_id(cursor)

    def read() -> list[dict]:
        with core.engine.connect() as conn:
            _check_project(conn, project_id)
            return items_page(conn, project_id, dataset, after, limit)
    # Annotations are plain JSON already: skip FastAPI's per-value encoder (10x slower on big anns).
    return JSONResponse(page(await core.run(read), limit))


@router.get(endpoints.PROJECT_STATS)
async def project_stats(project_id: int, request: Request):
    """Objects per class (`classes: {title: {objects, items}}`), images per image tag (`tags`), objects per
    object tag (`object_tags`), and `items`, `labelled` (items with an object), `objects` in all."""
    core = core_of(request)
    cache = getattr(request.app.state, "project_stats", None)
    if cache is None:
        cache = request.app.state.project_stats = StatsCache()

    def read() -> dict:
        with core.engine.connect() as conn:
            _check_project(conn, project_id)
        return cache.get(core.engine, project_id)
    return await core.run(read)
