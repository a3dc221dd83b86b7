"""Model rows: storing a posted model (a manifest of files, each a blob; `hash` names the manifest),
listing them, and reading one back with the task that made it and its config.json."""

from __future__ import annotations

import json

from sqlalchemy import insert, select

from server import db
from server.blobs import refs as blob_refs
from server.db import rows
from server.http.fields import check_files
from server.models.schemas import model_hash
from server.tasks import service as tasks

CONFIG_MAX_BYTES = 256 * 1024


def prepare(blobs, files: list) -> list[dict]:
    """The posted files (ModelIn.files) as plain dicts, each blob checked to exist with its size (400 otherwise)."""
    check_files(blobs, files, "path", "model file")
    return [f.model_dump() for f in files]


def insert_model(conn, name: str, files: list[dict], now: float) -> int:
    """Store a prepared model and its blob references; returns its id."""
    mid = conn.execute(
        insert(db.models).values(name=name, hash=model_hash(files), files=files, created_at=now)
    ).inserted_primary_key[0]
    blob_refs.add(conn, blob_refs.MODEL, mid, [f["sha256"] for f in files])
    return mid


def summary(m: dict) -> dict:
    """A listed model: its files summarised as files_count and size."""
    m["files_count"] = len(m["files"])
    m["size"] = sum(f["size"] for f in m.pop("files"))
    return m


def list_models(conn, limit: int, before: int | None, task_id: int | None) -> list[dict]:
    """Up to limit + 1 models, newest first, summarised; `task_id`: only the models that task made."""
    if task_id is None:
        return [summary(m) for m in rows.list_rows(conn, db.models, limit, before)]
    m = db.models.c
    q = select(db.models).where(m.task_id == task_id).order_by(m.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(m.id < before)
    return [summary(dict(r)) for r in conn.execute(q).mappings().all()]


def get_model(conn, mid: int) -> dict:
    """The model (404 `model_not_found`), bare."""
    return rows.get_row(conn, db.models, mid, "model")


def read_model(conn, mid: int) -> dict:
    """The model with `task`: the task that made it ({id, type, state}), or None; and `lineage`:
    the runs that made it, oldest first (server/tasks/service.py `lineage`; [] for an upload)."""
    m = get_model(conn, mid)
    m["task"] = None
    if m["task_id"] is not None:
        t = db.tasks.c
        row = conn.execute(select(t.id, t.type, t.state).where(t.id == m["task_id"])).mappings().first()
        m["task"] = dict(row) if row else None
    m["lineage"] = tasks.lineage(conn, m["task_id"]) if m["task"] is not None else []
    return m


def config(blobs, files: list[dict]):
    """The parsed content of the model's root config.json (small and valid JSON), else None."""
    f = next((f for f in files if f["path"] == "config.json"), None)
    if f is None or f["size"] > CONFIG_MAX_BYTES:
        return None
    try:
        return json.loads(blobs.path(f["sha256"]).read_bytes())
    except (OSError, ValueError):
        return None
