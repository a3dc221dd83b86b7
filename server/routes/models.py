"""User side: models (a manifest of files, each a blob; `hash` names the manifest)."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import insert

from protocol import endpoints
from server import blob_refs, db
from server.auth import require_admin
from server.routes.common import core_of, get_row, list_rows
from server.schemas import ModelIn, check_files, model_hash

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
    with core.engine.begin() as conn:
        mid = conn.execute(insert(db.models).values(name=body.name, hash=model_hash(files), files=files,
                                                    created_at=time.time())).inserted_primary_key[0]
        blob_refs.add(conn, blob_refs.MODEL, mid, [f["sha256"] for f in files])
    return get_row(core, db.models, mid, "model")


@router.get(endpoints.MODELS)
async def list_models(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """Models, newest first (files summarised: files_count, size)."""
    return list_rows(core_of(request), db.models, limit, cursor, _summary)


@router.get(endpoints.MODEL)
async def read_model(model_id: int, request: Request):
    return get_row(core_of(request), db.models, model_id, "model")
