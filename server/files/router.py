"""User side: team files, for people (the console's file browser, `sly files list|download`).

There is one team (db.DEFAULT_TEAM_ID), so the routes take no team id. Apps write the tree through
the public API (server/public/files.py); people read it here:
- `GET /api/v1/files?path=&recursive=&limit=&cursor=`: a page of a folder's entries (its files and
  sub-folders; with `recursive`, every file under it, no folders), or the one file `path` names;
- `GET /api/v1/files/download?path=`: one file's bytes, streamed, as an attachment (Range works).
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from protocol import endpoints
from protocol.errors import APIError
from server.files import service
from server.http.deps import AdminDep, StateDep

router = APIRouter(tags=["user"])
TEAM = service.DEFAULT_TEAM


def _cursor(cursor: str | None, folder: str) -> str | None:
    """The cursor as the entry a page ends with: a path under `folder` (a folder's with its slash)."""
    if cursor in (None, ""):
        return None
    if len(cursor) > service.MAX_PATH + 1 or not cursor.startswith(folder) or cursor == folder:
        raise APIError(400, "bad_cursor", "cursor must be the `next` value of a previous page of this path")
    return cursor


@router.get(endpoints.FILES)
async def list_files(
    state: StateDep,
    _: AdminDep,
    path: str = Query("/", max_length=service.MAX_PATH, description="a folder (`/a/b/` or `/a/b`) or a file"),
    recursive: bool = False,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=service.MAX_PATH + 1),
):
    """`{path, type: "folder", items, next}`: the folder's entries in path order, files as `{type: "file",
    id, path, name, size, sha256, task_id, created_at, updated_at}` and sub-folders as `{type: "folder",
    path (with its trailing slash), name}`; `recursive`: every file under it instead. A path that names
    a file answers `{path, type: "file", items: [that file], next: null}`; one that names nothing, 404."""
    folder = service.check_path(path, "path", folder=True)
    file_path = None if path.endswith("/") or folder == "/" else folder[:-1]
    after = _cursor(cursor, folder)

    def read() -> dict:
        with state.db.reader() as conn:
            if file_path is not None and after is None:
                row = service.get_by_path(conn, TEAM, file_path)
                if row is not None:
                    return {"path": file_path, "type": "file", "items": [service.entry(row)], "next": None}
            if recursive:
                rows = service.list_files(conn, TEAM, folder, after, limit + 1)
            else:
                rows = service.list_children(conn, TEAM, folder, after, limit + 1)
            if not rows and after is None and not service.folder_exists(conn, TEAM, folder):
                raise APIError(404, "path_not_found", f"no team file or folder {folder.rstrip('/') or '/'}")
        items = [service.folder_entry(r["folder"]) if "folder" in r else service.entry(r) for r in rows[:limit]]
        more = len(rows) > limit
        return {"path": folder, "type": "folder", "items": items, "next": items[-1]["path"] if more else None}

    return await state.db.run_read(read)


@router.get(
    endpoints.FILES_DOWNLOAD,
    responses={
        200: {"description": "the file's bytes (206 with a Range)", "content": {"application/octet-stream": {}}},
        206: {"description": "the requested range", "content": {"application/octet-stream": {}}},
    },
)
async def download_file(
    state: StateDep, _: AdminDep, path: str = Query(..., max_length=service.MAX_PATH, description="a file's path")
):
    """The file's bytes as an attachment named as the file; its ETag is its sha256."""
    file_path = service.check_path(path, "path")

    def read() -> dict | None:
        with state.db.reader() as conn:
            return service.get_by_path(conn, TEAM, file_path)

    row = await state.db.run_read(read)
    if row is None or not state.blobs.exists(row["sha256"]):
        raise APIError(404, "file_not_found", f"no team file {file_path}")
    return FileResponse(
        state.blobs.path(row["sha256"]),
        media_type="application/octet-stream",
        filename=file_path.rsplit("/", 1)[1],
        headers={"etag": f'"{row["sha256"]}"', "x-sha256": row["sha256"], "cache-control": "private, no-cache"},
    )
