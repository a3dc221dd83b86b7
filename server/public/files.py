"""Public API methods (server/public/registry.py): team files, as the SDK's `api.file` calls them.

- `file-storage.bulk.upload?teamId=` (multipart: for each file the fields `name` and `path` (its
  folder), then the part `file`) -> [file info]: `api.file.upload`, `upload_bulk`, `upload_directory`;
- `file-storage.upload?teamId=` (the same, one file) -> file info;
- `file-storage.list {teamId, path, recursive}` -> [file info]: `list`, `list2`, `listdir`,
  `exists`, `dir_exists`, `get_info_by_path`, `get_directory_size`;
- `file-storage.info {id}` -> file info; `file-storage.download {teamId, path}` -> the bytes (a
  folder, `path` ending in `/`: a tar of it, as `api.file.download_directory` unpacks it);
- `file-storage.remove {teamId, path}`, `file-storage.bulk.remove {teamId, paths}`.

A file info is the SDK's FileInfo (`info_sequence`): `hash` is the base64 of the bytes' sha256, as
the SDK's own `get_file_hash` computes it, so its cache and its upload check compare equal;
`storagePath` is `/files/<id>`, what `api.file.get_url` gives, so an output set from either names
the file. `api.file.list(path)` answers the file at `path` (if there is one) and, recursively, the
files under the folder `path/`; without `recursive` the SDK asks for `path/` and gets its files and
sub-folders (`isDir: true`, no id).

Only the App's team (db.DEFAULT_TEAM_ID) is reachable: another team id is a 403. Uploads are
bounded: MAX_FILE_BYTES a file, MAX_UPLOAD_PARTS files a request, and MAX_TASK_BYTES for all the
team files a task holds. A request's files become visible together once every one of them has
arrived: a bad part is a 400 and none of them is stored.
"""

from __future__ import annotations

import mimetypes
import tarfile
import time

from fastapi.responses import FileResponse, StreamingResponse

from protocol.errors import APIError
from server import db
from server.files import intake, service
from server.files.multipart import MultipartReader, boundary_of
from server.http.strict import ID_MAX
from server.public import infos
from server.public.registry import Call, is_id, method

GiB = 1 << 30
MAX_FILE_BYTES = 16 * GiB  # one team file
MAX_TASK_BYTES = 64 * GiB  # the team files one App task holds (a path written again counts once)
MAX_UPLOAD_PARTS = 1000  # files in one upload request (the SDK sends at most 50, up to 20 MiB)
MAX_FIELD = 4096  # bytes of a form field (`name`, `path`)
MAX_LIST = 20_000  # entries `file-storage.list` answers; the SDK's list has no pages
MAX_REMOVE = 1000  # paths in one `file-storage.bulk.remove`
TAR_PIECE = 1 << 20


def file_info(row: dict) -> dict:
    """A team_files row as the SDK's FileInfo JSON."""
    name = row["path"].rsplit("/", 1)[1]
    ext = name.rsplit(".", 1)[1] if "." in name else ""
    return {
        "id": row["id"],
        "teamId": row["team_id"],
        "userId": None,
        "name": name,
        "hash": infos.sly_hash(row["sha256"]),
        "path": row["path"],
        "storagePath": f"/files/{row['id']}",
        "meta": {"ext": ext, "mime": mimetypes.guess_type(name)[0] or "application/octet-stream", "size": row["size"]},
        "createdAt": infos.iso(row["created_at"]),
        "updatedAt": infos.iso(row["updated_at"]),
        "fullStorageUrl": None,
        "isDir": False,
    }


def folder_info(team_id: int, folder: str) -> dict:
    """A sub-folder in a listing without `recursive`: its path has no trailing slash (as the SDK's listdir shows it)."""
    path = folder.rstrip("/")
    return {
        "id": None,
        "teamId": team_id,
        "userId": None,
        "name": path.rsplit("/", 1)[1],
        "hash": None,
        "path": path,
        "storagePath": None,
        "meta": {"ext": "", "mime": None, "size": None},
        "createdAt": None,
        "updatedAt": None,
        "fullStorageUrl": None,
        "isDir": True,
    }


def _team(call: Call, params: dict) -> int:
    """The request's team id (`teamId`), which must be the App's team."""
    v = params.get("teamId")
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 19:
        v = int(v)
    if v is None:
        raise APIError(400, "invalid_request", "'teamId' is required", field="teamId")
    if not is_id(v):
        raise APIError(
            400, "invalid_request", f"'teamId' must be an id (an integer from 0 to {ID_MAX})", field="teamId"
        )
    if v != db.DEFAULT_TEAM_ID:
        raise APIError(403, "team_forbidden", f"team {v} is not this App's team ({db.DEFAULT_TEAM_ID})", field="teamId")
    return v


# --- upload ---


async def _receive(call: Call, team_id: int, most_files: int) -> list[dict]:
    """Stream the request's files into the blob store, then make their paths name them (one transaction)."""
    request, state = call.request, call.state
    ctype = request.headers.get("content-type", "")
    task_id = call.task["id"]

    def held() -> int:
        with state.db.reader() as conn:
            return service.task_bytes(conn, task_id)

    budget = MAX_TASK_BYTES - await state.db.run(held)
    stored: list[tuple[str, str, int]] = []  # (path, sha256, size) in the order they came
    if ctype.startswith("multipart/form-data"):
        fields: dict[str, str] = {}
        async for part in MultipartReader(request.stream(), boundary_of(ctype)):
            if part.filename is None:
                if part.name in ("name", "path"):
                    fields[part.name] = await part.text(MAX_FIELD)
                else:
                    await part.text(MAX_FIELD)  # a field the SDK does not send: read past it
                continue
            if len(stored) >= most_files:
                raise APIError(400, "too_many_files", f"one upload takes at most {most_files} files", field="file")
            if "path" not in fields:
                raise APIError(
                    400, "invalid_request", "each file part must follow its `path` field (its folder)", field="path"
                )
            name = fields.pop("name", None) or part.filename
            path = service.check_path(fields.pop("path").rstrip("/") + "/" + name, "path")
            sha, size = await intake.receive(state.blobs, part.chunks(), *_limit(budget, path))
            budget -= size
            stored.append((path, sha, size))
    elif ctype.startswith("application/octet-stream"):
        # upload_async: the whole body is the file; `path` (the file's own path) is in the query.
        path = service.check_path(request.query_params.get("path"), "path")
        sha, size = await intake.receive(state.blobs, request.stream(), *_limit(budget, path))
        stored.append((path, sha, size))
    else:
        raise APIError(
            400, "bad_multipart", "an upload is multipart/form-data (fields name, path, file) or octet-stream"
        )
    if not stored:
        raise APIError(400, "invalid_request", "the upload holds no file part", field="file")
    return await state.db.run(_commit, state, team_id, task_id, stored)


def _limit(budget: int, path: str) -> tuple[int, str]:
    """The bytes the next file may have, and what a 413 calls it: the per-file bound, or what is
    left of the task's."""
    if budget >= MAX_FILE_BYTES:
        return MAX_FILE_BYTES, f"the file {path}"
    return max(0, budget), f"the file {path} with this task's other team files (at most {MAX_TASK_BYTES} bytes)"


def _commit(state, team_id: int, task_id: int, stored: list[tuple[str, str, int]]) -> list[dict]:
    now = time.time()
    with state.db.engine.begin() as conn:
        rows = {}
        for path, sha, size in stored:
            why = service.conflict(conn, team_id, path)
            if why is not None:
                raise APIError(409, "path_conflict", f"cannot write {path}: {why}; nothing was stored", field="path")
            rows[path] = service.put(conn, team_id, path, sha, size, task_id, now)
    return [file_info(rows[path]) for path, _, _ in stored]


@method("file-storage.bulk.upload", http="STREAM")
async def bulk_upload(call: Call) -> list[dict]:
    team_id = _team(call, dict(call.request.query_params))
    return await _receive(call, team_id, MAX_UPLOAD_PARTS)


@method("file-storage.upload", http="STREAM")
async def upload(call: Call) -> dict:
    team_id = _team(call, dict(call.request.query_params))
    return (await _receive(call, team_id, 1))[0]


# --- reading ---


def _list(state, team_id: int, raw_path, recursive: bool) -> list[dict]:
    folder = service.check_path(raw_path or "/", "path", folder=True)
    file_path = None if folder == "/" or str(raw_path).endswith("/") else folder[:-1]
    out: list[dict] = []
    with state.db.reader() as conn:
        if file_path is not None:
            row = service.get_by_path(conn, team_id, file_path)
            if row is not None:
                out.append(file_info(row))
        if recursive:
            rows = service.list_files(conn, team_id, folder, None, MAX_LIST + 1 - len(out))
            out.extend(file_info(r) for r in rows)
        else:
            rows = service.list_children(conn, team_id, folder, None, MAX_LIST + 1 - len(out))
            out.extend(folder_info(team_id, r["folder"]) if "folder" in r else file_info(r) for r in rows)
    if len(out) > MAX_LIST:
        raise APIError(
            400,
            "too_many_files",
            f"more than {MAX_LIST} entries under {folder}; list a folder deeper in the tree",
            field="path",
        )
    return out


@method("file-storage.list")
async def list_files(call: Call) -> list[dict]:
    team_id = _team(call, call.body)
    recursive = call.body.get("recursive", True)
    if not isinstance(recursive, bool):
        raise APIError(400, "invalid_request", "'recursive' must be true or false", field="recursive")
    return await call.state.db.run_read(_list, call.state, team_id, call.body.get("path"), recursive)


@method("file-storage.info")
async def info(call: Call) -> dict:
    file_id = call.int_field("id")

    def read() -> dict | None:
        with call.state.db.reader() as conn:
            return service.get_by_id(conn, db.DEFAULT_TEAM_ID, file_id)

    row = await call.state.db.run_read(read)
    if row is None:
        raise APIError(404, "file_not_found", f"no team file with id {file_id}")
    return file_info(row)


@method("file-storage.download")
async def download(call: Call):
    team_id = _team(call, call.body)
    raw = call.body.get("path")
    if isinstance(raw, str) and raw.endswith("/"):
        return await _download_folder(call, team_id, service.check_path(raw, "path", folder=True))
    path = service.check_path(raw, "path")

    def read() -> dict | None:
        with call.state.db.reader() as conn:
            return service.get_by_path(conn, team_id, path)

    row = await call.state.db.run_read(read)
    if row is None or not call.state.blobs.exists(row["sha256"]):
        raise APIError(404, "file_not_found", f"no team file {path}", field="path")
    return FileResponse(call.state.blobs.path(row["sha256"]), media_type="application/octet-stream")


async def _download_folder(call: Call, team_id: int, folder: str) -> StreamingResponse:
    """A tar of the folder's files under a top folder named as it (what download_directory unpacks)."""
    state = call.state

    def page(after: str | None) -> list[dict]:
        with state.db.reader() as conn:
            return service.list_files(conn, team_id, folder, after, service.LIST_BATCH)

    first = await state.db.run_read(page, None)
    if not first:
        raise APIError(404, "file_not_found", f"no team files under {folder}", field="path")
    top = folder.rstrip("/").rsplit("/", 1)[1] or "files"

    async def stream():
        rows = first
        while rows:
            for r in rows:
                ti = tarfile.TarInfo(top + "/" + r["path"][len(folder) :])
                ti.size, ti.mtime, ti.mode = r["size"], int(r["updated_at"]), 0o644
                yield ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                with open(state.blobs.path(r["sha256"]), "rb") as f:
                    while piece := f.read(TAR_PIECE):
                        yield piece
                if r["size"] % tarfile.BLOCKSIZE:
                    yield b"\0" * (tarfile.BLOCKSIZE - r["size"] % tarfile.BLOCKSIZE)
            rows = await state.db.run_read(page, rows[-1]["path"]) if len(rows) == service.LIST_BATCH else []
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    return StreamingResponse(stream(), media_type="application/x-tar")


# --- removing ---


def _remove(state, team_id: int, paths: list[str]) -> int:
    with state.db.engine.begin() as conn:
        return sum(service.remove(conn, team_id, p) for p in paths)


def _removal_path(raw, field: str) -> str:
    folder = isinstance(raw, str) and raw.endswith("/")
    return service.check_path(raw, field, folder=folder)


@method("file-storage.remove")
async def remove(call: Call) -> dict:
    team_id = _team(call, call.body)
    path = _removal_path(call.body.get("path"), "path")
    if path == "/":
        raise APIError(400, "bad_path", "path may not be the root folder", field="path")
    await call.state.db.run(_remove, call.state, team_id, [path])
    return {"success": True}


@method("file-storage.bulk.remove")
async def bulk_remove(call: Call) -> dict:
    team_id = _team(call, call.body)
    paths = call.body.get("paths")
    if not isinstance(paths, list) or not 1 <= len(paths) <= MAX_REMOVE:
        raise APIError(400, "invalid_request", f"'paths' must be a list of 1 to {MAX_REMOVE} paths", field="paths")
    checked = [_removal_path(p, f"paths.{i}") for i, p in enumerate(paths)]
    if "/" in checked:
        raise APIError(400, "bad_path", "paths may not hold the root folder", field="paths")
    await call.state.db.run(_remove, call.state, team_id, checked)
    return {"success": True}
