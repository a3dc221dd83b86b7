"""A task's results post: what it may name, its checks, the task's results limits, and the rows it
writes (a model or checkpoint, a project, artifact rows) with the task's result totals."""

from __future__ import annotations

from pydantic import ValidationError
from sqlalchemy import bindparam, insert, select, update

from protocol.errors import APIError
from protocol.states import FINAL, TaskState
from server import db
from server.blobs import refs as blob_refs
from server.blobs.store import SHA256_RE
from server.http.fields import check_files, check_relpath
from server.models.schemas import model_hash
from server.projects.schemas import DatasetIn, ItemRef
from server.projects.service import NAME_BATCH, append_items, insert_project, prepare, project_meta, same_project
from server.tasks.schemas import ResultsIn
from server.tasks.service import own_task

_t = db.tasks.c
# A results post reads, changes and writes the task's results (its totals): the row is locked on
# PostgreSQL, so two posts of one task on two replicas never both write a total read before the other.
_RESULTS_TASK = select(db.tasks).where(_t.id == bindparam("tid")).with_for_update()


def check_fields(body: ResultsIn) -> None:
    """The fields belong to the result's kind, and a project's or model's name is one path component."""
    if body.name and body.kind != "artifacts":  # it names a project or model: never path-like
        check_relpath(body.name, "name", single=True)
    if body.kind != "project" and (
        body.datasets is not None
        or body.meta is not None
        or any(f.ann is not None for f in body.files)
        or body.paged
        or body.project_id is not None
    ):
        raise APIError(
            400,
            "invalid_request",
            f"meta, datasets, ann, paged and project_id belong to a project result, not {body.kind}",
        )
    if body.project_id is not None and (body.meta is not None or body.paged or body.name):
        raise APIError(
            400, "invalid_request", "a further page of a result project (project_id) carries no meta, paged or name"
        )


class Readable:
    """The blob store as one agent sees it: a blob it may not read is missing. The checks of a
    results post (server.http.fields.check_files, server.projects.prepare) read sizes through it, so
    a forbidden blob gets the answer of a missing one, never its size."""

    def __init__(self, blobs, hashes: set[str]):
        self.blobs, self.hashes = blobs, hashes

    def size(self, h: str) -> int | None:
        return self.blobs.size(h) if h in self.hashes else None

    def path(self, h: str):
        return self.blobs.path(h)


def readable(conn, agent_id: int, body: ResultsIn) -> set[str]:
    """The blobs the post names that agent `agent_id` may read already (uploaded by it, or of its
    own tasks): naming any other would make it readable."""
    refs = list(body.files) + [it for ds in body.datasets or [] for it in ds.items]
    named = {r.sha256 for r in refs if isinstance(r.sha256, str) and SHA256_RE.match(r.sha256)}
    return blob_refs.readable(conn, agent_id, named)


def check_refs(blobs: Readable, body: ResultsIn, agent_id: int) -> tuple[dict, list[dict]] | None:
    """The blobs named, through `blobs`: each present with its stated size. A project result is
    checked as POST /api/v1/projects checks one and returned prepared (meta, datasets); None for
    the other kinds."""
    prepared = None
    if body.kind != "project":
        check_files(blobs, body.files, "path", "result file")
    else:
        prepared = _prepare_project(blobs, body, agent_id)
    if body.checkpoint is not None and body.kind != "model":
        raise APIError(400, "invalid_request", "checkpoint belongs to a model result")
    return prepared


def _prepare_project(blobs, body: ResultsIn, agent_id: int) -> tuple[dict, list[dict]]:
    """A project result from `datasets`, or from `files` named '<dataset>/<item name>'."""
    if body.datasets is not None:
        if body.files:
            raise APIError(400, "invalid_request", "a project result has either datasets or files, not both")
        ds_in = body.datasets
    else:
        by_ds: dict[str, list] = {}
        try:
            for f in body.files:
                if "/" not in f.path:
                    raise APIError(400, "bad_name", f"project result file {f.path!r} must be '<dataset>/<item name>'")
                ds, item = f.path.split("/", 1)
                by_ds.setdefault(ds, []).append(ItemRef(name=item, sha256=f.sha256, size=f.size, ann=f.ann))
            ds_in = [DatasetIn(name=k, items=v) for k, v in by_ds.items()]
        except ValidationError as e:  # a file's path that makes no '<dataset>/<item>' names: a 400 as for any body
            errs = e.errors()
            code = "bad_name" if all(x.get("type") == "bad_name" for x in errs) else "invalid_request"
            raise APIError(
                400, code, "; ".join(f"project result file: {x.get('msg', 'invalid')}" for x in errs[:5])
            ) from None
    return prepare(blobs, body.meta, ds_in, who=f"agent:{agent_id}")


def store(
    conn, agent_id: int, task_id: int, body: ResultsIn, prepared, now: float, limits: tuple[int, int]
) -> tuple[dict, int | None]:
    """Store a checked post (check_refs) for agent `agent_id`'s task, in `conn`'s transaction:
    (the task's results, the model or project id; None for artifacts). 409 task_final once the
    task is final; past `limits` (max files, max bytes; 0: none), 413 results_limit."""
    oid = None
    task = own_task(conn, agent_id, task_id, _RESULTS_TASK)
    if TaskState(task["state"]) in FINAL:
        raise APIError(409, "task_final", f"task {task_id} is {task['state']}; results come before the final state")
    results = dict(task["results"])
    if body.kind == "model":
        oid = _post_model(conn, task_id, body, results, now, limits)
    elif body.kind == "project" and body.project_id is not None:
        oid = _append_project(conn, task_id, body.project_id, prepared, results, limits)
    elif body.kind == "project":
        oid = _post_project(conn, task_id, body.name, prepared, results, now, limits, body.paged)
    else:
        _post_artifacts(conn, task_id, body.files, results, limits)
    conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(results=results, updated_at=now))
    return results, oid


def _post_model(conn, task_id: int, body: ResultsIn, results: dict, now: float, limits) -> int:
    """Store a model result (idempotent per task: the same files again are the same model) and
    decide `results.model_id`: a plain model (results/model) wins over a checkpoint marked final,
    which wins over the latest checkpoint."""
    files = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in body.files]
    h = model_hash(files)
    ck = body.checkpoint.model_dump() if body.checkpoint is not None else None
    m = db.models.c
    mid = conn.execute(select(m.id).where(m.task_id == task_id, m.hash == h).order_by(m.id).limit(1)).scalar()
    replay = mid is not None
    if replay and ck is not None and ck["final"]:
        stored = conn.execute(select(m.checkpoint).where(m.id == mid)).scalar()
        if stored is not None and not stored.get("final"):  # the same checkpoint, now marked final
            conn.execute(update(db.models).where(m.id == mid).values(checkpoint=ck))
    if not replay:
        _count(results, limits, len(files), sum(f.size for f in body.files))
        mid = conn.execute(
            insert(db.models).values(
                name=body.name or f"task {task_id} model",
                hash=h,
                files=files,
                task_id=task_id,
                checkpoint=ck,
                created_at=now,
            )
        ).inserted_primary_key[0]
        blob_refs.add(conn, blob_refs.MODEL, mid, [f["sha256"] for f in files])
    if ck is not None and mid not in results.setdefault("checkpoints", []):
        results["checkpoints"].append(mid)

    def rank(checkpoint) -> int:
        return 2 if checkpoint is None else 1 if checkpoint.get("final") else 0

    current = results.get("model_id")
    if current is None:
        results["model_id"] = mid
    elif current != mid:
        cur_ck = conn.execute(select(m.checkpoint).where(m.id == current)).scalar()
        # A replay (an agent re-posting after a restart) never moves model_id back to an older
        # checkpoint; it may only promote (a plain model equal to a checkpoint's files).
        if rank(ck) > rank(cur_ck) or (not replay and rank(ck) == rank(cur_ck)):
            results["model_id"] = mid
    return mid


def _post_project(
    conn, task_id: int, name: str, prepared: tuple, results: dict, now: float, limits, paged: bool = False
) -> int:
    """Store a checked project result; the same project posted again by the task is not stored
    twice. `paged`: this is the first page of the project, its other pages follow
    (`_append_project`): a task re-posting it after a restart finds the project it made before if
    that one starts with these items."""
    meta, datasets = prepared
    prev = results.get("project_id")
    if prev is not None and same_project(conn, prev, meta, datasets, prefix=paged):
        return prev
    items = [it for ds in datasets for it in ds["items"]]
    _count(results, limits, len(items), sum(it["size"] for it in items))
    pid = insert_project(conn, name or f"task {task_id} project", meta, datasets, now, task_id=task_id)
    results["project_id"] = pid
    return pid


def result_project_meta(conn, agent_id: int, task_id: int, pid: int) -> dict:
    """The meta of the result project `pid` of agent `agent_id`'s task (the one its first page
    made), which a further page is checked against; 404 `project_not_found` for any other."""
    _check_result_project(own_task(conn, agent_id, task_id)["results"], task_id, pid)
    return project_meta(conn, pid)


def _check_result_project(results: dict, task_id: int, pid: int) -> None:
    """404 `project_not_found` unless `pid` is the result project the task's results name."""
    if results.get("project_id") != pid:
        raise APIError(404, "project_not_found", f"project {pid} is not the result project of task {task_id}")


def _append_project(conn, task_id: int, pid: int, prepared: tuple, results: dict, limits) -> int:
    """Add a checked further page to the task's result project `pid`. Items it holds already with
    the same blob (a page posted again after a restart) are skipped; the same name with another
    blob is a 400 `duplicate_path`."""
    _check_result_project(results, task_id, pid)  # again, under the task's row lock
    _, datasets = prepared
    c = db.project_items.c
    for ds in datasets:
        names = [it["name"] for it in ds["items"]]
        held: dict[str, tuple] = {}
        for i in range(0, len(names), NAME_BATCH):
            q = select(c.name, c.sha256, c.size).where(
                c.project_id == pid, c.dataset == ds["name"], c.name.in_(names[i : i + NAME_BATCH])
            )
            held.update((r[0], (r[1], r[2])) for r in conn.execute(q))
        new = []
        for it in ds["items"]:
            if it["name"] not in held:
                new.append(it)
            elif held[it["name"]] != (it["sha256"], it["size"]):
                raise APIError(
                    400, "duplicate_path", f"dataset {ds['name']}, item {it['name']!r} is in the project already"
                )
        if new:
            _count(results, limits, len(new), sum(it["size"] for it in new))
            append_items(conn, pid, ds["name"], new)
    return pid


def _post_artifacts(conn, task_id: int, files: list, results: dict, limits) -> None:
    """Upsert the entries as the task's artifact rows (a path posted again replaces its entry): a
    post costs O(its entries), whatever the task holds already."""
    a = db.task_artifacts.c
    new = {f.path: f for f in files}
    old: dict[str, tuple[str, int]] = {}
    paths = sorted(new)
    for i in range(0, len(paths), blob_refs.READ_BATCH):
        old.update(
            (p, (h, n))
            for p, h, n in conn.execute(
                select(a.path, a.sha256, a.size).where(
                    a.task_id == task_id, a.path.in_(paths[i : i + blob_refs.READ_BATCH])
                )
            )
        )
    added = len(new) - len(old)
    grown = sum(f.size for f in new.values()) - sum(n for _, n in old.values())
    _count(results, limits, added, grown)
    results["artifacts_count"] = results.get("artifacts_count", 0) + added
    results["artifacts_bytes"] = results.get("artifacts_bytes", 0) + grown
    if new:
        conn.execute(
            db.upsert(conn.engine, db.task_artifacts, ["task_id", "path"], ["sha256", "size"]),
            [{"task_id": task_id, "path": p, "sha256": f.sha256, "size": f.size} for p, f in new.items()],
        )
    blob_refs.add(conn, blob_refs.RESULT, task_id, [f.sha256 for f in new.values()])
    # A replaced blob that no other path of the task names is no longer kept or readable for it:
    # otherwise re-posting one path with ever new blobs would store them all past the limits.
    gone = {h for p, (h, _) in old.items() if h != new[p].sha256} - {f.sha256 for f in new.values()}
    still = set()
    for h in gone:
        if conn.execute(select(a.path).where(a.task_id == task_id, a.sha256 == h).limit(1)).first() is not None:
            still.add(h)
    blob_refs.drop_results(conn, task_id, gone - still)


def _count(results: dict, limits, files: int, size: int) -> None:
    """Add to the task's result totals, or 413 results_limit (nothing stored) past a limit."""
    max_files, max_bytes = limits
    files, size = results.get("result_files", 0) + files, results.get("result_bytes", 0) + size
    if max_files and files > max_files:
        raise APIError(
            413,
            "results_limit",
            f"a task's results may name at most {max_files} files "
            f"(--results-max-files); this post would make {files}, so nothing of it was stored",
        )
    if max_bytes and size > max_bytes:
        raise APIError(
            413,
            "results_limit",
            f"a task's results may name at most {max_bytes} bytes "
            f"(--results-max-bytes); this post would make {size}, so nothing of it was stored",
        )
    results["result_files"], results["result_bytes"] = files, size
