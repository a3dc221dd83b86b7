"""User side: projects (datasets of items, each item a blob)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import insert

from protocol import endpoints
from protocol.errors import APIError
from server import blob_refs, db
from server.auth import require_admin
from server.routes.common import core_of, get_row, list_rows
from server.schemas import ProjectIn, check_files, check_relpath

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)])


def _summary(p: dict) -> dict:
    ds = p.pop("datasets")
    p["datasets"] = [{"name": d["name"], "items_count": len(d["items"])} for d in ds]
    return p


@router.post(endpoints.PROJECTS)
async def create_project(body: ProjectIn, request: Request):
    """A project referencing uploaded blobs; every blob must exist (400 missing_blobs)."""
    core = core_of(request)
    names = set()
    for ds in body.datasets:
        check_relpath(ds.name, "dataset name", single=True)
        if ds.name in names:
            raise APIError(400, "duplicate_path", f"dataset {ds.name!r} appears twice")
        names.add(ds.name)
    for ds in body.datasets:
        check_files(core.blobs, ds.items, "name", "item name")
    datasets = [{"name": ds.name, "items": [i.model_dump() for i in ds.items]} for ds in body.datasets]
    with core.engine.begin() as conn:
        pid = conn.execute(insert(db.projects).values(name=body.name, datasets=datasets,
                                                      created_at=time.time())).inserted_primary_key[0]
        blob_refs.add(conn, blob_refs.PROJECT, pid, [i["sha256"] for ds in datasets for i in ds["items"]])
    return get_row(core, db.projects, pid, "project")


@router.get(endpoints.PROJECTS)
async def list_projects(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Projects, newest first (datasets summarised: name, items_count)."""
    return list_rows(core_of(request), db.projects, limit, cursor, _summary)


@router.get(endpoints.PROJECT)
async def read_project(project_id: int, request: Request):
    return get_row(core_of(request), db.projects, project_id, "project")
