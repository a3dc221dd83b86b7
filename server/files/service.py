"""Team files: a team's file tree, each path naming a blob of the store (db.team_files).

The tree has no folder rows: a folder is the prefix `<path>/` of the files under it, so it exists
while one does. A path is absolute and normalised (`/a/b.txt`), at most MAX_PATH characters, with
no `.`/`..` segment and no control character; a file and a folder never share a path (writing
`/a/b` is refused while `/a/b/c` exists, and the other way round), so every path is one or the
other. There is one team (db.DEFAULT_TEAM_ID); the functions take its id all the same, so a second
team would need no new queries.

Folders are listed in path order with a skip-scan: a sub-folder costs one indexed query, however
many files it holds, so a page costs in proportion to what it shows. Path order is byte order on
both databases (SQLite compares text bytewise; on PostgreSQL the comparisons say COLLATE "C", since
a locale's order would not keep a folder's files together).

A file's row names its blob with a TEAM_FILE reference (server.blobs.refs), replaced with the blob
when the path is written again, so the collector keeps exactly the blobs the tree names.
"""

from __future__ import annotations

import time

from sqlalchemy import and_, delete, func, select, update

from protocol.errors import APIError
from protocol.names import CONTROL_RE
from server import db
from server.blobs import refs

DEFAULT_TEAM = db.DEFAULT_TEAM_ID  # the one team; the user API reads its tree
MAX_PATH = 1024  # characters, as the column holds them
LIST_BATCH = 500  # rows read per query while a listing walks the tree


def _bad_path(field: str, why: str) -> APIError:
    return APIError(400, "bad_path", f"{field} {why}", field=field)


def check_path(raw, field: str = "path", *, folder: bool = False) -> str:
    """`raw` as a normalised absolute path, or a 400 naming `field`. A missing leading slash is added
    and repeated slashes are one (the SDK joins folders and names loosely); a folder keeps a
    trailing slash (`/` is the root), a file may not have one."""
    if not isinstance(raw, str):
        raise _bad_path(field, "must be a string")
    if len(raw) > MAX_PATH:
        raise _bad_path(field, f"is longer than {MAX_PATH} characters")
    if CONTROL_RE.search(raw):
        raise _bad_path(field, "holds a control character")
    segments = [s for s in raw.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise _bad_path(field, "may not hold a `.` or `..` segment")
    path = "/" + "/".join(segments)
    if folder:
        return path if path == "/" else path + "/"
    if not segments or raw.endswith("/"):
        raise _bad_path(field, "must name a file (not a folder: no trailing slash)")
    return path


def _after_folder(folder: str) -> str:
    """The least string after every path under `folder` ('/a/' -> '/a0': '0' follows '/')."""
    return folder[:-1] + "0"


def _path(conn):
    """team_files.path with byte order on this database (see the module's docstring)."""
    col = db.team_files.c.path
    return col.collate("C") if conn.dialect.name == "postgresql" else col


def _under(conn, team_id: int, folder: str):
    """The condition `path is under folder` as an indexed range."""
    p = _path(conn)
    if folder == "/":
        return db.team_files.c.team_id == team_id
    return and_(db.team_files.c.team_id == team_id, p >= folder, p < _after_folder(folder))


def entry(row) -> dict:
    """A file row as the user API answers it."""
    return {
        "type": "file",
        "id": row["id"],
        "path": row["path"],
        "name": row["path"].rsplit("/", 1)[1],
        "size": row["size"],
        "sha256": row["sha256"],
        "task_id": row["task_id"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def folder_entry(folder: str) -> dict:
    return {"type": "folder", "path": folder, "name": folder.rstrip("/").rsplit("/", 1)[1]}


def get_by_path(conn, team_id: int, path: str) -> dict | None:
    c = db.team_files.c
    row = conn.execute(select(db.team_files).where(c.team_id == team_id, c.path == path)).mappings().first()
    return dict(row) if row is not None else None


def get_by_id(conn, team_id: int, file_id: int) -> dict | None:
    c = db.team_files.c
    row = conn.execute(select(db.team_files).where(c.id == file_id, c.team_id == team_id)).mappings().first()
    return dict(row) if row is not None else None


def folder_exists(conn, team_id: int, folder: str) -> bool:
    """A file lies under `folder` (the root always exists)."""
    if folder == "/":
        return True
    return conn.execute(select(db.team_files.c.id).where(_under(conn, team_id, folder)).limit(1)).first() is not None


def conflict(conn, team_id: int, path: str) -> str | None:
    """Why `path` cannot be a file: a folder of that path exists, or one of its folders is a file."""
    if folder_exists(conn, team_id, path + "/"):
        return f"{path} is a folder"
    parts = path.split("/")[1:-1]
    ancestors = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
    if ancestors:
        c = db.team_files.c
        hit = conn.execute(
            select(c.path).where(c.team_id == team_id, c.path.in_(ancestors)).order_by(func.length(c.path)).limit(1)
        ).scalar()
        if hit is not None:
            return f"{hit} is a file, so it cannot be a folder"
    return None


def task_bytes(conn, task_id: int) -> int:
    """Bytes of the team files the task wrote that are still its (a path written again is counted once)."""
    c = db.team_files.c
    return int(conn.execute(select(func.coalesce(func.sum(c.size), 0)).where(c.task_id == task_id)).scalar() or 0)


def put(conn, team_id: int, path: str, sha256: str, size: int, task_id: int | None, now: float | None = None) -> dict:
    """Make `path` name the blob (a new file, or the file's blob replaced); the row as stored.
    The caller checked the path (check_path, conflict) and stored the blob."""
    now = time.time() if now is None else now
    t, c = db.team_files, db.team_files.c
    values = {"sha256": sha256, "size": size, "task_id": task_id, "updated_at": now}
    # RETURNING, not rowcount: psycopg reports -1 as the rowcount of such an INSERT, skipped or not.
    inserted = conn.execute(
        db.insert_ignore(conn.engine, t).values(team_id=team_id, path=path, created_at=now, **values).returning(c.id)
    ).first()
    if inserted:
        row = get_by_path(conn, team_id, path)
    else:
        q = select(c.id, c.sha256).where(c.team_id == team_id, c.path == path)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()  # two writers of one path: the second sees the first's blob
        old = conn.execute(q).mappings().one()
        conn.execute(update(t).where(c.id == old["id"]).values(**values))
        if old["sha256"] != sha256:
            _drop_ref(conn, old["id"], old["sha256"])
        row = get_by_path(conn, team_id, path)
    assert row is not None  # written above, in this transaction
    refs.add(conn, refs.TEAM_FILE, row["id"], [sha256])
    return row


def _drop_ref(conn, file_id: int, sha256: str) -> None:
    r = db.blob_refs.c
    conn.execute(delete(db.blob_refs).where(r.kind == refs.TEAM_FILE, r.owner_id == file_id, r.sha256 == sha256))


def remove(conn, team_id: int, path: str) -> int:
    """Delete a file, or every file under a folder (`path` ending in `/`); how many went. Their blobs
    are left to the collector."""
    c = db.team_files.c
    if path.endswith("/"):
        cond = _under(conn, team_id, path)
    else:
        cond = and_(c.team_id == team_id, c.path == path)
    rows = conn.execute(select(c.id, c.sha256).where(cond)).all()
    for fid, sha in rows:
        _drop_ref(conn, fid, sha)
    if rows:
        conn.execute(delete(db.team_files).where(c.id.in_([r[0] for r in rows])))
    return len(rows)


def list_files(conn, team_id: int, folder: str, after: str | None, limit: int) -> list[dict]:
    """Up to `limit` files under `folder` at any depth, in path order, after the path `after`."""
    p = _path(conn)
    q = select(db.team_files).where(_under(conn, team_id, folder))
    if after is not None:
        q = q.where(p > after)
    return [dict(r) for r in conn.execute(q.order_by(p).limit(limit)).mappings()]


def list_children(conn, team_id: int, folder: str, after: str | None, limit: int) -> list[dict]:
    """Up to `limit` entries directly in `folder`, in path order: file rows (dicts with `id`) and
    sub-folders ({"folder": "/a/sub/"}), after the entry `after` (a file's path, or a folder's
    path with its trailing slash). A sub-folder is skipped past in one query, whatever it holds."""
    p = _path(conn)
    out: list[dict] = []
    if after is None:
        start, strict = folder, False
    elif after.endswith("/"):
        start, strict = _after_folder(after), False
    else:
        start, strict = after, True
    while len(out) < limit:
        q = select(db.team_files).where(_under(conn, team_id, folder), p > start if strict else p >= start)
        rows = conn.execute(q.order_by(p).limit(LIST_BATCH)).mappings().all()
        if not rows:
            break
        skipped = False
        for r in rows:
            rest = r["path"][len(folder) :]
            if "/" not in rest:
                out.append(dict(r))
                start, strict = r["path"], True
            else:
                sub = folder + rest.split("/", 1)[0] + "/"
                out.append({"folder": sub})
                start, strict = _after_folder(sub), False
                skipped = True
            if len(out) >= limit or skipped:
                break
        if not skipped and len(rows) < LIST_BATCH:
            break
    return out
