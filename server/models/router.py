"""User side: models (a manifest of files, each a blob; `hash` names the manifest)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Query

from protocol import endpoints
from server.http.deps import AdminDep, CoreDep, cursor_id, page
from server.http.strict import RowId, query_id
from server.models import service
from server.schemas import ModelIn

router = APIRouter(tags=["user"])


@router.post(endpoints.MODELS)
async def create_model(body: ModelIn, core: CoreDep, _: AdminDep):
    """A model referencing uploaded blobs; `hash` = sha256 of its sorted manifest."""
    files = service.prepare(core.blobs, body.files)

    def create() -> dict:
        with core.engine.begin() as conn:
            mid = service.insert_model(conn, body.name, files, time.time())
        with core.engine.connect() as conn:
            return service.get_model(conn, mid)
    return await core.run(create)


@router.get(endpoints.MODELS)
async def list_models(core: CoreDep, _: AdminDep, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None,
                      task_id: int | None = query_id()):
    """Models, newest first (files summarised: files_count, size); `task_id=` keeps the models that task
    made (a train task's checkpoints, each with its `checkpoint`)."""
    before = cursor_id(cursor)

    def read() -> list[dict]:
        with core.engine.connect() as conn:
            return service.list_models(conn, limit, before, task_id)
    return page(await core.run(read), limit)


@router.get(endpoints.MODEL)
async def read_model(model_id: RowId, core: CoreDep, _: AdminDep):
    """The model with `task` (the task that made it: id, type, state), `checkpoint` ({epoch, metrics,
    final} or null) and `config` (its config.json parsed, or null; every file's bytes: GET /api/v1/blobs/{sha256})."""
    def read() -> dict:
        with core.engine.connect() as conn:
            return service.read_model(conn, model_id)
    m = await core.run(read)
    m["config"] = service.config(core.blobs, m["files"])
    return m
