"""Blob references, and the collector that follows them.

A row of `blob_refs` says that a project item, a model file, a task's result or an agent's
upload names a blob. The rows decide two things:
- who may download a blob on the agent side: an agent gets the blobs of the project and model of
  its leased tasks, the results of its own tasks and what it uploaded itself; any other blob is
  answered 404, exactly as a missing one, so its existence is not revealed. A result may name only
  blobs its agent may read already (server.tasks.results), so naming one grants nothing;
- which blobs are kept: a blob that no project, model or result names (an upload alone does not
  count), older than the grace period, is deleted by `collect`, and so is a partial upload.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import delete, func, select

from protocol.states import LEASED
from server import db

log = logging.getLogger("sly-server")

PROJECT, MODEL, RESULT, UPLOAD = "project", "model", "result", "upload"
# A team file names its blob (owner = the team_files row id); an App task's own uploads through
# the public API (owner = the task id) count as UPLOAD does: kept only once something names them.
TEAM_FILE, APP_UPLOAD = "file", "appup"
KEEPING = (PROJECT, MODEL, RESULT, TEAM_FILE)
COLLECT_BATCH = 500  # blobs looked at per step; the event loop runs other requests between steps
READ_BATCH = 500  # hashes per query of `readable` (SQLite takes a bounded number of parameters)


def add(conn, kind: str, owner_id: int, hashes) -> None:
    """Record that `owner_id` (a project, model or task id, or an agent id for UPLOAD) names these blobs.
    RESULT: the task's artifact rows (db.task_artifacts) name them."""
    rows = [{"sha256": h, "kind": kind, "owner_id": owner_id} for h in sorted(set(hashes))]
    if rows:
        conn.execute(db.insert_ignore(conn.engine, db.blob_refs), rows)


def agent_may_read(conn, agent_id: int, sha256: str) -> bool:
    """True when one of the agent's leased tasks, its results or its uploads name the blob."""
    return bool(readable(conn, agent_id, [sha256]))


def readable(conn, agent_id: int, hashes) -> set[str]:
    """Those of `hashes` the agent may read: named by one of its leased tasks' project or model,
    by one of its tasks' results, or uploaded by it (a few indexed queries per READ_BATCH)."""
    r, t = db.blob_refs.c, db.tasks.c
    leased = [s.value for s in LEASED]
    mine = select(t.id).where(t.agent_id == agent_id)
    projects = select(t.project_id).where(t.agent_id == agent_id, t.state.in_(leased), t.project_id.is_not(None))
    models = select(t.model_id).where(t.agent_id == agent_id, t.state.in_(leased), t.model_id.is_not(None))
    return _named(
        conn,
        hashes,
        ((r.kind == UPLOAD) & (r.owner_id == agent_id))
        | ((r.kind == RESULT) & r.owner_id.in_(mine))
        | ((r.kind == PROJECT) & r.owner_id.in_(projects))
        | ((r.kind == MODEL) & r.owner_id.in_(models)),
    )


def app_readable(conn, task_id: int, hashes) -> set[str]:
    """Those of `hashes` the App of task `task_id` may name (server/public): an image of any project
    (the one team reads them all), a team file, or its own upload."""
    r = db.blob_refs.c
    return _named(conn, hashes, r.kind.in_((PROJECT, TEAM_FILE)) | ((r.kind == APP_UPLOAD) & (r.owner_id == task_id)))


def _named(conn, hashes, which) -> set[str]:
    """Those of `hashes` that a reference matching `which` names (one indexed query per READ_BATCH)."""
    r = db.blob_refs.c
    hashes = sorted(set(hashes))
    out: set[str] = set()
    for i in range(0, len(hashes), READ_BATCH):
        q = select(r.sha256).distinct().where(r.sha256.in_(hashes[i : i + READ_BATCH]), which)
        out.update(conn.execute(q).scalars())
    return out


def drop_results(conn, task_id: int, hashes) -> None:
    """The task's results name these blobs no more (an artifact replaced, the task deleted)."""
    r = db.blob_refs.c
    hashes = sorted(set(hashes))
    for i in range(0, len(hashes), READ_BATCH):
        conn.execute(
            delete(db.blob_refs).where(
                r.kind == RESULT, r.owner_id == task_id, r.sha256.in_(hashes[i : i + READ_BATCH])
            )
        )


def referenced(conn, hashes: list[str]) -> set[str]:
    """Those of `hashes` that a project, model or result names."""
    r = db.blob_refs.c
    return set(conn.execute(select(r.sha256).where(r.sha256.in_(hashes), r.kind.in_(KEEPING))).scalars())


def fill_if_empty(conn) -> int:
    """Fill blob_refs from the projects, models and task results already stored, when it is empty
    and they are not (a database upgraded from before the table existed). Returns rows added."""
    if conn.execute(select(db.blob_refs.c.sha256).limit(1)).first() is not None:
        return 0
    if (
        not any(conn.execute(select(func.count()).select_from(tbl)).scalar() for tbl in (db.projects, db.models))
        and conn.execute(select(db.tasks.c.id).limit(1)).first() is None
    ):
        return 0
    n = 0
    by_project: dict[int, list[str]] = {}
    for pid, sha in conn.execute(select(db.project_items.c.project_id, db.project_items.c.sha256)).all():
        by_project.setdefault(pid, []).append(sha)
    for pid, hashes in by_project.items():
        add(conn, PROJECT, pid, hashes)
        n += len(set(hashes))
    for mid, files in conn.execute(select(db.models.c.id, db.models.c.files)).all():
        add(conn, MODEL, mid, [f["sha256"] for f in files or []])
        n += len(files or [])
    by_task: dict[int, list[str]] = {}
    for tid, sha in conn.execute(select(db.task_artifacts.c.task_id, db.task_artifacts.c.sha256)).all():
        by_task.setdefault(tid, []).append(sha)
    for tid, hashes in by_task.items():
        add(conn, RESULT, tid, hashes)
        n += len(set(hashes))
    if n:
        log.warning("blob references filled from %d stored references (a database from before blob_refs)", n)
    return n


async def collect(state, now: float | None = None) -> int:
    """Delete blobs no project, model or result names, and partial uploads, older than the grace
    period; returns how many blobs went. Works in steps of COLLECT_BATCH between which other
    requests run; each step checks and deletes in one go, so a request that references a blob
    never sees it vanish between its check and its insert."""
    now = time.time() if now is None else now
    cutoff = now - state.settings.blob_grace_s
    store = state.blobs
    store.remove_partials(cutoff)
    removed = 0
    batch: list[str] = []
    for h in store.names_older_than(cutoff):
        batch.append(h)
        if len(batch) >= COLLECT_BATCH:
            removed += await state.db.run(_collect_step, state, batch, cutoff)
            batch = []
            await asyncio.sleep(0)
    if batch:
        removed += await state.db.run(_collect_step, state, batch, cutoff)
    if removed:
        state.metrics.blobs_collected.inc(removed)
        log.info(
            "blob collector: %d unreferenced blob(s) older than %g s deleted", removed, state.settings.blob_grace_s
        )
    return removed


def _collect_step(state, batch: list[str], cutoff: float) -> int:
    with state.db.engine.begin() as conn:
        keep = referenced(conn, batch)
        gone = [h for h in batch if h not in keep and state.blobs.delete_if_older(h, cutoff)]
        if gone:
            r = db.blob_refs.c
            conn.execute(delete(db.blob_refs).where(r.sha256.in_(gone), r.kind.in_((UPLOAD, APP_UPLOAD))))
    return len(gone)
