"""The legacy plugin (tests/sdk/plugin, the real SDK 6.74.51, unchanged) run by the agent:
upload the annotated sample project, train (progress, train and val metrics, a model per
checkpoint, the task's model = the last checkpoint), continue training from that model, run
inference, download the result and open it with the SDK: every image, its annotations, its tags
and the predictions are checked.

`test_plugin_through_the_handlers` runs the task types' handlers directly (workers/), with the
project's meta and annotations handed to the task as the server sends them: it needs only this
node's side. `test_sdk_end_to_end` goes through `python -m agent` and the server's API, upload
to download.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from protocol import endpoints as ep
from tests.sdk.sdk_check import project_summary
from tests.sdk.test_sdk_plugin import EPOCHS, TRAIN_LABELS, iou

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]

# The real agent starts a legacy plugin with `sh -c "python -u /workdir/src/<script>"`; the
# plugin image has no CMD.
TRAIN = ["sh", "-c", "python -u /workdir/src/train.py"]
INFER = ["sh", "-c", "python -u /workdir/src/inference.py"]


def read_project(path: str) -> tuple[dict, dict]:
    """(meta, {"<ds>/<item>": (image path, ann)}) of a Supervisely project folder."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    items = {}
    for ds in sorted(os.listdir(path)):
        if not os.path.isdir(os.path.join(path, ds)):
            continue
        for item in sorted(os.listdir(os.path.join(path, ds, "img"))):
            with open(os.path.join(path, ds, "ann", item + ".json")) as f:
                items[f"{ds}/{item}"] = (os.path.join(path, ds, "img", item), json.load(f))
    return meta, items


def upload_sly_project(user, path: str, name: str) -> dict:
    """POST /api/v1/projects with meta and per-item annotations (protocol v1, user side)."""
    meta, items = read_project(path)
    datasets: dict[str, list] = {}
    for key, (img, ann) in items.items():
        ds, item = key.split("/", 1)
        datasets.setdefault(ds, []).append(
            {"name": item, "sha256": user.upload_file(img), "size": os.path.getsize(img), "ann": ann}
        )
    body = {"name": name, "meta": meta, "datasets": [{"name": k, "items": v} for k, v in datasets.items()]}
    return user._json("POST", ep.PROJECTS, body)


def download_sly_project(user, project_id: int, dest: Path) -> Path:
    """A stored project as a Supervisely folder (dest/<project name>/...), from the user API."""
    project = user.get_project(project_id)
    root = dest / project["name"]
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(project["meta"], indent=4))
    for ds in project["datasets"]:  # [{name, items_count}]: the items are paged
        (root / ds["name"] / "ann").mkdir(parents=True)
        for item in user._list(ep.path(ep.PROJECT_ITEMS, project_id=project_id), {"dataset": ds["name"]}):
            user.download_blob(item["sha256"], root / ds["name"] / "img" / item["name"])
            (root / ds["name"] / "ann" / (item["name"] + ".json")).write_text(json.dumps(item["ann"], indent=4))
    return root


def check_predictions(predicted: dict, original: dict) -> None:
    """The plugin's inference result against the input, as test_sdk_plugin checks it."""
    assert predicted["classes"] == {
        **original["classes"],
        "square_pred": "rectangle",
        "triangle_pred": "rectangle",
        "blob_pred": "rectangle",
    }
    assert predicted["items"].keys() == original["items"].keys()
    for key, item in predicted["items"].items():
        before = original["items"][key]
        assert item["tags"] == before["tags"] and item["size"] == before["size"]
        assert item["image_shape"] == before["image_shape"]
        assert [lb for lb in item["labels"] if not lb["class"].endswith("_pred")] == before["labels"]
        preds = {lb["class"][: -len("_pred")]: lb for lb in item["labels"] if lb["class"].endswith("_pred")}
        assert sorted(preds) == sorted(original["classes"])
        for truth in before["labels"]:
            pred = preds[truth["class"]]
            assert pred["shape"] == "rectangle" and 0 < pred["tags"]["confidence"] <= 1
            assert iou(pred["bbox"], truth["bbox"]) >= 0.5, (key, truth, pred)


# --- the handlers, with the annotations as the server sends them ----------------------------


def _with_annotations(task: dict, path: str) -> dict:
    """The poll answer's project as a stored Supervisely project (meta, ann) with its items inline, as an
    older server sent them (the agent takes inline items as given; the server now leaves them to paging)."""
    meta, items = read_project(path)
    task["project"]["meta"] = meta
    datasets: dict[str, list] = {}
    for key, (img, ann) in items.items():
        ds, item = key.split("/", 1)
        sha = hashlib.sha256(Path(img).read_bytes()).hexdigest()
        datasets.setdefault(ds, []).append({"name": item, "sha256": sha, "size": os.path.getsize(img), "ann": ann})
    assert [d["name"] for d in task["project"]["datasets"]] == list(datasets)
    task["project"]["datasets"] = [{"name": k, "items": v} for k, v in datasets.items()]
    return task


def test_plugin_through_the_handlers(user, server, tmp_path, plugin_image, sdk_image, sample_project, original):
    from tests.workers.conftest import Node
    from tests.workers.ctx import TestContext
    from workers import cache, inference, train

    node = Node(user, server, tmp_path / "agent")
    _, items = read_project(sample_project["path"])
    datasets: dict[str, list] = {}
    for key, (img, _) in items.items():
        ds, item = key.split("/", 1)
        datasets.setdefault(ds, []).append(
            {"name": item, "sha256": user.upload_file(img), "size": os.path.getsize(img)}
        )
    project = user.create_project("sample", [{"name": k, "items": v} for k, v in datasets.items()])

    def ctx_for(**task) -> TestContext:
        return TestContext(_with_annotations(node.lease(**task), sample_project["path"]), node.config())

    ctx = ctx_for(
        type="train",
        image=plugin_image,
        command=TRAIN,
        project_id=project["id"],
        config={"epochs": EPOCHS, "lr": 0.5, "model_name": "colours"},
    )
    outcome = train.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-20:])
    assert (EPOCHS, EPOCHS) in ctx.progress_values
    metrics = [ln for ln in ctx.container_lines() if ln.get("event_type") == "metrics"]
    assert len([m for m in metrics if m["type"] == "train"]) == EPOCHS * TRAIN_LABELS
    assert [m["metrics"]["accuracy"] for m in metrics if m["type"] == "val"][-1] == 1.0
    saved = [m for m in ctx.messages("agent") if m.startswith("model 'colours checkpoint ")]
    assert [m.split()[3].rstrip("'") for m in saved] == [f"{i:08d}" for i in range(EPOCHS)]
    model = user.get_model(user.get_task(ctx.task_id)["results"]["model_id"])
    assert {f["path"] for f in model["files"]} == {"config.json", "weights.npz"}
    config = json.loads(user.download_blob(next(f["sha256"] for f in model["files"] if f["path"] == "config.json")))
    assert config["epochs_done"] == EPOCHS, "the task's model is the last checkpoint"
    assert (cache.model_dir(ctx.config, model["hash"]) / "weights.npz").exists()

    more = ctx_for(
        type="train",
        image=plugin_image,
        command=TRAIN,
        project_id=project["id"],
        model_id=model["id"],
        config={"epochs": 1, "model_name": "colours"},
    )
    assert train.run(more).state == "finished", more.messages()[-20:]
    assert f"data ready: {len(items) + 2} files ({len(items) + 2} cached, 0 downloaded, 0.0 MB)" in more.messages(
        "agent"
    ), "the checkpoint was cached on this node when it was made"
    loaded = [ln for ln in more.container_lines() if ln["message"] == "Model weights loaded"]
    assert loaded and loaded[0]["epochs_done"] == EPOCHS
    model2 = user.get_model(user.get_task(more.task_id)["results"]["model_id"])
    cfg2 = json.loads(user.download_blob(next(f["sha256"] for f in model2["files"] if f["path"] == "config.json")))
    assert cfg2["epochs_done"] == EPOCHS + 1

    infer = ctx_for(type="inference", image=plugin_image, command=INFER, project_id=project["id"], model_id=model["id"])
    assert inference.run(infer).state == "finished", infer.messages()[-20:]
    applied = [ln for ln in infer.container_lines() if ln.get("event_type") == "model_applied"]
    assert applied, "the SDK's report_inference_finished()"
    n = len(items)
    assert (
        f"uploading project 'sample (task {infer.task_id})' from results/sample/: {n} items, {n} annotations"
        in infer.messages("agent")
    )
    check_predictions(project_summary(str(infer.task_dir / "results" / "sample"), sdk_image), original)
    pid = user.get_task(infer.task_id)["results"]["project_id"]
    out = user._list(ep.path(ep.PROJECT_ITEMS, project_id=pid))
    assert sorted(f"{i['dataset']}/{i['name']}" for i in out) == sorted(items)


# --- through the agent and the server -------------------------------------------------------


def test_sdk_end_to_end(user, server, tmp_path, plugin_image, sdk_image, sample_project, original):
    from tests.agent.conftest import AgentProcess
    from tests.cli.test_cli import cli, cli_json

    # Uploaded and (below) downloaded with the CLI, as a user would.
    project = cli_json(server, "projects", "upload", sample_project["path"], "--name", "sample")
    items = user._list(ep.path(ep.PROJECT_ITEMS, project_id=project["id"]))
    assert items and all(i.get("ann", {}).get("objects") is not None for i in items)

    agent = AgentProcess(server, tmp_path / "agent", "sdk-e2e")
    agent.start(handler=None, MIN_FREE_DISK_MB=1, STOP_GRACE=1, TASK_DIR_CLEANUP="never")
    try:
        task = user.create_task(
            agent.id,
            "train",
            image=plugin_image,
            project_id=project["id"],
            config={"epochs": EPOCHS, "lr": 0.5, "model_name": "colours"},
        )
        done = agent.wait_state(task["id"], timeout=300)
        assert done["state"] == "finished", (done.get("error"), agent.stderr()[-3000:])
        assert done["progress"] == {"current": EPOCHS, "total": EPOCHS}
        metrics = user.task_metrics(task["id"])
        assert len([m for m in metrics if m["type"] == "train"]) == EPOCHS * TRAIN_LABELS
        val = [m for m in metrics if m["type"] == "val"]
        assert [m["epoch"] for m in val] == list(range(1, EPOCHS + 1)) and val[-1]["metrics"]["accuracy"] == 1.0
        checkpoints = [m for m in user.list_models() if m.get("task_id") == task["id"]]
        assert len({m["hash"] for m in checkpoints}) == EPOCHS, checkpoints
        model = user.get_model(done["results"]["model_id"])
        config = json.loads(user.download_blob(next(f["sha256"] for f in model["files"] if f["path"] == "config.json")))
        assert config["epochs_done"] == EPOCHS, "the task's model is the last checkpoint"

        more = user.create_task(
            agent.id, "train", image=plugin_image, project_id=project["id"], model_id=model["id"], config={"epochs": 1}
        )
        done2 = agent.wait_state(more["id"], timeout=300)
        assert done2["state"] == "finished", (done2.get("error"), agent.stderr()[-3000:])
        loaded = [ln for ln in agent.logs(more["id"]) if ln["message"] == "Model weights loaded"]
        assert loaded and loaded[0]["epochs_done"] == EPOCHS

        infer = user.create_task(
            agent.id, "inference", image=plugin_image, project_id=project["id"], model_id=model["id"]
        )
        done3 = agent.wait_state(infer["id"], timeout=300)
        assert done3["state"] == "finished", (done3.get("error"), agent.stderr()[-3000:])
    finally:
        agent.kill_tree()

    result = tmp_path / "download"
    cli(server, "projects", "download", str(done3["results"]["project_id"]), str(result))
    predicted = project_summary(str(result), sdk_image)
    check_predictions(predicted, original)
    assert all(item["roundtrip"] for item in predicted["items"].values())
    for key, (img, _) in read_project(sample_project["path"])[1].items():
        ds, item = key.split("/", 1)
        assert (result / ds / "img" / item).read_bytes() == Path(img).read_bytes(), key
