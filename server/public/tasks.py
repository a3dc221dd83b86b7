"""Public API methods (server/public/registry.py): tasks, as the SDK's `api.task` calls them.

- `tasks.info {id}` -> the SDK's task info (`api.task.get_info_by_id`, `get_status`): any task of
  the team, without its config, command or token; 404 for no such task (the SDK reads None);
- `tasks.output.set {taskId, output}`: what `set_output_project` ({project: {id, title}}),
  `set_output_archive`, `set_output_file_download`, `set_output_report` and `set_output_directory`
  ({general: {title, titleUrl, description, icon, ...}}), `set_output_text` and `set_output_error`
  (general, no titleUrl) send. An App sets the output of its own task only (403 otherwise), and
  the project or file it names must exist.

The output is stored on the task (`tasks.output`, shown by `GET /api/v1/tasks/{id}` and the
console) in our own terms:
    {"type": "project", "project_id", "name"}
    {"type": "file", "file_id", "path", "name"}          archive, file download, report
    {"type": "directory", "file_id", "path", "name"}     `path` is the folder (`/a/b/`)
    {"type": "text", "name", "description", "error"}    a message; `error` for set_output_error
The SDK names a file in a general output only by its URL: `titleUrl` is `/files/<id>` (what
`api.file.get_url(id)` gives and `storagePath` of our file infos holds); another URL is a 400.
"""

from __future__ import annotations

import re

from sqlalchemy import select, update

from protocol.errors import APIError
from protocol.states import TaskState
from server import db
from server.files import service as files
from server.http.strict import ID_MAX
from server.public.infos import iso
from server.public.registry import Call, is_id, method

MAX_TEXT = 1000  # characters of an output's title or description
FILE_URL_RE = re.compile(r"^/files/([0-9]{1,10})$")

# Our task states as Supervisely's task statuses (TaskApi.Status).
STATUS = {
    TaskState.QUEUED: "queued",
    TaskState.ASSIGNED: "consumed",
    TaskState.PREPARING: "consumed",
    TaskState.RUNNING: "started",
    TaskState.UPLOADING: "started",
    TaskState.FINISHED: "finished",
    TaskState.FAILED: "error",
    TaskState.LOST: "error",
    TaskState.STOPPED: "stopped",
}


def _sdk_output(output: dict | None) -> dict | None:
    """Our stored output back in the SDK's shape (`meta.output` of a task info)."""
    if not output:
        return None
    kind = output.get("type")
    if kind == "project":
        return {"project": {"id": output.get("project_id"), "title": output.get("name")}}
    general: dict = {"title": output.get("name")}
    if output.get("file_id") is not None:
        general["titleUrl"] = f"/files/{output['file_id']}"
    if kind == "text":
        general.update(description=output.get("description"), isError=bool(output.get("error")))
    return {"general": general}


def task_info(row: dict) -> dict:
    """A task row as the SDK's task info."""
    started = next((e.get("ts") for e in row["timeline"] or [] if e.get("state") == TaskState.RUNNING), None)
    final = TaskState(row["state"]).final
    return {
        "id": row["id"],
        "type": row["type"],
        "status": STATUS[TaskState(row["state"])],
        "teamId": db.DEFAULT_TEAM_ID,
        "workspaceId": db.DEFAULT_WORKSPACE_ID,
        "userId": None,
        "agentId": row["agent_id"],
        "projectId": row["project_id"],
        "datasetId": row["dataset_id"],
        "description": "",
        "createdAt": iso(row["created_at"]),
        "updatedAt": iso(row["updated_at"]),
        "startedAt": iso(started),
        "finishedAt": iso(row["updated_at"]) if final else None,
        "meta": {"app": {"id": None, "image": row["image"]}, "output": _sdk_output(row["output"])},
        "settings": {},
    }


@method("tasks.info")
async def info(call: Call) -> dict:
    task_id = call.int_field("id")
    t = db.tasks.c
    cols = (t.id, t.type, t.state, t.agent_id, t.project_id, t.dataset_id, t.image, t.output, t.timeline)

    def read() -> dict | None:
        with call.state.db.reader() as conn:
            row = conn.execute(select(*cols, t.created_at, t.updated_at).where(t.id == task_id)).mappings().first()
            return dict(row) if row is not None else None

    row = await call.state.db.run_read(read)
    if row is None:
        raise APIError(404, "task_not_found", f"no task {task_id}")
    return task_info(row)


def _text(v, field: str, required: bool = True) -> str | None:
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v) or len(v) > MAX_TEXT:
        raise APIError(400, "invalid_request", f"{field!r} must be a string of 1 to {MAX_TEXT} characters", field=field)
    return v


def parse_output(output) -> tuple[dict, int | None, int | None]:
    """The SDK's output as ours, with the project id and file id it names (checked against the database later)."""
    if not isinstance(output, dict) or len(output) != 1 or not ({"project", "general"} & output.keys()):
        raise APIError(400, "invalid_request", "'output' must hold `project` or `general`", field="output")
    if "project" in output:
        p = output["project"]
        pid = p.get("id") if isinstance(p, dict) else None
        if not is_id(pid):
            raise APIError(
                400, "invalid_request", "'output.project.id' must be a project id", field="output.project.id"
            )
        return {"type": "project", "project_id": pid}, pid, None
    g = output["general"]
    if not isinstance(g, dict):
        raise APIError(400, "invalid_request", "'output.general' must be an object", field="output.general")
    title = _text(g.get("title"), "output.general.title")
    description = _text(g.get("description"), "output.general.description", required=False)
    url = g.get("titleUrl")
    if url is None:
        return (
            {"type": "text", "name": title, "description": description, "error": g.get("isError") is True},
            None,
            None,
        )
    m = FILE_URL_RE.match(url) if isinstance(url, str) else None
    if m is None or int(m.group(1)) > ID_MAX:
        raise APIError(
            400,
            "invalid_request",
            "'output.general.titleUrl' must name a team file as `/files/<id>` (api.file.get_url or its storage_path)",
            field="output.general.titleUrl",
        )
    file_id = int(m.group(1))
    icon = g.get("icon") if isinstance(g.get("icon"), dict) else {}
    if description == "Directory" or "zmdi-folder" in str(icon.get("className", "")):
        path = files.check_path(title, "output.general.title", folder=True)
        return {"type": "directory", "file_id": file_id, "path": path, "name": title}, None, file_id
    return {"type": "file", "file_id": file_id, "name": title}, None, file_id


def _store(state, task_id: int, out: dict, project_id: int | None, file_id: int | None) -> dict:
    with state.db.engine.begin() as conn:
        if project_id is not None:
            name = conn.execute(select(db.projects.c.name).where(db.projects.c.id == project_id)).scalar()
            if name is None:
                raise APIError(404, "project_not_found", f"no project {project_id}", field="output.project.id")
            out["name"] = name
        if file_id is not None:
            row = files.get_by_id(conn, db.DEFAULT_TEAM_ID, file_id)
            if row is None:
                raise APIError(
                    404, "file_not_found", f"no team file with id {file_id}", field="output.general.titleUrl"
                )
            if out["type"] == "file":
                out["path"] = row["path"]
        conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(output=out))
    return out


@method("tasks.output.set")
async def set_output(call: Call) -> dict:
    task_id = call.int_field("taskId")
    if task_id != call.task["id"]:
        raise APIError(
            403, "not_own_task", f"an App sets the output of its own task ({call.task['id']}) only", field="taskId"
        )
    out, project_id, file_id = parse_output(call.body.get("output"))
    await call.state.db.run(_store, call.state, task_id, out, project_id, file_id)
    return {"success": True}
