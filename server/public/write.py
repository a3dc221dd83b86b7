"""Public API methods (server/public/registry.py): write. What the SDK's `api.project.create`,
`update_meta`, `api.dataset.create`, `api.image.upload_paths/upload_np/upload_hashes/upload_ids`,
`api.annotation.upload_anns/upload_paths/upload_jsons`, `copy_batch_by_ids` and
`sly.upload_project` call:

- `projects.add`, `projects.meta.update`, `datasets.add`;
- `images.internal.hashes.list` (which of these images the server has), `images.bulk.upload` (their
  bytes, a multipart body streamed into the blob store), `images.bulk.add` (items into a dataset, by
  hash or by the id of an image to copy);
- `annotations.bulk.add`, `annotations.bulk.copy`.

Rules every method keeps:
- **Reading grants nothing.** An App names by hash or id only images it may read: any project's
  (there is one team), its own uploads (refs.APP_UPLOAD, owner = its task) and team files. A hash
  it may not read is answered exactly as one the store does not hold, so guessing a hash reveals
  nothing and copies nothing.
- **All or nothing.** A request is checked whole before anything is stored; a 400 names the
  entry at fault (its index and name or id) and nothing of the request is stored. Uploaded bytes
  are the one exception: every complete part of a multipart body is a valid blob and is kept.
- **Bounded.** Entries per request, parts and bytes per upload, header sizes: each has a bound
  (below), well above what the SDK sends (50 images or annotations, 900 hashes per request).
- **The SDK's shapes.** Hashes are the SDK's (base64 of the sha256, infos.sha256_of; a hex sha256
  is taken too); annotations arrive in subpixel coordinates and are stored in pixel ones
  (infos.ann_to_pixel); a name taken in a dataset is answered as Supervisely answers it, 400 with
  `details: {type: "NONUNIQUE", errors: [{name, id}]}`, which the SDK's `conflict_resolution` reads.

Left out (400 naming them): links and blob-offset images, nested datasets (`parentId`), project
types other than images. An image's `meta` (custom data) is accepted and not stored: no column
holds it.
"""

from __future__ import annotations

import time

from sqlalchemy import bindparam, insert, select, text, update
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from protocol import bulk
from protocol.errors import APIError
from protocol.sly_format import BadFormat, Budget, Meta, check_ann, check_meta, empty_ann, empty_meta
from server import db
from server.blobs import refs as blob_refs
from server.blobs.store import SHA256_RE, BlobStore
from server.files import intake, multipart
from server.http.fields import check_relpath
from server.http.strict import ID_MAX
from server.projects import service
from server.projects.images import image_size
from server.public import infos
from server.public.registry import Call, is_id, method

MAX_ENTRIES = 1000  # images or annotations per images.bulk.add / annotations.bulk.add / .copy (the SDK: 50)
MAX_HASHES = 10_000  # hashes per images.internal.hashes.list (the SDK: 900)
MAX_PARTS = 1000  # parts of one images.bulk.upload (the SDK: 50)
MAX_UPLOAD_BYTES = bulk.MAX_BYTES  # image bytes of one images.bulk.upload, as one bulk blob upload
ID_BATCH = 500  # ids per query (SQLite binds a bounded number of parameters)
SCAN_PAGE = 500  # stored annotations read at once when a meta change is checked against them
# PostgreSQL: projects.add holds this advisory lock while it checks that the name is free and inserts.
PROJECT_NAME_LOCK = 0x5157_0001


# --- fields ----------------------------------------------------------------------------------------


def _id(v, where: str) -> int:
    """An id-sized integer of a body's nested entry, or a 400 naming it."""
    if not is_id(v):
        raise APIError(400, "invalid_request", f"{where} must be an id (an integer from 0 to {ID_MAX})")
    return v


def _list(body: dict, name: str, most: int) -> list:
    """A required non-empty list field of at most `most` entries."""
    v = body.get(name)
    if not isinstance(v, list) or not v:
        raise APIError(400, "invalid_request", f"{name!r} must be a non-empty list")
    if len(v) > most:
        raise APIError(400, "too_many_entries", f"{name!r} has {len(v)} entries; one request takes at most {most}")
    return v


def _name(v, what: str) -> str:
    """A name that is one safe path component (the agent makes a file or folder of it)."""
    if not isinstance(v, str):
        raise APIError(400, "invalid_request", f"{what} must be a string")
    return check_relpath(v, what, single=True)


def _text(body: dict, name: str) -> None:
    """An optional text field we accept and do not store (a description, a readme)."""
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise APIError(400, "invalid_request", f"{name!r} must be a string")


def _no_parent(v, where: str) -> None:
    if v is not None:
        raise APIError(400, "not_supported", f"{where}: nested datasets are not supported by this server")


def _sha256(h, where: str) -> str:
    """The hex sha256 an image hash names: the SDK's base64 form, or hex."""
    if isinstance(h, str) and SHA256_RE.fullmatch(h):
        return h
    sha = infos.sha256_of(h)
    if sha is None:
        raise APIError(400, "bad_hash", f"{where}: hash must be the SDK's (base64 of a sha256, 44 characters)")
    return sha


def _nonunique(taken: list[tuple[str, int]], what: str) -> APIError:
    """Supervisely's answer to names taken already (the SDK reads `details.type` and `.errors`)."""
    names = ", ".join(repr(n) for n, _ in taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
    return APIError(
        400,
        "name_taken",
        f"{what} {names} exist(s) already",
        type="NONUNIQUE",
        errors=[{"name": n, "id": i} for n, i in taken],
    )


def _ann_size(ann) -> tuple[int | None, int | None]:
    size = ann.get("size") if isinstance(ann, dict) else None
    if not isinstance(size, dict):
        return None, None
    return size.get("height"), size.get("width")


# --- blobs the App may read --------------------------------------------------------------------------


def _readable(state, task_id: int, hashes) -> set[str]:
    with state.db.reader() as conn:
        return blob_refs.app_readable(conn, task_id, hashes)


@method("images.internal.hashes.list", http="RAW")
async def hashes_list(call: Call):
    """Which of the posted hashes (a JSON list: the one method whose body is not an object) name an
    image the App may read; answered as posted, in order. What it may not read is answered as absent."""
    posted = call.request.scope.get("sly.json")  # decoded and checked by the body middleware
    if not isinstance(posted, list):
        raise APIError(400, "invalid_request", "the body must be a JSON list of image hashes")
    if len(posted) > MAX_HASHES:
        raise APIError(400, "too_many_entries", f"{len(posted)} hashes; one request takes at most {MAX_HASHES}")
    shas = [_sha256(h, f"hash {i}") for i, h in enumerate(posted)]
    ok = await call.state.db.run(_readable, call.state, call.task["id"], shas)
    present = await run_in_threadpool(lambda: {h for h in ok if call.state.blobs.exists(h)})
    return [h for h, sha in zip(posted, shas, strict=True) if sha in present]


# --- images.bulk.upload: a multipart body streamed into the blob store ----------------------------------


@method("images.bulk.upload", http="STREAM")
async def images_bulk_upload(call: Call):
    """Image bytes, one per part of a multipart body (the SDK's `_upload_uniq_images_single_req`):
    each is hashed as it streams into the store (server/files: the team files' reader and intake);
    answered `[{"hash"}]` per part in order, the SDK's hash of the bytes that came (the SDK compares
    it with its own). The stored ones count as the App's uploads (refs.APP_UPLOAD) also when the
    body then fails: what was stored stays stored."""
    reader = multipart.MultipartReader(
        call.request.stream(), multipart.boundary_of(call.request.headers.get("content-type", ""))
    )
    stored: list[str] = []
    failure: APIError | None = None
    try:
        await _read_parts(call.state.blobs, reader, stored)
    except ClientDisconnect:
        failure = APIError(400, "incomplete_upload", "the client went away before the upload ended")
    except APIError as e:
        failure = APIError(e.status or 400, e.code, f"part {len(stored)}: {e.detail}; the parts before it are stored")
    if stored:
        await call.state.db.run(_record_uploads, call.state, call.task["id"], stored)
    if failure is not None:
        raise failure
    return [{"hash": infos.sly_hash(h)} for h in stored]


async def _read_parts(store: BlobStore, reader: multipart.MultipartReader, stored: list[str]) -> None:
    total = 0
    # A part's headers (its field name and file name) say nothing its place in the body does not.
    async for part in reader:
        if len(stored) >= MAX_PARTS:
            raise APIError(400, "too_many_entries", f"more than {MAX_PARTS} parts; send them in several requests")
        sha, size = await intake.receive(
            store, part.chunks(), MAX_UPLOAD_BYTES - total, what=f"the upload (past {MAX_UPLOAD_BYTES} bytes)"
        )
        total += size
        stored.append(sha)


def _record_uploads(state, task_id: int, hashes: list[str]) -> None:
    with state.db.engine.begin() as conn:
        blob_refs.add(conn, blob_refs.APP_UPLOAD, task_id, hashes)


# --- projects and datasets ---------------------------------------------------------------------------


@method("projects.add")
async def projects_add(call: Call):
    """A new, empty images project in the one workspace, made by this App's task (`projects.task_id`).
    A name taken already is a 400 (the SDK picks a free one itself with `change_name_if_conflict`)."""
    body = call.body
    ws = call.int_field("workspaceId")
    if ws != db.DEFAULT_WORKSPACE_ID:
        raise APIError(404, "workspace_not_found", f"no workspace {ws}; this server has one, {db.DEFAULT_WORKSPACE_ID}")
    name = _name(body.get("name"), "project name")
    kind = body.get("type", infos.PROJECT_TYPE)
    if kind != infos.PROJECT_TYPE:
        raise APIError(400, "not_supported", f"project type {str(kind)[:50]!r}: this server holds images projects only")
    _text(body, "description")
    _text(body, "readme")
    return await call.state.db.run(_add_project, call.state, name, call.task["id"])


def _add_project(state, name: str, task_id: int) -> dict:
    p = db.projects.c
    with state.db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PROJECT_NAME_LOCK})
        # Inserted first, then checked: on SQLite the insert takes the write lock, so of two adds of
        # one name the later one sees the earlier and rolls back (PostgreSQL: the lock above).
        row = {"name": name, "meta": empty_meta(), "datasets": [], "task_id": task_id, "created_at": time.time()}
        pid = conn.execute(insert(db.projects).values(**row)).inserted_primary_key[0]
        other = conn.execute(select(p.id).where(p.name == name, p.id != pid).limit(1)).first()
        if other is not None:
            raise _nonunique([(name, other[0])], "project")
        row = conn.execute(select(db.projects).where(p.id == pid)).mappings().one()
    return infos.project_info(dict(row))


@method("datasets.add")
async def datasets_add(call: Call):
    """A new, empty dataset of a project (not nested); a name the project holds already is a 400."""
    pid = call.int_field("projectId")
    name = _name(call.body.get("name"), "dataset name")
    _no_parent(call.body.get("parentId"), "parentId")
    _text(call.body, "description")
    return await call.state.db.run(_add_dataset, call.state, pid, name)


def _add_dataset(state, pid: int, name: str) -> dict:
    with state.db.engine.begin() as conn:
        summary = [dict(d) for d in service.lock_project(conn, pid)]
        taken = next((d for d in summary if d["name"] == name), None)
        if taken is not None:
            raise _nonunique([(name, taken.get("id"))], "dataset")
        did = service.insert_dataset(conn, pid, name, time.time())
        summary.append({"name": name, "items_count": 0, "id": did})
        conn.execute(update(db.projects).where(db.projects.c.id == pid).values(datasets=summary))
        row = infos.dataset_row(conn, did)
    return infos.dataset_info(row, 0)


@method("projects.meta.update")
async def projects_meta_update(call: Call):
    """Replace a project's meta; answered with the stored meta. Checked as any meta
    (protocol.sly_format.check_meta), and refused (400, naming an image) when a stored annotation
    would not fit it: a class removed or given another shape, a tag removed or changed."""
    pid = call.int_field("id")
    meta = call.body.get("meta")
    try:
        checked = await run_in_threadpool(check_meta, meta)
    except BadFormat as e:
        raise APIError(400, e.code, str(e)) from None
    await call.state.db.run(_update_meta, call.state, pid, meta, checked)
    return infos.project_meta(meta)


@method("projects.settings.update")
async def projects_settings_update(call: Call):
    """A project's settings (`update_meta` sends them when the meta has `projectSettings`: image
    grouping, the labeling interface). Accepted for an existing project and not stored: no
    column holds them, and the meta keeps its own `projectSettings`."""
    pid = call.int_field("id")
    if not isinstance(call.body.get("settings"), dict):
        raise APIError(400, "invalid_request", "'settings' must be an object")

    def exists() -> None:
        with call.state.db.reader() as conn:
            service.check_exists(conn, pid)

    await call.state.db.run(exists)
    return {"success": True}


def _update_meta(state, pid: int, meta: dict, checked: Meta) -> None:
    with state.db.engine.begin() as conn:
        service.lock_project(conn, pid)  # no annotation is added while the stored ones are checked
        try:
            old = check_meta(service.project_meta(conn, pid))
        except BadFormat:  # a meta stored before the checks existed: nothing to compare with
            old = Meta({}, {})
        classes = {t for t, shape in old.classes.items() if checked.classes.get(t) != shape}
        tags = {n for n, (vt, vals) in old.tags.items() if not _tag_kept(checked.tags.get(n), vt, vals)}
        if classes or tags:
            _check_stored(conn, pid, checked, classes, tags)
        conn.execute(update(db.projects).where(db.projects.c.id == pid).values(meta=meta))
        service.bump_revision(conn, pid)


def _tag_kept(new, vt: str, values) -> bool:
    """Whether every value a tag meta (vt, values) allowed is still allowed by `new`."""
    if new is None or new[0] != vt:
        return False
    return vt != "oneof_string" or values <= new[1]


def _check_stored(conn, pid: int, meta: Meta, classes: set[str], tags: set[str]) -> None:
    """Check against the new meta the stored annotations that use a changed class or tag, a page
    at a time; the first that does not fit is a 400 naming it. Only a meta change that is not
    purely additive costs this read of the project."""
    c = db.project_items.c
    after = 0
    while True:
        q = select(c.id, c.dataset, c.name, c.ann).where(c.project_id == pid, c.id > after)
        page = conn.execute(q.order_by(c.id).limit(SCAN_PAGE)).all()
        for iid, dataset, name, ann in page:
            if _uses(ann, classes, tags):
                try:
                    check_ann(ann, meta, f"image {iid} ({name!r}, dataset {dataset!r})")
                except BadFormat as e:
                    raise APIError(
                        400, "meta_conflict", f"the new meta does not fit a stored annotation: {e}"
                    ) from None
        if len(page) < SCAN_PAGE:
            return
        after = page[-1][0]


def _uses(ann, classes: set[str], tags: set[str]) -> bool:
    if not isinstance(ann, dict):
        return False
    tag_lists = [ann.get("tags") or []]
    for o in ann.get("objects") or []:
        if isinstance(o, dict):
            if o.get("classTitle") in classes:
                return True
            tag_lists.append(o.get("tags") or [])
    if tags:
        for tl in tag_lists:
            for t in tl if isinstance(tl, list) else ():
                if (t.get("name") if isinstance(t, dict) else t) in tags:
                    return True
    return False


# --- images.bulk.add ---------------------------------------------------------------------------------


@method("images.bulk.add")
async def images_bulk_add(call: Call):
    """Add images to a dataset, each `{title, hash}` (bytes uploaded or stored already) or
    `{title, imageId}` (a copy of an image: the same blob, the empty annotation of its size; the
    SDK copies annotations itself). Each new item gets the empty annotation sized from its image.
    Answered with the new images' infos, in order. A name the dataset holds is a 400 NONUNIQUE."""
    dataset_id = call.int_field("datasetId")
    wanted = _image_entries(_list(call.body, "images", MAX_ENTRIES))
    state = call.state
    dataset, sources = await state.db.run(_image_sources, state, call.task["id"], dataset_id, wanted)
    items = await run_in_threadpool(_new_items, state.blobs, wanted, sources)
    rows, created_at = await state.db.run(_append_images, state, dataset, items)
    return [infos.image_info(r, dataset_id, dataset["project_id"], created_at) for r in rows]


def _image_entries(entries: list) -> list[tuple[str, str | None, int | None]]:
    """(title, sha256 or None, source image id or None) per entry, checked."""
    out, names = [], set()
    for i, e in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise APIError(400, "invalid_request", f"{where} must be an object {{title, hash | imageId}}")
        title = _name(e.get("title"), f"{where}.title")
        if title in names:
            raise APIError(400, "duplicate_name", f"{where}: the name {title!r} appears twice in the request")
        names.add(title)
        if any(e.get(k) is not None for k in ("link", "teamFileId", "sourceBlob")):
            raise APIError(400, "not_supported", f"{where} ({title!r}): images by link or blob offset are unsupported")
        _no_parent(e.get("parentId"), where)
        if e.get("meta") is not None and not isinstance(e["meta"], dict):
            raise APIError(400, "invalid_request", f"{where}.meta must be an object")
        has_hash, has_id = e.get("hash") is not None, e.get("imageId") is not None
        if has_hash == has_id:
            raise APIError(400, "invalid_request", f"{where} ({title!r}) needs exactly one of 'hash' and 'imageId'")
        if has_hash:
            out.append((title, _sha256(e["hash"], f"{where} ({title!r})"), None))
        else:
            out.append((title, None, _id(e["imageId"], f"{where}.imageId")))
    return out


def _image_sources(state, task_id: int, dataset_id: int, wanted) -> tuple[dict, dict]:
    """The dataset's row and {source image id: (sha256, size, height, width)}; a 400 names the
    first entry whose hash the App may not read or whose source image does not exist."""
    with state.db.reader() as conn:
        dataset = infos.dataset_row(conn, dataset_id)
        if dataset is None:
            raise APIError(404, "dataset_not_found", f"no dataset {dataset_id}")
        ok = blob_refs.app_readable(conn, task_id, [sha for _, sha, _ in wanted if sha is not None])
        sources = _items_by_id(conn, [iid for _, _, iid in wanted if iid is not None])
    for i, (title, sha, iid) in enumerate(wanted):
        if sha is not None and sha not in ok:
            raise APIError(
                400,
                "image_not_found",
                f"images[{i}] ({title!r}): no image with hash {infos.sly_hash(sha)} was uploaded "
                "(images.bulk.upload) or is readable by this App",
            )
        if iid is not None and iid not in sources:
            raise APIError(400, "image_not_found", f"images[{i}] ({title!r}): no image {iid}")
    return dataset, sources


def _items_by_id(conn, ids: list[int]) -> dict[int, dict]:
    """{id: {project_id, dataset, name, sha256, size, height, width}} of the stored items named;
    only the annotation's size is read (an annotation may be a megabyte)."""
    c = db.project_items.c
    size = c.ann["size"]
    ids = sorted(set(ids))
    out = {}
    for i in range(0, len(ids), ID_BATCH):
        q = select(c.id, c.project_id, c.dataset, c.name, c.sha256, c.size, size.label("ann_size")).where(
            c.id.in_(ids[i : i + ID_BATCH])
        )
        for r in conn.execute(q).mappings():
            d = dict(r)
            d["height"], d["width"] = _ann_size({"size": d.pop("ann_size")})
            out[d["id"]] = d
    return out


def _new_items(store: BlobStore, wanted, sources: dict) -> list[dict]:
    """The rows of the new items (name, sha256, size, empty annotation); image headers read here
    (a worker thread), once per blob."""
    sizes: dict[str, tuple] = {}
    items = []
    for i, (title, sha, iid) in enumerate(wanted):
        if sha is not None:
            size = store.size(sha)
            if size is None:
                raise APIError(400, "image_not_found", f"images[{i}] ({title!r}): the image's bytes are not stored")
            if sha not in sizes:
                sizes[sha] = image_size(store.path(sha))
            hw = sizes[sha]
        else:
            src = sources[iid]
            sha, size, hw = src["sha256"], src["size"], (src["height"], src["width"])
        items.append({"name": title, "sha256": sha, "size": size, "ann": empty_ann(*hw)})
    return items


def _append_images(state, dataset: dict, items: list[dict]) -> tuple[list[dict], float]:
    pid, name = dataset["project_id"], dataset["name"]
    c = db.project_items.c
    names = [it["name"] for it in items]
    with state.db.engine.begin() as conn:
        service.lock_project(conn, pid)
        taken = []
        for i in range(0, len(names), ID_BATCH):
            q = select(c.name, c.id).where(c.project_id == pid, c.dataset == name, c.name.in_(names[i : i + ID_BATCH]))
            taken += [tuple(r) for r in conn.execute(q)]
        if taken:
            raise _nonunique(taken, f"dataset {name!r}: image(s)")
        service.append_items(conn, pid, name, items)
        ids = {}
        for i in range(0, len(names), ID_BATCH):
            q = select(c.name, c.id).where(c.project_id == pid, c.dataset == name, c.name.in_(names[i : i + ID_BATCH]))
            ids.update(dict(conn.execute(q).all()))
        created_at = conn.execute(select(db.projects.c.created_at).where(db.projects.c.id == pid)).scalar_one()
    return [{"id": ids[it["name"]], **it} for it in items], created_at


# --- annotations -------------------------------------------------------------------------------------


@method("annotations.bulk.add")
async def annotations_bulk_add(call: Call):
    """Set the annotations of images of one dataset (`[{imageId, annotation}]`, subpixel
    coordinates as the SDK sends them). Each is checked against the project's meta and must have
    its image's size; one that does not fit is a 400 naming the image, and none of the batch is
    stored."""
    dataset_id = call.int_field("datasetId")
    entries = _list(call.body, "annotations", MAX_ENTRIES)
    posted, seen = [], set()
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("annotation"), dict):
            raise APIError(400, "invalid_request", f"annotations[{i}] must be an object {{imageId, annotation}}")
        iid = _id(e.get("imageId"), f"annotations[{i}].imageId")
        if iid in seen:
            raise APIError(400, "invalid_request", f"annotations[{i}]: image {iid} appears twice in the request")
        seen.add(iid)
        posted.append((iid, e["annotation"]))
    # Stored in pixel coordinates (infos' docstring); copying a batch of annotations is CPU work.
    pairs = await run_in_threadpool(lambda: [(iid, infos.ann_to_pixel(a)) for iid, a in posted])
    state = call.state
    dataset, targets = await state.db.run(_targets, state, dataset_id, [iid for iid, _ in pairs])
    await _store_anns(state, dataset["project_id"], pairs, targets)
    return {"success": True}


def _targets(state, dataset_id: int, ids: list[int]) -> tuple[dict, dict]:
    """The dataset's row and its named images (`_items_by_id`); a 400 names an image not in it."""
    with state.db.reader() as conn:
        dataset = infos.dataset_row(conn, dataset_id)
        if dataset is None:
            raise APIError(404, "dataset_not_found", f"no dataset {dataset_id}")
        items = _items_by_id(conn, ids)
    for iid in ids:
        it = items.get(iid)
        if it is None or it["project_id"] != dataset["project_id"] or it["dataset"] != dataset["name"]:
            raise APIError(400, "image_not_found", f"image {iid} is not an image of dataset {dataset_id}")
    return dataset, items


async def _store_anns(state, pid: int, pairs: list[tuple[int, dict]], targets: dict) -> None:
    """Check the annotations against project `pid`'s meta off the event loop, then store them all in
    one transaction; the meta is read again under the project's lock and, in the rare case it
    changed meanwhile, the check is repeated there."""

    def meta() -> dict:
        with state.db.reader() as conn:
            return service.project_meta(conn, pid)

    checked_meta = await state.db.run(meta)
    await run_in_threadpool(_check_anns, checked_meta, pairs, targets)

    def store() -> None:
        c = db.project_items.c
        with state.db.engine.begin() as conn:
            service.lock_project(conn, pid)
            now = service.project_meta(conn, pid)
            if now != checked_meta:
                _check_anns(now, pairs, targets)
            stmt = update(db.project_items).where(c.id == bindparam("b_id")).values(ann=bindparam("b_ann"))
            conn.execute(stmt, [{"b_id": iid, "b_ann": ann} for iid, ann in pairs])
            service.bump_revision(conn, pid)

    await state.db.run(store)


def _check_anns(meta: dict, pairs: list[tuple[int, dict]], targets: dict) -> None:
    try:
        checked = check_meta(meta)
    except BadFormat as e:  # a meta stored before the checks: say so rather than fail later
        raise APIError(400, "bad_meta", f"the project's stored meta is not valid: {e}") from None
    budget = Budget()  # the bitmaps of one request inflate to a bounded total
    for iid, ann in pairs:
        t = targets[iid]
        where = f"image {iid} ({t['name']!r})"
        try:
            check_ann(ann, checked, where, budget)
        except BadFormat as e:
            raise APIError(400, e.code, str(e)) from None
        got, known = _ann_size(ann), (t["height"], t["width"])
        if None not in known and got != known:
            raise APIError(
                400,
                "bad_annotation",
                f"{where}: the annotation's size is {got[1]}x{got[0]}, the image's is {known[1]}x{known[0]}",
            )


@method("annotations.bulk.copy")
async def annotations_bulk_copy(call: Call):
    """Copy annotations image to image (`srcImageIds`, `destImageIds`, pairwise), each checked as
    annotations.bulk.add checks it against its destination's project meta and size."""
    src = _list(call.body, "srcImageIds", MAX_ENTRIES)
    dst = _list(call.body, "destImageIds", MAX_ENTRIES)
    if len(src) != len(dst):
        raise APIError(400, "invalid_request", "srcImageIds and destImageIds must have the same length")
    src = [_id(v, f"srcImageIds[{i}]") for i, v in enumerate(src)]
    dst = [_id(v, f"destImageIds[{i}]") for i, v in enumerate(dst)]
    if len(set(dst)) != len(dst):
        raise APIError(400, "invalid_request", "destImageIds names an image twice")
    state = call.state
    anns, targets = await state.db.run(_copy_sources, state, src, dst)
    by_project: dict[int, list[tuple[int, dict]]] = {}
    for s, d in zip(src, dst, strict=True):
        by_project.setdefault(targets[d]["project_id"], []).append((d, anns[s]))
    for pid, pairs in by_project.items():
        await _store_anns(state, pid, pairs, targets)
    return {"success": True}


def _copy_sources(state, src: list[int], dst: list[int]) -> tuple[dict, dict]:
    c = db.project_items.c
    anns: dict[int, dict] = {}
    with state.db.reader() as conn:
        ids = sorted(set(src))
        for i in range(0, len(ids), ID_BATCH):
            anns.update(dict(conn.execute(select(c.id, c.ann).where(c.id.in_(ids[i : i + ID_BATCH]))).all()))
        targets = _items_by_id(conn, dst)
    for name, ids, found in (("srcImageIds", src, anns), ("destImageIds", dst, targets)):
        missing = next((x for x in ids if x not in found), None)
        if missing is not None:
            raise APIError(400, "image_not_found", f"{name}: no image {missing}")
    return anns, targets
