"""Import a project: a headless Supervisely App on the real SDK (6.74.51).

Written only against `sly.Api`, as an App developer writes one. It builds a Supervisely project
folder and uploads it with `sly.upload_project` into the App's workspace, then sets the new
project as the task's output (`api.task.set_output_project`). The folder comes from:

- `modal.state.archive`, a team files path of a .tar holding one project folder (what the
  export App writes): checked with `api.file.exists` and `api.file.get_info_by_path`, fetched
  with `api.file.download`, unpacked;
- else the data the App carries itself: a small synthetic project drawn with the SDK (yellow
  boxes on a dark background, a `box` rectangle per image and a `split` image tag). Its log
  line "project built" names every image's sha256, so a test can compare the stored bytes.

MODAL_STATE keys (all optional): archive (team files path), project_name (default: the folder's
name), images (synthetic images, 4).
"""

import hashlib
import json
import os
import tarfile

import numpy as np
import supervisely as sly


def modal_state():
    return json.loads(os.environ.get("MODAL_STATE") or "{}")


def project_from_archive(api, team_id, remote, data_dir):
    """The project folder inside the team files archive `remote`, downloaded and unpacked."""
    if not api.file.exists(team_id, remote):
        raise FileNotFoundError(f"team files have no {remote}")
    info = api.file.get_info_by_path(team_id, remote)
    sly.logger.info("Archive found", extra={"path": info.path, "file_id": info.id, "size": info.sizeb})
    local = os.path.join(data_dir, os.path.basename(remote))
    api.file.download(team_id, remote, local)
    out = os.path.join(data_dir, "unpacked")
    with tarfile.open(local) as tar:
        tar.extractall(out, filter="data")
    folders = [os.path.join(out, d) for d in sorted(os.listdir(out))]
    projects = [d for d in folders if os.path.isfile(os.path.join(d, "meta.json"))]
    if len(projects) != 1:
        raise ValueError(f"{remote} must hold one project folder (a folder with meta.json); it holds {len(projects)}")
    return projects[0]


def synthetic_project(data_dir, images):
    """A project folder drawn here: `images` pictures, each with one yellow box and a split tag."""
    box = sly.ObjClass("box", sly.Rectangle, color=[255, 200, 0])
    split = sly.TagMeta("split", sly.TagValueType.ONEOF_STRING, possible_values=["train", "val"])
    meta = sly.ProjectMeta(obj_classes=[box], tag_metas=[split])
    project = sly.Project(os.path.join(data_dir, "synthetic"), sly.OpenMode.CREATE)
    project.set_meta(meta)
    dataset = project.create_dataset("ds0")
    rng = np.random.default_rng(7)
    for i in range(images):
        img = rng.integers(0, 60, size=(48, 64, 3), dtype=np.uint8)
        top, left = 4 + 3 * i, 6 + 5 * i
        img[top : top + 16, left : left + 20] = (255, 200, 0)
        rect = sly.Rectangle(top, left, top + 15, left + 19)
        tag = sly.Tag(split, "val" if i % 4 == 3 else "train")
        ann = sly.Annotation(img.shape[:2], labels=[sly.Label(rect, box)], img_tags=sly.TagCollection([tag]))
        dataset.add_item_np(f"img_{i:03d}.png", img, ann=ann)
    digests = {}
    for item in dataset:
        with open(dataset.get_img_path(item), "rb") as f:
            digests[item] = hashlib.sha256(f.read()).hexdigest()
    sly.logger.info("project built", extra={"items": digests})
    return project.directory


def main():
    api = sly.Api.from_env()
    task_id = sly.env.task_id()
    team_id = sly.env.team_id()
    workspace_id = sly.env.workspace_id()
    state = modal_state()

    teams = {t.id: t.name for t in api.team.get_list()}
    workspaces = {w.id: w.name for w in api.workspace.get_list(team_id)}
    if team_id not in teams or workspace_id not in workspaces:
        raise ValueError(f"team {team_id} / workspace {workspace_id} not found: {teams}, {workspaces}")
    sly.logger.info("Importing", extra={"team": teams[team_id], "workspace": workspaces[workspace_id]})

    data_dir = sly.app.get_data_dir()
    if state.get("archive"):
        folder = project_from_archive(api, team_id, state["archive"], data_dir)
    else:
        folder = synthetic_project(data_dir, int(state.get("images", 4)))
    project_id, project_name = sly.upload_project(
        folder, api, workspace_id, project_name=state.get("project_name"), log_progress=True
    )
    api.task.set_output_project(task_id, project_id, project_name)
    sly.logger.info("Project imported", extra={"project_id": project_id, "project_name": project_name})


if __name__ == "__main__":
    sly.main_wrapper("IMPORT", main)
