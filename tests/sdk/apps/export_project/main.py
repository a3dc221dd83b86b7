"""Export a project as a .tar to team files: a headless Supervisely App on the real SDK (6.74.51).

Written only against `sly.Api`, as an App developer writes one: the environment the agent gives
an App (SERVER_ADDRESS, API_TOKEN, TASK_ID, TEAM_ID, PROJECT_ID; DATASET_ID to export one dataset
of the project), `sly.download_project` into the App's data dir, a tar of the project folder
(its top folder named after the project), uploaded
with `api.file.upload` to `/exports/<task id>/<project name>.tar`, and that file set as the
task's output with `api.task.set_output_archive`.

Its last log line, "archive uploaded", carries the archive's size and sha256 as this container
computed them, so a test can compare the bytes in team files with the bytes the App wrote.
"""

import hashlib
import os
import tarfile

import supervisely as sly


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    api = sly.Api.from_env()
    task_id = sly.env.task_id()
    team_id = sly.env.team_id()
    project_id = sly.env.project_id()
    dataset_id = sly.env.dataset_id(raise_not_found=False)

    project = api.project.get_info_by_id(project_id)
    sly.logger.info("Exporting project", extra={"project_id": project.id, "project_name": project.name})
    data_dir = sly.app.get_data_dir()
    project_dir = os.path.join(data_dir, project.name)
    datasets = None if dataset_id is None else [dataset_id]
    sly.download_project(api, project.id, project_dir, dataset_ids=datasets, log_progress=True)

    archive = os.path.join(data_dir, f"{project.name}.tar")
    with tarfile.open(archive, "w") as tar:
        tar.add(project_dir, arcname=project.name)
    remote = f"/exports/{task_id}/{project.name}.tar"
    info = api.file.upload(team_id, archive, remote)
    api.task.set_output_archive(task_id, info.id, f"{project.name}.tar")
    sly.logger.info(
        "archive uploaded",
        extra={"file_id": info.id, "path": info.path, "size": os.path.getsize(archive), "sha256": sha256_of(archive)},
    )


if __name__ == "__main__":
    sly.main_wrapper("EXPORT", main)
