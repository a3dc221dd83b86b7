"""Public API methods (server/public/registry.py): the read side, as SDK 6.74.51 calls it.

Teams, workspaces, projects, datasets, images and annotations are listed and read with the
SDK's request fields; image bytes are streamed from the blob files. The App's token reads every
project of the team (there is one team).

Lists answer `{total, perPage, pagesCount, entities, after}`:
- `page` (from 1) and `per_page` page them as `ModuleApiBase.get_list_all_pages` and the async
  generators expect; a `per_page` over PER_PAGE_MAX is answered with PER_PAGE_MAX (the SDK pages
  on with the `perPage` we answer);
- `pagination_mode: "token"` pages them by id as `get_list_all_pages_generator` does: each
  answer's `after` (the page's last id) is sent back for the next page, and is null on the last
  page (in this mode the order is by id whatever `sort` says: the SDK notes sort does not apply);
- `filter: [{field, operator, value}]` narrows them (id and name; `=`, `!=`, `in`, `!in`, and
  `<`, `<=`, `>`, `>=` for ids), `sort`/`sort_order` orders them (id or name; asc or desc).

Bounds: at most MAX_IDS ids per list or filter, MAX_FILTERS filters, MAX_ANN_IDS annotations per
`annotations.bulk.info` (each may be 1 MiB: they are read and written a few at a time).
Unknown ids are a 404 naming them (the SDK's `get_info_by_id` turns a 404 into None); a bad
field is a 400 naming it.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterator
from typing import NamedTuple

from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import false, func, select

from protocol.errors import APIError
from server import db
from server.blobs.bulk import PIECE, file_pieces, read_whole
from server.http.strict import ID_MAX, dumps_bytes
from server.public import infos
from server.public.registry import Call, is_id, method

# The instance version `instance.version` answers: the newest one the SDK's own versions.json
# (6.74.51) maps to an SDK release, so `Api._check_version` finds the instance new enough and
# logs no warning. The SDK's workflow calls it then enables fail softly (they catch errors).
INSTANCE_VERSION = "6.18.3"

PER_PAGE_DEFAULT = 500  # supervisely/api/image_api.py: API_DEFAULT_PER_PAGE
PER_PAGE_MAX = 1000
MAX_IDS = 10_000
MAX_FILTERS = 20
MAX_NAME = 1024  # the longest name a row holds (project_items.name)
MAX_ANN_IDS = 500  # the SDK asks for 50 (at most 100) per call
ANN_CHUNK = 50  # annotations read from the database and written out at once
ID_BATCH = 500  # ids per IN (...) query

_OPS = {"=", "!=", "in", "!in", "<", "<=", ">", ">="}
_NAME_OPS = {"=", "!=", "in", "!in"}
_SORTS = {"id", "name", "createdAt", "updatedAt"}  # every row's times are its project's: they order as ids


# --- request fields ---


def _bad(field: str, why: str) -> APIError:
    return APIError(400, "invalid_request", f"{field!r} {why}")


def _id_list(call: Call, name: str, most: int = MAX_IDS) -> list[int]:
    v = call.body.get(name)
    if not isinstance(v, list):
        raise _bad(name, "must be a list of ids")
    if len(v) > most:
        raise _bad(name, f"holds {len(v)} ids; at most {most} per call")
    for i, x in enumerate(v):
        if not is_id(x):
            raise _bad(f"{name}[{i}]", f"must be an id (an integer from 0 to {ID_MAX})")
    return v


def _flag(call: Call, name: str) -> bool:
    v = call.body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(name, "must be true or false")
    return v


class Paging(NamedTuple):
    page: int
    per_page: int
    after: int | None  # token mode: the last id of the previous page, None for the first
    token: bool  # `pagination_mode: "token"` (or an `after`): pages by id, answers the next `after`

    def rows(self, q, id_col, order: list):
        """`q` (ordered by `order`) narrowed to this page: by OFFSET, or in token mode the ids past
        `after` in id order, one row more than a page to tell whether another follows."""
        if not self.token:
            return q.order_by(*order).offset((self.page - 1) * self.per_page).limit(self.per_page)
        if self.after is not None:
            q = q.where(id_col > self.after)
        return q.order_by(id_col).limit(self.per_page + 1)

    def cut(self, rows: list) -> tuple[list, int | None]:
        """(the page's rows, the next `after`): in token mode the extra row says there is more."""
        if not self.token or len(rows) <= self.per_page:
            return rows, None
        rows = rows[: self.per_page]
        return rows, rows[-1]["id"]


def _paging(call: Call) -> Paging:
    """The paging fields of a list request."""
    page = call.int_field("page", required=False, default=1)
    if page < 1:
        raise _bad("page", "must be at least 1")
    per_page = call.int_field("per_page", required=False, default=None)
    if per_page is None:
        per_page = call.int_field("perPage", required=False, default=PER_PAGE_DEFAULT)
    if per_page < 1:
        raise _bad("per_page", "must be at least 1")
    after = call.int_field("after", required=False)
    mode = call.body.get("pagination_mode")
    if mode not in (None, "token"):
        raise _bad("pagination_mode", "must be 'token' or absent")
    return Paging(page, min(per_page, PER_PAGE_MAX), after, mode == "token" or after is not None)


def _parse_filters(call: Call, fields: set[str]) -> list[tuple[str, str, object]]:
    """The `filter` list checked: (field, operator, value) for fields of `fields`."""
    raw = call.body.get("filter")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("filter", "must be a list of {field, operator, value}")
    if len(raw) > MAX_FILTERS:
        raise _bad("filter", f"holds {len(raw)} filters; at most {MAX_FILTERS}")
    out = []
    for i, f in enumerate(raw):
        where = f"filter[{i}]"
        if not isinstance(f, dict):
            raise _bad(where, "must be an object {field, operator, value}")
        field, op, value = f.get("field"), f.get("operator"), f.get("value")
        if not isinstance(field, str) or field not in fields:
            raise _bad(f"{where}.field", f"must be one of {sorted(fields)} (got {str(field)[:60]!r})")
        if not isinstance(op, str) or op not in _OPS:
            raise _bad(f"{where}.operator", f"must be one of {sorted(_OPS)} (got {str(op)[:20]!r})")
        _check_value(where, field, op, value)
        out.append((field, op, value))
    return out


def _check_value(where: str, field: str, op: str, value) -> None:
    """400 naming `where` unless `value` suits the field and operator."""
    if field in ("parentId", "name") and op not in _NAME_OPS:
        raise _bad(f"{where}.operator", f"for {field} must be one of {sorted(_NAME_OPS)}")
    if field == "parentId":  # datasets are never nested: only null is a parent
        ok, kind = (lambda x: x is None or is_id(x)), "null or an id"
    elif field == "name":
        ok, kind = (lambda x: isinstance(x, str) and len(x) <= MAX_NAME), f"a name (at most {MAX_NAME} characters)"
    else:
        ok, kind = is_id, f"an id (0 to {ID_MAX})"
    if op not in ("in", "!in"):
        if not ok(value):
            raise _bad(f"{where}.value", f"must be {kind}")
        return
    if not isinstance(value, list) or len(value) > MAX_IDS:
        raise _bad(f"{where}.value", f"must be a list of at most {MAX_IDS} values")
    for j, x in enumerate(value):
        if not ok(x):
            raise _bad(f"{where}.value[{j}]", f"must be {kind}")


def _test(op: str, have, value) -> bool:
    """Whether a row's value `have` meets (op, value): the Python twin of _sql."""
    if op in ("in", "!in"):
        return (have in value) == (op == "in")
    return {
        "=": have == value,
        "!=": have != value,
        "<": have is not None and have < value,
        "<=": have is not None and have <= value,
        ">": have is not None and have > value,
        ">=": have is not None and have >= value,
    }[op]


def _sql(op: str, col, value):
    if op == "in":
        return col.in_(value)
    if op == "!in":
        return col.not_in(value)
    return {"=": col.__eq__, "!=": col.__ne__, "<": col.__lt__, "<=": col.__le__, ">": col.__gt__, ">=": col.__ge__}[
        op
    ](value)


def _filters(call: Call, columns: dict) -> list:
    """The `filter` list as SQL conditions on `columns` ({field: column}). `parentId` is decided
    here (every dataset's is null): a filter no row meets becomes a false condition."""
    out = []
    for field, op, value in _parse_filters(call, set(columns)):
        if field == "parentId":
            if not _test(op, None, value):
                out.append(false())
            continue
        out.append(_sql(op, columns[field], value))
    return out


def _order(call: Call, id_col, name_col) -> list:
    sort = call.body.get("sort") or "id"
    order = call.body.get("sort_order") or "asc"
    if not isinstance(sort, str) or sort not in _SORTS:
        raise _bad("sort", f"must be one of {sorted(_SORTS)}")
    if not isinstance(order, str) or order not in ("asc", "desc"):
        raise _bad("sort_order", "must be 'asc' or 'desc'")
    cols = [name_col, id_col] if sort == "name" else [id_col]
    return [c.desc() for c in cols] if order == "desc" else [c.asc() for c in cols]


def _listing(total: int, per_page: int, entities: list, after: int | None) -> dict:
    return {
        "total": total,
        "perPage": per_page,
        "pagesCount": math.ceil(total / per_page),
        "entities": entities,
        "after": after,
    }


def _all_one(call: Call, row: dict) -> dict:
    """A list of one entity (the team, the workspace): filtered and paged like the others."""
    keep = all(_test(op, row[field], value) for field, op, value in _parse_filters(call, {"id", "name"}))
    paging = _paging(call)
    return _listing(1 if keep else 0, paging.per_page, [row] if keep and paging.page == 1 else [], None)


# --- instance, teams, workspaces ---


@method("instance.version")
async def instance_version(call: Call) -> dict:
    """The instance version the SDK's feature checks compare with (INSTANCE_VERSION)."""
    return {"version": INSTANCE_VERSION}


@method("teams.list")
async def teams_list(call: Call) -> dict:
    return _all_one(call, infos.team_info())


@method("teams.info")
async def teams_info(call: Call) -> dict:
    if call.int_field("id") != db.DEFAULT_TEAM_ID:
        raise APIError(404, "team_not_found", f"no team {call.body['id']}; the one team is {db.DEFAULT_TEAM_ID}")
    return infos.team_info()


@method("workspaces.list")
async def workspaces_list(call: Call) -> dict:
    team = call.int_field("teamId")
    if team != db.DEFAULT_TEAM_ID:
        raise APIError(404, "team_not_found", f"no team {team}; the one team is {db.DEFAULT_TEAM_ID}")
    return _all_one(call, infos.workspace_info())


@method("workspaces.info")
async def workspaces_info(call: Call) -> dict:
    if call.int_field("id") != db.DEFAULT_WORKSPACE_ID:
        raise APIError(
            404,
            "workspace_not_found",
            f"no workspace {call.body['id']}; the one workspace is {db.DEFAULT_WORKSPACE_ID}",
        )
    return infos.workspace_info()


# --- projects ---


def _project_size(conn, pid: int) -> int:
    c = db.project_items.c
    return conn.execute(select(func.coalesce(func.sum(c.size), 0)).where(c.project_id == pid)).scalar_one()


def _project_row(conn, pid: int) -> dict:
    p = db.projects.c
    row = conn.execute(select(p.id, p.name, p.datasets, p.created_at).where(p.id == pid)).mappings().first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return dict(row)


@method("projects.info")
async def projects_info(call: Call) -> dict:
    pid = call.int_field("id")

    def read(state):
        with state.db.reader() as conn:
            row = _project_row(conn, pid)
            return infos.project_info(row, _project_size(conn, pid))

    return await call.state.db.run_read(read, call.state)


@method("projects.meta")
async def projects_meta(call: Call) -> dict:
    pid = call.int_field("id")

    def read(state):
        with state.db.reader() as conn:
            row = conn.execute(select(db.projects.c.meta).where(db.projects.c.id == pid)).first()
        if row is None:
            raise APIError(404, "project_not_found", f"no project {pid}")
        return infos.project_meta(row[0])

    return await call.state.db.run_read(read, call.state)


@method("projects.list")
async def projects_list(call: Call) -> dict:
    """The team's projects (all in its one workspace). Sizes are not summed here: "0"."""
    p = db.projects.c
    ws = call.int_field("workspaceId", required=False)
    team = call.int_field("groupId", required=False)
    conds = _filters(call, {"id": p.id, "name": p.name})
    order = _order(call, p.id, p.name)
    paging = _paging(call)
    if (ws is not None and ws != db.DEFAULT_WORKSPACE_ID) or (team is not None and team != db.DEFAULT_TEAM_ID):
        return _listing(0, paging.per_page, [], None)

    def read(state):
        with state.db.reader() as conn:
            total = conn.execute(select(func.count()).select_from(db.projects).where(*conds)).scalar_one()
            q = paging.rows(select(p.id, p.name, p.datasets, p.created_at).where(*conds), p.id, order)
            return total, [dict(r) for r in conn.execute(q).mappings()]

    total, rows = await call.state.db.run_read(read, call.state)
    rows, nxt = paging.cut(rows)
    return _listing(total, paging.per_page, [infos.project_info(r) for r in rows], nxt)


# --- datasets ---


def _dataset_sizes(conn, pid: int) -> dict[str, int]:
    c = db.project_items.c
    q = select(c.dataset, func.sum(c.size)).where(c.project_id == pid).group_by(c.dataset)
    return {name: int(size or 0) for name, size in conn.execute(q)}


def _counts(conn, pid: int) -> dict[str, int]:
    row = conn.execute(select(db.projects.c.datasets).where(db.projects.c.id == pid)).first()
    return {d["name"]: int(d.get("items_count", 0)) for d in (row[0] if row else [])}


@method("datasets.list")
async def datasets_list(call: Call) -> dict:
    d = db.datasets.c
    pid = call.int_field("projectId")
    conds = _filters(call, {"id": d.id, "name": d.name, "parentId": None})
    order = _order(call, d.id, d.name)
    paging = _paging(call)

    def read(state):
        with state.db.reader() as conn:
            _project_row(conn, pid)
            where = [d.project_id == pid, *conds]
            total = conn.execute(select(func.count()).select_from(db.datasets).where(*where)).scalar_one()
            q = paging.rows(select(d.id, d.project_id, d.name, d.created_at).where(*where), d.id, order)
            rows, nxt = paging.cut([dict(r) for r in conn.execute(q).mappings()])
            counts = _counts(conn, pid)
            sizes = _dataset_sizes(conn, pid) if rows else {}
        return total, [infos.dataset_info(r, counts.get(r["name"], 0), sizes.get(r["name"], 0)) for r in rows], nxt

    total, entities, nxt = await call.state.db.run_read(read, call.state)
    return _listing(total, paging.per_page, entities, nxt)


@method("datasets.info")
async def datasets_info(call: Call) -> dict:
    did = call.int_field("id")

    def read(state):
        with state.db.reader() as conn:
            ds = _dataset(conn, did)
            c = db.project_items.c
            size = conn.execute(
                select(func.coalesce(func.sum(c.size), 0)).where(
                    c.project_id == ds["project_id"], c.dataset == ds["name"]
                )
            ).scalar_one()
            return infos.dataset_info(ds, _counts(conn, ds["project_id"]).get(ds["name"], 0), size)

    return await call.state.db.run_read(read, call.state)


def _dataset(conn, did: int) -> dict:
    ds = infos.dataset_row(conn, did)
    if ds is None:
        raise APIError(404, "dataset_not_found", f"no dataset {did}")
    return ds


# --- images ---

_ITEM = db.project_items.c
_ITEM_COLS = (_ITEM.id, _ITEM.project_id, _ITEM.dataset, _ITEM.name, _ITEM.sha256, _ITEM.size, _ITEM.ann)
# What an image info needs of the annotation, read by the database (SQLite's JSON functions,
# PostgreSQL's json operators): a page of infos never holds its annotations (up to 1 MiB each).
_INFO_COLS = (
    *_ITEM_COLS[:-1],
    _ITEM.ann[("size", "width")].as_integer().label("width"),
    _ITEM.ann[("size", "height")].as_integer().label("height"),
    func.json_array_length(_ITEM.ann["objects"]).label("labels"),
    _ITEM.ann["tags"].label("tags"),
)


def _tag_ids(meta: dict) -> dict[str, int]:
    return {t["name"]: t["id"] for t in meta.get("tags") or [] if isinstance(t, dict) and is_id(t.get("id"))}


def _project_bits(conn, pid: int) -> tuple[float, dict]:
    """(created_at, tag name -> id) of a project: what every image info of it needs."""
    p = db.projects.c
    row = conn.execute(select(p.created_at, p.meta).where(p.id == pid)).first()
    if row is None:
        raise APIError(404, "project_not_found", f"no project {pid}")
    return row[0], _tag_ids(row[1] or {})


@method("images.list")
async def images_list(call: Call) -> dict:
    """Images of a dataset (`datasetId`) or of a whole project (`projectId`)."""
    did = call.int_field("datasetId", required=False)
    pid = call.int_field("projectId", required=False)
    if did is None and pid is None:
        raise _bad("datasetId", "is required (or projectId)")
    if call.body.get("filters"):
        raise _bad("filters", "(objects_class and collection filters) is not supported by this server; use 'filter'")
    conds = _filters(call, {"id": _ITEM.id, "name": _ITEM.name})
    order = _order(call, _ITEM.id, _ITEM.name)
    paging = _paging(call)

    def read(state):
        with state.db.reader() as conn:
            if did is not None:
                ds = _dataset(conn, did)
                if pid is not None and pid != ds["project_id"]:
                    raise APIError(404, "dataset_not_found", f"no dataset {did} in project {pid}")
                project_id, where = (
                    ds["project_id"],
                    [_ITEM.project_id == ds["project_id"], _ITEM.dataset == ds["name"]],
                )
            else:
                project_id, where = pid, [_ITEM.project_id == pid]
            created, tag_ids = _project_bits(conn, project_id)
            if conds:
                total = conn.execute(
                    select(func.count()).select_from(db.project_items).where(*where, *conds)
                ).scalar_one()
            else:  # the summary's counts: a count(*) per page would read the whole dataset each time
                counts = _counts(conn, project_id)
                total = counts.get(ds["name"], 0) if did is not None else sum(counts.values())
            # The page's ids first (the index alone), then their rows: an OFFSET skips index
            # entries, not annotations.
            q = paging.rows(select(_ITEM.id).where(*where, *conds), _ITEM.id, order)
            ids, nxt = paging.cut([{"id": r[0]} for r in conn.execute(q)])
            ids = [r["id"] for r in ids]
            rows = {r["id"]: dict(r) for r in conn.execute(select(*_INFO_COLS).where(_ITEM.id.in_(ids))).mappings()}
            rows = [rows[i] for i in ids if i in rows]
            names = infos.dataset_ids(conn, project_id, {r["dataset"] for r in rows})
        return total, [infos.image_info(r, names.get(r["dataset"]), project_id, created, tag_ids) for r in rows], nxt

    total, entities, nxt = await call.state.db.run_read(read, call.state)
    return _listing(total, paging.per_page, entities, nxt)


def _item(conn, iid: int, cols=_ITEM_COLS) -> dict:
    row = conn.execute(select(*cols).where(_ITEM.id == iid)).mappings().first()
    if row is None:
        raise APIError(404, "image_not_found", f"no image {iid}")
    return dict(row)


@method("images.info")
async def images_info(call: Call) -> dict:
    iid = call.int_field("id")

    def read(state):
        with state.db.reader() as conn:
            item = _item(conn, iid, _INFO_COLS)
            created, tag_ids = _project_bits(conn, item["project_id"])
            did = infos.dataset_ids(conn, item["project_id"], [item["dataset"]]).get(item["dataset"])
        return infos.image_info(item, did, item["project_id"], created, tag_ids)

    return await call.state.db.run_read(read, call.state)


def _items_of_dataset(conn, did: int, ids: list[int], cols=None) -> tuple[dict, dict]:
    """(dataset row, {id: item}) for ids that must all be images of dataset `did`; 404 naming
    the first ids that are not (missing, or in another dataset)."""
    ds = _dataset(conn, did)
    cols = cols or (_ITEM.id, _ITEM.name, _ITEM.sha256, _ITEM.size)
    found: dict[int, dict] = {}
    uniq = list(dict.fromkeys(ids))
    for i in range(0, len(uniq), ID_BATCH):
        q = select(*cols).where(
            _ITEM.id.in_(uniq[i : i + ID_BATCH]), _ITEM.project_id == ds["project_id"], _ITEM.dataset == ds["name"]
        )
        found.update({r["id"]: dict(r) for r in conn.execute(q).mappings()})
    missing = [i for i in uniq if i not in found]
    if missing:
        raise APIError(
            404,
            "image_not_found",
            f"{len(missing)} of the images are not in dataset {did}: {missing[:10]}",
            missing=missing[:100],
        )
    return ds, found


@method("images.download")
async def images_download(call: Call) -> Response:
    """One image's bytes (a `Range` gives 206 with that part); `x-content-checksum-sha256` holds
    the SDK's hash of the whole image, which `download_path_async(check_hash=True)` compares."""
    iid = call.int_field("id")

    def read(state):
        with state.db.reader() as conn:
            return _item(conn, iid, (_ITEM.id, _ITEM.name, _ITEM.sha256, _ITEM.size))

    item = await call.state.db.run_read(read, call.state)
    path = call.state.blobs.path(item["sha256"])
    if not path.is_file():
        raise APIError(404, "image_not_found", f"the bytes of image {iid} are not stored")
    mime = infos.mime_of(item["name"])
    span = _range(call.request.headers.get("range"), item["size"])
    if span is None:
        headers = {"x-content-checksum-sha256": infos.sly_hash(item["sha256"]), "accept-ranges": "bytes"}
        return FileResponse(path, media_type=mime, headers=headers)
    start, end = span
    headers = {"content-range": f"bytes {start}-{end}/{item['size']}", "content-length": str(end - start + 1)}
    return StreamingResponse(_file_part(path, start, end + 1), status_code=206, media_type=mime, headers=headers)


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `Range: bytes=a-b` (or `a-`, `-n`) within `size`, or None for
    the whole file (no header, or several ranges); 416 when it lies outside. Starlette's
    FileResponse serves ranges to GET only, and the SDK POSTs them (`stream_async` resuming)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*", header)
    if m is None or (not m.group(1) and not m.group(2)):
        if header.strip().startswith("bytes=") and "," in header:
            return None
        raise APIError(416, "range_not_satisfiable", f"the Range header {header[:60]!r} is not bytes=first-last")
    first, last = m.group(1), m.group(2)
    if not first:  # the last n bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise APIError(416, "range_not_satisfiable", f"bytes {start}-{end} lie outside the {size} of the image")
    return start, end


def _file_part(path, start: int, stop: int) -> Iterator[bytes]:
    """Bytes [start, stop) of a file in pieces of at most PIECE (a sync generator, run on a thread)."""
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left and (data := f.read(min(PIECE, left))):
            left -= len(data)
            yield data


@method("images.bulk.download")
async def images_bulk_download(call: Call) -> Response:
    """The images of a dataset, one part each of a multipart/form-data answer named by the image
    id, in the order asked (each once), streamed from the blob files."""
    did = call.int_field("datasetId")
    ids = _id_list(call, "imageIds")

    def read(state):
        with state.db.reader() as conn:
            return _items_of_dataset(conn, did, ids)[1]

    found = await call.state.db.run_read(read, call.state)
    parts = [(i, found[i]) for i in dict.fromkeys(ids)]
    boundary = secrets.token_hex(16)
    heads = [_part_head(boundary, i, it) for i, it in parts]
    end = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + it["size"] + 2 for h, (_, it) in zip(heads, parts, strict=True)) + len(end)
    return StreamingResponse(
        _multipart(call.state.blobs, heads, [it for _, it in parts], end),
        media_type=f"multipart/form-data; boundary={boundary}",
        headers={"content-length": str(length)},
    )


def _part_head(boundary: str, iid: int, item: dict) -> bytes:
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{iid}"\r\n'
        f"Content-Type: {infos.mime_of(item['name'])}\r\n"
        f"x-content-checksum-sha256: {infos.sly_hash(item['sha256'])}\r\n\r\n"
    ).encode()


def _multipart(store, heads: list[bytes], items: list[dict], end: bytes) -> Iterator[bytes]:
    """The multipart body, read from the store in pieces of about PIECE bytes (a sync generator:
    the response runs it on a thread). A blob gone since the listing ends the body there, short
    of its content-length: the client sees a cut answer and retries."""
    pieces: list[bytes] = []
    held = 0
    for head, it in zip(heads, items, strict=True):
        size = it["size"]
        if pieces and held + size > PIECE:
            yield b"".join(pieces)
            pieces, held = [], 0
        if size <= PIECE:
            data = read_whole(store.path(it["sha256"]), size)
            if data is None:
                break
            pieces += (head, data, b"\r\n")
            held += len(head) + size + 2
            continue
        try:
            f = open(store.path(it["sha256"]), "rb")
        except FileNotFoundError:
            break
        with f:
            yield b"".join([*pieces, head])
            pieces, held = [], 0
            if (yield from file_pieces(f, size)) < size:
                return
        pieces, held = [b"\r\n"], 2
    else:
        pieces.append(end)
    if pieces:
        yield b"".join(pieces)


# --- annotations ---


@method("annotations.info")
async def annotations_info(call: Call) -> dict:
    iid = call.int_field("imageId")

    def read(state):
        with state.db.reader() as conn:
            item = _item(conn, iid)
            created, _ = _project_bits(conn, item["project_id"])
            did = infos.dataset_ids(conn, item["project_id"], [item["dataset"]]).get(item["dataset"])
        return infos.annotation_info(item, did, created)

    return await call.state.db.run_read(read, call.state)


@method("annotations.bulk.info")
async def annotations_bulk_info(call: Call) -> Response:
    """The annotations of images of a dataset, in the order asked (each once). Checked first (every
    id must be an image of the dataset: else a 404 naming them), then read and written ANN_CHUNK
    at a time, so a call holds a few annotations in memory, not MAX_ANN_IDS of them."""
    did = call.int_field("datasetId")
    ids = list(dict.fromkeys(_id_list(call, "imageIds", MAX_ANN_IDS)))

    def check(state):
        with state.db.reader() as conn:
            ds, _ = _items_of_dataset(conn, did, ids, cols=(_ITEM.id,))
            created, _ = _project_bits(conn, ds["project_id"])
            return ds, created

    ds, created = await call.state.db.run_read(check, call.state)
    return StreamingResponse(_annotations(call.state, ds, created, ids), media_type="application/json")


def _annotations(state, ds: dict, created: float, ids: list[int]) -> Iterator[bytes]:
    """The JSON list of annotation infos, ANN_CHUNK rows per query (a sync generator, run on a
    thread). A row deleted since the check is left out."""
    yield b"["
    first = True
    for i in range(0, len(ids), ANN_CHUNK):
        chunk = ids[i : i + ANN_CHUNK]
        with state.db.reader() as conn:
            rows = {r["id"]: dict(r) for r in conn.execute(select(*_ITEM_COLS).where(_ITEM.id.in_(chunk))).mappings()}
        out = []
        for iid in chunk:
            if iid in rows:
                out.append(dumps_bytes(infos.annotation_info(rows[iid], ds["id"], created)))
        if out:
            yield (b"" if first else b",") + b",".join(out)
            first = False
    yield b"]"
