"""User side: models (a manifest of files, each a blob; `hash` names the manifest)."""
from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import insert, select

from protocol import endpoints
from server import db
from server.blobs import refs as blob_refs
from server.auth.service import require_admin
from server.http.deps import core_of, cursor_id, get_row, list_rows, page
from server.schemas import ModelIn, check_files, model_hash
from server.http.strict import RowId, query_id

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)])


def _summary(m: dict) -> dict:
    m["files_count"] = len(m["files"])
    m["size"] = sum(f["size"] for f in m.pop("files"))
    return m


@router.post(endpoints.MODELS)
async def create_model(body: ModelIn, request: Request):
    """A model referencing uploaded blobs; `hash` = sha256 of its sorted manifest."""
    core = core_of(request)
    check_files(core.blobs, body.files, "path", "model file")
    files = [f.model_dump() for f in body.files]

    def create() -> dict:
        with core.engine.begin() as conn:
            mid = conn.execute(insert(db.models).values(name=body.name, hash=model_hash(files), files=files,
                                                        created_at=time.time())).inserted_primary_key[0]
            blob_refs.add(conn, blob_refs.MODEL, mid, [f["sha256"] for f in files])
        return get_row(core, db.models, mid, "model")
    return await core.run(create)


@router.get(endpoints.MODELS)
async def list_models(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None,
                      task_id: int | None = query_id()):
    """Models, newest first (files summarised: files_count, size); `task_id=` keeps the models that task
    made (a train task's checkpoints, each with its `checkpoint`)."""
    core = core_of(request)
    if task_id is None:
        return await core.run(list_rows, core, db.models, limit, cursor, _summary)
    m = db.models.c
    q = select(db.models).where(m.task_id == task_id).order_by(m.id.desc()).limit(limit + 1)
    c = cursor_id(cursor)
    if c is not None:
        q = q.where(m.id < c)

    def read() -> list:
        with core.engine.connect() as conn:
            return conn.execute(q).mappings().all()
    return page([_summary(dict(r)) for r in await core.run(read)], limit)


CONFIG_MAX_BYTES = 256 * 1024


def _config(blobs, files: list[dict]):
    """The parsed content of the model's root config.json (small and valid JSON), else None."""
    f = next((f for f in files if f["path"] == "config.json"), None)
    if f is None or f["size"] > CONFIG_MAX_BYTES:
        return None
    try:
        return json.loads(blobs.path(f["sha256"]).read_bytes())
    except (OSError, ValueError):
        return None


@router.get(endpoints.MODEL)
async def read_model(model_id: RowId, request: Request):
    """The model with `task` (the task that made it: id, type, state), `checkpoint` ({epoch, metrics,
    final} or null) and `config` (its config.json parsed, or null; every file's bytes: GET /api/v1/blobs/{sha256})."""
    core = core_of(request)

    def read() -> dict:
        m = get_row(core, db.models, model_id, "model")
        m["task"] = None
        if m["task_id"] is not None:
            t = db.tasks.c
            with core.engine.connect() as conn:
                row = conn.execute(select(t.id, t.type, t.state).where(t.id == m["task_id"])).mappings().first()
            m["task"] = dict(row) if row else None
        return m
    m = await core.run(read)
    m["config"] = _config(core.blobs, m["files"])
    return m
