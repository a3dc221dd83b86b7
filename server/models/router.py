"""User side: models (a manifest of files, each a blob; `hash` names the manifest)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query

from protocol import endpoints
from server.http.deps import AdminDep, StateDep, cursor_id, page
from server.http.strict import RowId, query_id
from server.models import service
from server.models.schemas import ModelIn

router = APIRouter(tags=["user"])


@router.post(endpoints.MODELS)
async def create_model(body: ModelIn, state: StateDep, _: AdminDep):
    """A model referencing uploaded blobs; `hash` = sha256 of its sorted manifest."""
    files = service.prepare(state.blobs, body.files)

    def create() -> dict:
        with state.db.engine.begin() as conn:
            mid = service.insert_model(conn, body.name, files, time.time())
        with state.db.engine.connect() as conn:
            return service.get_model(conn, mid)

    return await state.db.run(create)


@router.get(endpoints.MODELS)
async def list_models(
    state: StateDep,
    _: AdminDep,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
    task_id: int | None = query_id(),
):
    """Models, newest first (files summarised: files_count, size); `task_id=` keeps the models that task
    made (a train task's checkpoints, each with its `checkpoint`)."""
    before = cursor_id(cursor)

    def read() -> list[dict]:
        with state.db.engine.connect() as conn:
            return service.list_models(conn, limit, before, task_id)

    return page(await state.db.run(read), limit)


@router.get(endpoints.MODEL)
async def read_model(model_id: RowId, state: StateDep, _: AdminDep):
    """The model with `task` (the task that made it: id, type, state), `lineage` (the runs that made
    it, oldest first: a resumed training's lost runs and the task), `checkpoint` ({epoch, metrics,
    final} or null) and `config` (its config.json parsed, or null; every file's bytes: GET /api/v1/blobs/{sha256})."""

    def read() -> dict:
        with state.db.engine.connect() as conn:
            return service.read_model(conn, model_id)

    m = await state.db.run(read)
    m["config"] = service.config(state.blobs, m["files"])
    return m
