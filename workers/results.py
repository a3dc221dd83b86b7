"""Upload what a task wrote under results/, as the real Supervisely agent turns it into results.

    train      every CHECKPOINT event's `subdir` -> a model while the container runs
               (workers/checkpoints.py); after exit 0 the task's model is `results/model/` when
               the task wrote one, else the last checkpoint; neither -> failed
    inference  results/<project>/ (a Supervisely project) -> a new project with meta and anns
    custom     results/ -> the task's artifacts; files closed while the container runs are
               uploaded then (workers/checkpoints.py), and read again after exit only if changed

The modules below this one:

    workers/checkpoints.py  CheckpointUploader: checkpoints and closed files uploaded while the
                            container runs; a checkpoint folder -> cached model -> server
    workers/results_dir.py  ResultsDir: results/ read without following links, skips logged
    workers/uploads.py      files -> blobs on the server (bulk for small files, retries), the
                            artifacts post, the per-task results Budget
"""

from __future__ import annotations

import json
import os

from protocol.errors import APIError
from workers import safefs
from workers.checkpoints import CheckpointUploader, model_name, store_and_upload_model
from workers.errors import TaskError
from workers.results_dir import ResultsDir
from workers.uploads import Budget, post_artifacts, server_refused, upload_open_files

# A result project goes up in pages of at most this many items and about this much annotation
# JSON (the server takes a body of 64 MiB at most and checks a page in one go).
RESULT_PAGE_ITEMS = 5000
RESULT_PAGE_BYTES = 16 * 1024 * 1024


# --- custom ---------------------------------------------------------------------------------


def upload_artifacts(ctx, name: str, live: CheckpointUploader | None = None) -> dict | None:
    """Everything under results/ as the task's artifacts; None when there is nothing. With `live`
    (the uploader that ran alongside the container) the files it posted and that have not changed
    since are not read again, and its budget goes on."""
    budget = live.budget if live is not None else Budget(ctx.config)
    budget.check()
    seen = live.seen if live is not None else None
    res = ResultsDir(ctx).open()
    try:
        entries = upload_open_files(ctx.api, res.admit(res.files(), budget, seen), charge=budget.add_bytes)
    finally:
        res.close()
    if not res.walked:
        ctx.log("results: nothing under results/ to upload as artifacts", level="warning")
        return None
    try:
        answer = post_artifacts(ctx.api, ctx.task_id, name, entries)
    except APIError as e:
        raise server_refused(e, "the artifacts") from None
    kept = f"; {res.unchanged} unchanged since uploaded while the task ran" if res.unchanged else ""
    ctx.log(f"uploaded {len(entries)} files ({sum(e['size'] for e in entries) / 1048576:.1f} MB) as artifacts{kept}")
    return answer


# --- inference ------------------------------------------------------------------------------


def _has_meta(dir_fd: int, name: str) -> bool:
    try:
        fd = safefs.open_dir(None, name, dir_fd=dir_fd)
    except (OSError, safefs.Skipped):
        return False
    try:
        os.stat("meta.json", dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def find_result_project(ctx, res: ResultsDir) -> str | None:
    """The folder of results/ that is the result project: results/<input project name>/ when it
    has a meta.json (what legacy plugins write), else the only folder with a meta.json."""
    wanted = (ctx.task.get("project") or {}).get("name")
    with os.scandir(res.fd) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    candidates = [n for n in names if _has_meta(res.fd, n)]
    if wanted in candidates:
        return wanted
    return candidates[0] if len(candidates) == 1 else None


def upload_project(ctx, name: str) -> dict:
    """results/<project>/ (meta.json, <ds>/img/<item>, <ds>/ann/<item>.json) as a new project.

    Each item is `{path: "<ds>/<item>", sha256, size, ann}` (ann: the item's annotation JSON, absent
    when the task wrote none), and the body carries the project's `meta`."""
    res = ResultsDir(ctx).open()
    anns: dict[str, object] = {}
    try:
        folder = find_result_project(ctx, res)
        if folder is None:
            raise TaskError(
                "inference: the task wrote no project (a folder results/<project name>/ with "
                "meta.json, <dataset>/img/ and <dataset>/ann/)"
            )
        pfd = safefs.open_rel_dir(res.fd, folder)
        try:
            meta = res.read_json(pfd, "meta.json", f"{folder}/meta.json")
            if not isinstance(meta, dict):
                raise TaskError(f"results: {folder}/meta.json is not a project meta (a JSON object)")
            budget = Budget(ctx.config)
            entries = upload_open_files(
                ctx.api, res.admit(_project_items(res, pfd, folder, anns), budget), charge=budget.add_bytes
            )
        finally:
            os.close(pfd)
    finally:
        res.close()
    if not entries:
        raise TaskError(f"inference: the result project {folder!r} has no items")
    for e in entries:
        if anns.get(e["path"]) is not None:
            e["ann"] = anns[e["path"]]
    ctx.log(
        f"uploading project {name!r} from results/{folder}/: {len(entries)} items, "
        f"{sum(1 for a in anns.values() if a is not None)} annotations"
    )
    pages = list(project_pages(entries))
    try:
        if len(pages) == 1:
            answer = ctx.api.post_results(ctx.task_id, "project", name, entries, meta=meta)
        else:
            # The first page makes the project; the others are added to it, so no request holds a
            # whole project of 10^5 annotations (the server takes a body of 64 MiB at most).
            answer = ctx.api.post_results(ctx.task_id, "project", name, pages[0], meta=meta, paged=True)
            pid = answer["id"]
            for i, page in enumerate(pages[1:], 2):
                answer = ctx.api.post_results(ctx.task_id, "project", "", page, project_id=pid)
                ctx.log(f"project {name!r}: page {i}/{len(pages)} uploaded")
    except APIError as e:
        raise server_refused(e, "the project") from None
    ctx.log(f"uploaded project {name!r}: {len(entries)} items" + (f" in {len(pages)} pages" if len(pages) > 1 else ""))
    return answer


def project_pages(entries: list[dict], max_items: int | None = None, max_bytes: int | None = None):
    """The project's entries in pages of at most RESULT_PAGE_ITEMS items and about
    RESULT_PAGE_BYTES of annotation JSON each (a page holds at least one item)."""
    max_items = RESULT_PAGE_ITEMS if max_items is None else max_items
    max_bytes = RESULT_PAGE_BYTES if max_bytes is None else max_bytes
    page: list[dict] = []
    size = 0
    for e in entries:
        n = 200 + (len(json.dumps(e["ann"], separators=(",", ":"))) if e.get("ann") is not None else 0)
        if page and (len(page) >= max_items or size + n > max_bytes):
            yield page
            page, size = [], 0
        page.append(e)
        size += n
    if page:
        yield page


def _open_sub(res: ResultsDir, dir_fd: int, name: str, label: str) -> int | None:
    try:
        return safefs.open_dir(None, name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except safefs.Skipped as s:
        if "regular file" not in str(s):
            res.skip(label, str(s))
        return None


def _project_items(res: ResultsDir, pfd: int, folder: str, anns: dict):
    """(<ds>/<item>, open image) for every item; each item's annotation goes into `anns`."""
    with os.scandir(pfd) as it:
        datasets = sorted(e.name for e in it if e.name != "meta.json")
    for ds in datasets:
        dfd = _open_sub(res, pfd, ds, f"{folder}/{ds}")
        if dfd is None:
            continue
        ifd = afd = None
        try:
            ifd = _open_sub(res, dfd, "img", f"{folder}/{ds}/img")
            afd = _open_sub(res, dfd, "ann", f"{folder}/{ds}/ann")
            if ifd is None:
                continue
            for rel, f in safefs.walk_files(ifd, lambda r, why, ds=ds: res.skip(f"{folder}/{ds}/img/{r}", why)):
                if "/" in rel:
                    f.close()
                    res.skip(f"{folder}/{ds}/img/{rel}", "is inside a sub-folder of img/")
                    continue
                try:
                    ann = None if afd is None else res.read_json(afd, rel + ".json", f"{folder}/{ds}/ann/{rel}.json")
                except BaseException:
                    f.close()
                    raise
                anns[f"{ds}/{rel}"] = ann
                yield f"{ds}/{rel}", f
        finally:
            for fd in (ifd, afd, dfd):
                if fd is not None:
                    os.close(fd)


# --- train ---------------------------------------------------------------------------------


def finish_train(ctx, live: CheckpointUploader) -> dict:
    """After exit 0: results/model/ (when the task wrote one) or the last checkpoint is the task's model."""
    live.budget.check()
    res = ResultsDir(ctx).open()
    try:
        own = None
        try:
            os.stat("model", dir_fd=res.fd, follow_symlinks=False)
            own = store_and_upload_model(ctx, res, "model", model_name(ctx), live.budget)
        except FileNotFoundError:
            pass
    finally:
        res.close()
    if own is not None:
        return own
    last = live.last_checkpoint()
    if last is None:
        failed = f" ({len(live.failed)} failed to upload: {', '.join(live.failed[:3])})" if live.failed else ""
        raise TaskError(
            "train: no checkpoint was produced: no CHECKPOINT event named a folder under results/ "
            f"with files, and the task wrote no results/model/{failed}"
        )
    try:
        ctx.api.post_results(
            ctx.task_id,
            "model",
            last["name"],
            last["files"],
            checkpoint={**(last.get("checkpoint") or {}), "final": True},
        )
    except APIError as e:
        raise server_refused(e, "the final model") from None
    ctx.log(f"the task's model is its last checkpoint, results/{last['subdir']} (model id {last.get('model_id')})")
    return last
