"""Retention: deleting a task with its log, expiring old logs, pruning telemetry, giving space back.

`housekeep(state, now)` is one round of the periodic job (`run_housekeeper` runs it every
`housekeeping_s`): telemetry history past its windows, the log lines of tasks that ended more
than `log_retention_days` ago, and on SQLite an incremental vacuum after a large delete. Every
step is an idempotent delete, so replicas sharing a database may all run it; on PostgreSQL an
advisory lock lets one replica do a round while the others skip it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import delete, select, text, update

from protocol.errors import APIError
from protocol.states import FINAL, TaskState
from server import db
from server.blobs import refs as blob_refs
from server.telemetry import service as telemetry

log = logging.getLogger("sly-server")

FINAL_VALUES = [s.value for s in FINAL]
EXPIRE_BATCH = 200  # tasks whose lines one round deletes: a round stays a short transaction
VACUUM_AFTER_ROWS = 10_000  # deleted rows that make a SQLite incremental vacuum worth its I/O
_PG_LOCK_KEY = 0x736C7972  # any constant other than migrate's


def delete_task(conn, task_id: int) -> dict:
    """Delete a final task, its log lines, metrics and artifacts (in `conn`'s transaction); what went, what stayed.

    404 for an unknown task, 409 task_not_final for one that may still run: stop it first. The
    models and projects the task made stay, still naming it in their task_id."""
    t = db.tasks.c
    row = conn.execute(select(t.id, t.state).where(t.id == task_id)).first()
    if row is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    if TaskState(row.state) not in FINAL:
        raise APIError(
            409,
            "task_not_final",
            f"task {task_id} is {row.state}; stop it and wait for a final state "
            f"({', '.join(FINAL_VALUES)}) before deleting it",
        )
    lines = conn.execute(delete(db.log_lines).where(db.log_lines.c.task_id == task_id)).rowcount
    metrics = conn.execute(delete(db.task_metrics).where(db.task_metrics.c.task_id == task_id)).rowcount
    # Its artifacts go, and with them its claim on their blobs: the collector may take those no
    # project or model names.
    a = db.task_artifacts.c
    arts = conn.execute(select(a.sha256).where(a.task_id == task_id)).scalars().all()
    blob_refs.drop_results(conn, task_id, arts)
    conn.execute(delete(db.task_artifacts).where(a.task_id == task_id))
    models = [
        r[0]
        for r in conn.execute(select(db.models.c.id).where(db.models.c.task_id == task_id).order_by(db.models.c.id))
    ]
    projects = [
        r[0]
        for r in conn.execute(
            select(db.projects.c.id).where(db.projects.c.task_id == task_id).order_by(db.projects.c.id)
        )
    ]
    conn.execute(delete(db.tasks).where(t.id == task_id))
    return {
        "ok": True,
        "id": task_id,
        "deleted": {"log_lines": lines, "metrics": metrics, "artifacts": len(arts)},
        "kept": {"models": models, "projects": projects},
        "detail": f"task {task_id} and its log are deleted; the models and projects it made are kept "
        f"(their task_id still names it)",
    }


def expire_logs(conn, settings, now: float) -> tuple[list[int], int]:
    """Delete the log lines of tasks final for longer than log_retention_days (a batch of tasks per
    call); the tasks get logs_expired_at. Returns (task ids, lines deleted)."""
    if settings.log_retention_days <= 0:
        return [], 0
    t, ll = db.tasks.c, db.log_lines.c
    cutoff = now - settings.log_retention_days * 86400
    ids = [
        r[0]
        for r in conn.execute(
            select(t.id)
            .where(t.state.in_(FINAL_VALUES), t.updated_at < cutoff, t.logs_expired_at.is_(None))
            .order_by(t.id)
            .limit(EXPIRE_BATCH)
        )
    ]
    if not ids:
        return [], 0
    lines = conn.execute(delete(db.log_lines).where(ll.task_id.in_(ids))).rowcount
    conn.execute(update(db.tasks).where(t.id.in_(ids)).values(logs_expired_at=now))
    return ids, lines


def sqlite_incremental_vacuum(engine) -> bool:
    """Give free pages back to the filesystem, when the database was made with auto_vacuum=INCREMENTAL."""
    if engine.dialect.name != "sqlite":
        return False
    with engine.connect() as conn:
        if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() != 2:
            return False
        conn.commit()
        # sqlite3's execute() steps the pragma once, which frees one page; executescript runs it to the end.
        conn.connection.driver_connection.executescript("PRAGMA incremental_vacuum;")
    return True


def housekeep(state, now: float | None = None) -> dict:
    """One round: prune telemetry, expire logs, vacuum (SQLite) after a large delete. What it did."""
    now = time.time() if now is None else now
    done = {"telemetry_points": 0, "expired_tasks": [], "log_lines": 0, "vacuumed": False}
    with state.db.transaction() as conn:
        if (
            conn.dialect.name == "postgresql"
            and not conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY}).scalar()
        ):
            return done  # another replica is doing this round
        done["telemetry_points"] = telemetry.prune(conn, state.settings, now)
        while True:
            ids, lines = expire_logs(conn, state.settings, now)
            done["expired_tasks"] += ids
            done["log_lines"] += lines
            for tid in ids:
                state.wakeups.notify_task(conn, tid)  # a live follower of an expired log ends
            if len(ids) < EXPIRE_BATCH:
                break
    if done["telemetry_points"] + done["log_lines"] >= VACUUM_AFTER_ROWS:
        done["vacuumed"] = sqlite_incremental_vacuum(state.db.engine)
    return done


def after_delete(state, rows: int) -> None:
    """A user's delete of `rows` rows: vacuum now if that was a large one."""
    if rows >= VACUUM_AFTER_ROWS:
        sqlite_incremental_vacuum(state.db.engine)


async def run_housekeeper(state) -> None:
    """housekeep() every housekeeping_s, from the start; a failed round is logged and the next one runs."""
    while True:
        try:
            done = await state.db.run(housekeep, state)
            if done["expired_tasks"]:
                log.info(
                    "log retention: deleted %d lines of %d tasks final for over %g days",
                    done["log_lines"],
                    len(done["expired_tasks"]),
                    state.settings.log_retention_days,
                )
        except Exception:  # noqa: BLE001 - the job must outlive a failed round
            log.exception("housekeeping round failed")
        await asyncio.sleep(state.settings.housekeeping_s)
