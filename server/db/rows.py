"""Reading rows of any table by id: one row (or a 404 naming what it is), or a page of rows newest first.

Blocking: a route calls them in a database thread (`state.db.run`) with a connection of its own."""

from __future__ import annotations

from sqlalchemy import select

from protocol.errors import APIError


def get_row(conn, table, oid: int, what: str) -> dict:
    """One row by id as a dict, or 404 `<what>_not_found`."""
    row = conn.execute(select(table).where(table.c.id == oid)).mappings().first()
    if row is None:
        raise APIError(404, f"{what}_not_found", f"no {what} {oid}")
    return dict(row)


def list_rows(conn, table, limit: int, before: int | None) -> list[dict]:
    """Up to limit + 1 rows of a table, newest first, with ids below `before` (the parsed cursor) when
    given; the extra row tells the page helper (server.http.deps.page) that more exist."""
    q = select(table).order_by(table.c.id.desc()).limit(limit + 1)
    if before is not None:
        q = q.where(table.c.id < before)
    return [dict(r) for r in conn.execute(q).mappings().all()]
