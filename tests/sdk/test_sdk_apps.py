"""Headless Supervisely Apps on the real SDK (tests/sdk/apps, 6.74.51, unchanged) run as `app` tasks by
`python -m agent` against the real server, and what they made checked from outside: with the CLI
(`sly files list|download`, `sly projects download`), the user API (the task's `output`, project
items and their blobs) and the SDK itself (`sly.Project` opens the archive and the projects).

- the export App: `sly.download_project`, a .tar in team files, `set_output_archive`;
- the training App: datasets, images and annotations through the API, a checkpoint per epoch in
  team files, a predictions project with its images copied by id, `set_output_project`;
- the import App: `sly.upload_project` of the export App's archive (fetched from team files) and
  of a project it draws itself;
- the demo's App (tools/demo/app, standard library only): its archive is what the SDK reads.

The App token's life and scope (dead after finished, failed, stopped and lost; refused outside the
public API) are tested by the server's tests (tests/server/test_app_tokens.py): an App sees only
the local token of its node's forwarder, so nothing inside the container can show that the
task's real token died.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from protocol import endpoints as ep
from tests.sdk.sdk_check import project_summary
from tests.sdk.test_sdk_e2e import check_predictions

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

EXPORT, TRAIN, IMPORT = "export_project", "train_colours", "import_project"
EPOCHS = 3
FILL = {"square": (220, 40, 40), "triangle": (40, 200, 60), "blob": (40, 80, 220)}  # tools/sample_project.py


def app_command(app: str) -> list[str]:
    """How an App of the image starts: its main.py, unbuffered (the image has no CMD)."""
    return ["python", "-u", f"/app/{app}/main.py"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def logged(lines: list[dict], message: str) -> list[dict]:
    """The task's log lines whose message is `message` (the SDK's JSON lines keep their fields; one
    glued after a tqdm bar is structured by the agent too: test_sdk_lines_after_a_progress_bar_are_structured)."""
    return [ln for ln in lines if ln.get("message") == message]


def sample_items(sample_project: dict) -> dict[str, bytes]:
    """{"<ds>/<item>": image bytes} of the sample project."""
    root = Path(sample_project["path"])
    return {key: (root / key.split("/")[0] / "img" / key.split("/")[1]).read_bytes() for key in sample_project["items"]}


def folder_items(root: Path) -> dict[str, bytes]:
    """{"<ds>/<item>": image bytes} of a Supervisely project folder."""
    return {
        f"{ds.name}/{img.name}": img.read_bytes()
        for ds in sorted(root.iterdir())
        if ds.is_dir()
        for img in sorted((ds / "img").iterdir())
    }


def item_blobs(user, project_id: int) -> dict[str, str]:
    """{"<ds>/<item>": sha256} of a stored project (the user API's items)."""
    items = user._list(ep.path(ep.PROJECT_ITEMS, project_id=project_id))
    return {f"{i['dataset']}/{i['name']}": i["sha256"] for i in items}


@pytest.fixture(scope="module")
def apps_image(docker_client, sdk_image):
    from tools.sdk_image import ensure_apps_image

    return ensure_apps_image(docker_client, base=sdk_image)


@pytest.fixture(scope="module")
def project(server, sample_project):
    """The sample project, uploaded with the CLI as a user would."""
    from tests.cli.test_cli import cli_json

    return cli_json(server, "projects", "upload", sample_project["path"], "--name", "apps-sample")


@pytest.fixture(scope="module")
def node(server, tmp_path_factory):
    """One real agent (`python -m agent`, the real task handlers) for the module's Apps."""
    from tests.agent.conftest import AgentProcess

    agent = AgentProcess(server, tmp_path_factory.mktemp("apps") / "agent", "sdk-apps")
    agent.start(handler=None, MIN_FREE_DISK_MB=1, STOP_GRACE=1)
    yield agent
    agent.kill_tree()


def run_app(user, node, image: str, app: str, timeout: float = 300, **task) -> tuple[dict, list[dict]]:
    """Create an `app` task for `app`, wait for its end; (the task as GET /tasks/{id} shows it, its log)."""
    created = user.create_task(node.id, "app", image=image, command=app_command(app), **task)
    done = node.wait_state(created["id"], timeout=timeout)
    return done, node.logs(created["id"])


def explain(done: dict, lines: list[dict], node) -> str:
    return f"{done['state']}: {done.get('error')}\n" + "\n".join(str(ln) for ln in lines[-25:]) + node.stderr()[-2000:]


@pytest.fixture(scope="module")
def exported(server, user, node, apps_image, project):
    """The export App, submitted with the CLI (`sly tasks submit --type app`)."""
    from tests.cli.test_cli import cli_json

    created = cli_json(
        server,
        "tasks",
        "submit",
        "--node",
        str(node.id),
        "--type",
        "app",
        "--image",
        apps_image,
        "--command",
        " ".join(app_command(EXPORT)),
        "--project",
        str(project["id"]),
    )
    done = node.wait_state(created["id"], timeout=300)
    lines = node.logs(created["id"])
    assert done["state"] == "finished", explain(done, lines, node)
    [uploaded] = logged(lines, "archive uploaded")
    return {"task": done, "lines": lines, "uploaded": uploaded, "path": f"/exports/{done['id']}/apps-sample.tar"}


def test_export_app_puts_the_project_in_team_files(server, exported, tmp_path, sdk_image, sample_project, original):
    from tests.cli.test_cli import cli, cli_json

    task, uploaded, remote = exported["task"], exported["uploaded"], exported["path"]
    assert uploaded["path"] == remote
    assert task["output"] == {"type": "file", "file_id": uploaded["file_id"], "path": remote, "name": "apps-sample.tar"}

    listing = cli_json(server, "files", "list", f"/exports/{task['id']}")
    assert [(f["type"], f["path"], f["size"], f["sha256"], f["task_id"]) for f in listing] == [
        ("file", remote, uploaded["size"], uploaded["sha256"], task["id"])
    ], listing
    local = tmp_path / "apps-sample.tar"
    cli(server, "files", "download", remote, str(local))
    data = local.read_bytes()
    assert (len(data), sha256(data)) == (uploaded["size"], uploaded["sha256"]), "the bytes the App wrote"

    with tarfile.open(local) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    root = tmp_path / "unpacked" / "apps-sample"
    assert folder_items(root) == sample_items(sample_project), "every image byte for byte"
    summary = project_summary(str(root), sdk_image)
    assert summary["items"] == original["items"], "labels, tags and sizes as uploaded"
    assert (summary["classes"], summary["tag_metas"]) == (original["classes"], original["tag_metas"])


def test_export_app_takes_one_dataset_by_its_id(server, user, node, apps_image, project, tmp_path, sample_project):
    """`sly tasks submit --dataset ID` alone: the App gets DATASET_ID and its project's PROJECT_ID."""
    from tests.cli.test_cli import cli, cli_json

    ds1 = next(d["id"] for d in user.get_project(project["id"])["datasets"] if d["name"] == "ds1")
    command = " ".join(app_command(EXPORT))
    args = ["--node", str(node.id), "--type", "app", "--image", apps_image, "--command", command, "--dataset", str(ds1)]
    created = cli_json(server, "tasks", "submit", *args)
    done = node.wait_state(created["id"], timeout=300)
    lines = node.logs(created["id"])
    assert done["state"] == "finished", explain(done, lines, node)
    assert (done["project_id"], done["dataset_id"]) == (project["id"], ds1)
    local = tmp_path / "ds1.tar"
    cli(server, "files", "download", f"/exports/{done['id']}/apps-sample.tar", str(local))
    with tarfile.open(local) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    ds1_items = {k: v for k, v in sample_items(sample_project).items() if k.startswith("ds1/")}
    assert folder_items(tmp_path / "unpacked" / "apps-sample") == ds1_items


def test_sdk_lines_after_a_progress_bar_are_structured(exported):
    """`sly.download_project` draws tqdm bars on stderr (in production too) that end without a
    newline, so the SDK's next JSON log line shares a line with a bar's redraw (`\\r`, `\\x1b[A`).
    The agent should still read it as the structured line it is (fields kept, progress counted)."""
    glued = [ln["message"][:160] for ln in exported["lines"] if "archive uploaded" in ln.get("message", "")]
    structured = [ln for ln in exported["lines"] if ln.get("message") == "archive uploaded"]
    assert structured and structured[0]["sha256"] == exported["uploaded"]["sha256"], glued


def test_train_app_checkpoints_to_team_files_and_predicts(
    server, user, node, apps_image, project, tmp_path, sdk_image, sample_project, original
):
    from tests.cli.test_cli import cli, cli_json

    done, lines = run_app(user, node, apps_image, TRAIN, project_id=project["id"], config={"epochs": EPOCHS, "lr": 0.5})
    assert done["state"] == "finished", explain(done, lines, node)
    tid = done["id"]
    epochs = [(ln["subtask"], ln["current"], ln["total"]) for ln in lines if ln.get("subtask") == "Epochs"]
    assert epochs == [("Epochs", i, EPOCHS) for i in range(EPOCHS + 1)], "sly.Progress, one line per epoch"
    n = len(sample_project["items"])
    assert done["progress"] == {"current": n, "total": n}, "the last sly.Progress (Predicting) is the task's bar"

    saved = logged(lines, "checkpoint saved")
    assert [c["epoch"] for c in saved] == list(range(1, EPOCHS + 1))
    folder = f"/train/{tid}/checkpoints"
    listing = cli_json(server, "files", "list", folder)
    assert sorted((f["path"], f["sha256"]) for f in listing) == sorted((c["path"], c["sha256"]) for c in saved)
    assert [c["path"] for c in saved] == [f"{folder}/epoch_{e}.json" for e in range(1, EPOCHS + 1)]
    for c in saved:
        local = tmp_path / f"epoch_{c['epoch']}.json"
        cli(server, "files", "download", c["path"], str(local))
        assert sha256(local.read_bytes()) == c["sha256"], c["path"]
    weights = json.loads((tmp_path / f"epoch_{EPOCHS}.json").read_text())
    assert weights["epoch"] == EPOCHS and sorted(weights["classes"]) == sorted(FILL)
    for title, mean in zip(weights["classes"], weights["means"], strict=True):
        assert max(abs(a - b) for a, b in zip(mean, FILL[title], strict=True)) < 12, (title, mean)

    [result] = logged(lines, "Predictions uploaded")
    assert result["project_name"] == "apps-sample predictions"
    assert done["output"] == {"type": "project", "project_id": result["project_id"], "name": result["project_name"]}
    assert item_blobs(user, result["project_id"]) == item_blobs(user, project["id"]), "copied by id: the same blobs"

    dest = tmp_path / "predictions"
    cli(server, "projects", "download", str(result["project_id"]), str(dest))
    assert folder_items(dest) == sample_items(sample_project)
    check_predictions(project_summary(str(dest), sdk_image), original)


def test_import_app_uploads_the_exported_archive(
    server, user, node, apps_image, exported, tmp_path, sdk_image, sample_project, original
):
    from tests.cli.test_cli import cli

    config = {"archive": exported["path"], "project_name": "apps-reimported"}
    done, lines = run_app(user, node, apps_image, IMPORT, config=config)
    assert done["state"] == "finished", explain(done, lines, node)
    [imported] = logged(lines, "Project imported")
    assert imported["project_name"] == "apps-reimported"
    assert done["output"] == {"type": "project", "project_id": imported["project_id"], "name": "apps-reimported"}

    dest = tmp_path / "reimported"
    cli(server, "projects", "download", str(imported["project_id"]), str(dest))
    assert folder_items(dest) == sample_items(sample_project), "the round trip keeps every byte"
    summary = project_summary(str(dest), sdk_image)
    assert summary["items"] == original["items"]
    assert (summary["classes"], summary["tag_metas"]) == (original["classes"], original["tag_metas"])


def test_import_app_uploads_a_project_it_draws(server, user, node, apps_image, tmp_path, sdk_image):
    from tests.cli.test_cli import cli

    done, lines = run_app(user, node, apps_image, IMPORT, config={"images": 5})
    assert done["state"] == "finished", explain(done, lines, node)
    [built] = logged(lines, "project built")
    [imported] = logged(lines, "Project imported")
    items = user._list(ep.path(ep.PROJECT_ITEMS, project_id=imported["project_id"]))
    assert {i["name"]: i["sha256"] for i in items} == built["items"] and len(items) == 5

    dest = tmp_path / "drawn"
    cli(server, "projects", "download", str(imported["project_id"]), str(dest))
    summary = project_summary(str(dest), sdk_image)
    assert summary["datasets"] == ["ds0"] and summary["classes"] == {"box": "rectangle"}
    for key, item in summary["items"].items():
        [label] = item["labels"]
        i = int(key.split("_")[-1].split(".")[0])
        assert label["bbox"] == [4 + 3 * i, 6 + 5 * i, 19 + 3 * i, 25 + 5 * i], key
        assert item["tags"] == {"split": "val" if i % 4 == 3 else "train"} and item["roundtrip"]


def test_a_failing_app_fails_its_task_with_the_sdk_report(user, node, apps_image):
    done, lines = run_app(user, node, apps_image, IMPORT, config={"archive": "/no/such/archive.tar"})
    assert done["state"] == "failed", explain(done, lines, node)
    crashed = [ln for ln in lines if ln.get("event_type") == "task_crashed"]  # the agent lower-cases EventType.*
    assert crashed and "team files have no /no/such/archive.tar" in crashed[0]["exc_str"], lines[-10:]
    assert done.get("output") in (None, {}), "an App that failed before setting an output has none"


def test_the_demo_app_exports_what_the_sdk_reads(
    server, user, node, project, tmp_path, sdk_image, sample_project, original
):
    """The demo's App (tools/demo/app, standard library only) speaks the public API as the SDK does:
    its archive is the project the SDK export App wrote, opened by the SDK."""
    from tests.cli.test_cli import cli
    from tools.demo.app_image import APP_COMMAND, ensure_demo_app_image

    created = user.create_task(
        node.id, "app", image=ensure_demo_app_image(), command=APP_COMMAND, project_id=project["id"]
    )
    done = node.wait_state(created["id"], timeout=120)
    lines = node.logs(created["id"])
    assert done["state"] == "finished", explain(done, lines, node)
    remote = f"/exports/{done['id']}/apps-sample.tar"
    [uploaded] = logged(lines, f"archive uploaded to team files: {remote}")
    assert done["output"] == {"type": "file", "file_id": uploaded["file_id"], "path": remote, "name": "apps-sample.tar"}
    local = tmp_path / "demo.tar"
    cli(server, "files", "download", remote, str(local))
    assert sha256(local.read_bytes()) == uploaded["sha256"]
    with tarfile.open(local) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    root = tmp_path / "unpacked" / "apps-sample"
    assert folder_items(root) == sample_items(sample_project)
    summary = project_summary(str(root), sdk_image)
    assert summary["items"] == original["items"]
    assert (summary["classes"], summary["tag_metas"]) == (original["classes"], original["tag_metas"])


def test_apps_image_is_cached(docker_client, sdk_image, apps_image):
    from tools.sdk_image import ensure_apps_image

    before = docker_client.images.get(apps_image).id
    assert ensure_apps_image(docker_client, base=sdk_image, log=lambda m: None) == apps_image
    assert docker_client.images.get(apps_image).id == before
    config = docker_client.images.get(apps_image).attrs["Config"]
    assert config["Cmd"] in (None, []) and "SLY_APP_DATA_DIR=/tmp/app-data" in config["Env"]
    assert os.path.isdir(os.path.join(os.path.dirname(__file__), "apps", EXPORT))
