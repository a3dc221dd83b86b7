"""Legacy Supervisely NN plugin code on the real SDK, in a task directory laid out by hand exactly
as the real Supervisely agent lays it out (agent/worker/task_train.py, task_inference.py,
task_dockerized.py), and started the way it starts it: entrypoint
`sh -c "python -u /workdir/src/<train|inference>.py"`, the task dir bound at /sly_task_data,
LOG_LEVEL=DEBUG, LANG=C.UTF-8, PYTHONUNBUFFERED=1, a shm size.

These pin what the agent's parser and result handling must accept: the exact JSON lines of
sly.Progress, report_metrics_training/validation, report_checkpoint_saved,
report_inference_finished and main_wrapper's crash report.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from tests.sdk.sdk_check import project_summary

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

PROGRESS, METRICS, CHECKPOINT = "EventType.PROGRESS", "EventType.METRICS", "EventType.CHECKPOINT"
MODEL_APPLIED, TASK_CRASHED = "EventType.MODEL_APPLIED", "EventType.TASK_CRASHED"
EPOCHS = 3
TRAIN_LABELS = 9  # ds0: 3 items x 3 labels; ds1 is the validation dataset


def lay_out_task_dir(root: str, config: dict, project: str | None, model: str | None = None) -> str:
    """The real agent's task dir: both config files = the config, data/<project>/, model/, results/, tmp/."""
    os.makedirs(root)
    for name in ("task_config.json", "task_settings.json"):
        with open(os.path.join(root, name), "w") as f:
            json.dump(config, f)
    os.makedirs(os.path.join(root, "data"))
    if project:
        shutil.copytree(project, os.path.join(root, "data", os.path.basename(project)))
    if model:
        shutil.copytree(model, os.path.join(root, "model"))  # the model's files at model/'s root
    else:
        os.makedirs(os.path.join(root, "model"))
    for d in ("results", "tmp"):
        os.makedirs(os.path.join(root, d))
    return root


def run_entrypoint(client, image: str, task_dir: str, script: str, task_id: int, timeout: float = 300) -> dict:
    """Run the plugin's script as the real agent does; return exit code, events, stdout and stderr.

    The SDK's logger is a logging.StreamHandler(): its JSON lines go to stderr. The real agent
    reads both streams together (`container.logs(stream=True)`); so do the events here.
    """
    container = client.containers.run(
        image,
        entrypoint=["sh", "-c", f"python -u /workdir/src/{script}"],
        detach=True,
        volumes={task_dir: {"bind": "/sly_task_data", "mode": "rw"}},
        environment={
            "LOG_LEVEL": "DEBUG",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "HOST_TASK_DIR": task_dir,
            "PIP_ROOT_USER_ACTION": "ignore",
            "TASK_ID": str(task_id),
        },
        labels={"sly-test": "sdk"},
        shm_size="256m",
        network_mode="none",
    )
    try:
        rc = container.wait(timeout=timeout)["StatusCode"]
        both = container.logs(stdout=True, stderr=True).decode()
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    events, raw = [], []
    for line in both.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            raw.append(line)
    return {"rc": rc, "events": events, "raw": raw, "stdout": out, "stderr": err, "task_dir": task_dir}


def of_type(run: dict, event_type: str, **match) -> list[dict]:
    return [
        e for e in run["events"] if e.get("event_type") == event_type and all(e.get(k) == v for k, v in match.items())
    ]


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def iou(a: list[int], b: list[int]) -> float:
    top, left, bottom, right = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, bottom - top + 1) * max(0, right - left + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def fresh_train(tmp_path_factory, docker_client, plugin_image, sample_project):
    task_dir = lay_out_task_dir(
        str(tmp_path_factory.mktemp("train") / "task"), {"epochs": EPOCHS, "lr": 0.5}, sample_project["path"]
    )
    run = run_entrypoint(docker_client, plugin_image, task_dir, "train.py", 101)
    assert run["rc"] == 0, run["stderr"][-3000:]
    return run


@pytest.fixture(scope="module")
def sample_summary(sdk_image, sample_project):
    return project_summary(sample_project["path"], sdk_image)


def test_sample_project_opens_with_the_sdk(sample_summary, sample_project):
    summary = sample_summary

    assert summary["name"] == "sample" and summary["datasets"] == ["ds0", "ds1"]
    assert summary["classes"] == {"square": "rectangle", "triangle": "polygon", "blob": "bitmap"}
    assert summary["tag_metas"] == {"weather": "oneof_string", "difficult": "none", "confidence": "any_number"}
    assert summary["items"].keys() == sample_project["items"].keys()
    for key, item in summary["items"].items():
        assert sorted(lb["class"] for lb in item["labels"]) == sample_project["items"][key]["labels"]
        assert list(item["tags"]) == sample_project["items"][key]["tags"] == ["weather"]
        assert item["image_shape"] == item["size"] + [3]
        assert item["roundtrip"], f"{key}: the SDK does not write back the JSON it read"


def test_train_prints_progress_metrics_and_checkpoints(fresh_train):
    events, results = fresh_train["events"], os.path.join(fresh_train["task_dir"], "results")
    assert all({"message", "timestamp", "level"} <= e.keys() for e in events)
    assert fresh_train["raw"] == [] and fresh_train["stdout"] == ""  # every SDK line is JSON, on stderr

    progress = of_type(fresh_train, PROGRESS)
    assert [(p["message"], p["subtask"], p["current"], p["total"]) for p in progress] == [
        ("progress", "Epochs", i, EPOCHS) for i in range(EPOCHS + 1)
    ]

    train = of_type(fresh_train, METRICS, type="train")
    assert len(train) == EPOCHS * TRAIN_LABELS
    epochs = [m["epoch"] for m in train]
    assert epochs == sorted(epochs) and epochs[-1] == float(EPOCHS) and 0 < epochs[0] < 1
    assert train[-1]["metrics"]["loss"] < train[0]["metrics"]["loss"] / 5

    val = of_type(fresh_train, METRICS, type="val")
    assert [(m["message"], m["epoch"], sorted(m["metrics"])) for m in val] == [
        ("metrics", float(e), ["accuracy", "loss"]) for e in range(1, EPOCHS + 1)
    ]
    assert val[-1]["metrics"]["accuracy"] == 1.0

    checkpoints = of_type(fresh_train, CHECKPOINT)
    assert [(c["message"], c["id"], c["subdir"]) for c in checkpoints] == [
        ("checkpoint", i, f"{i:08d}") for i in range(EPOCHS)
    ]
    assert checkpoints[0]["best_now"] is True
    for c in checkpoints:
        ckpt = os.path.join(results, c["subdir"])
        assert sorted(os.listdir(ckpt)) == ["config.json", "weights.npz"]
        assert c["sizeb"] == dir_size(ckpt)
        with open(os.path.join(ckpt, "config.json")) as f:
            assert json.load(f)["epochs_done"] == c["id"] + 1
        assert c["optional"]["epoch"] == c["id"] + 1
    # Each checkpoint comes after its epoch's validation metrics.
    order = [
        e["event_type"] for e in events if e.get("event_type") in (CHECKPOINT, METRICS) and e.get("type") != "train"
    ]
    assert order == [METRICS, CHECKPOINT] * EPOCHS
    # TrainCheckpoints makes the next checkpoint's folder before it is needed: it stays empty.
    assert sorted(os.listdir(results)) == [f"{i:08d}" for i in range(EPOCHS + 1)]
    assert os.listdir(os.path.join(results, f"{EPOCHS:08d}")) == []


def test_continue_training_starts_from_the_model(tmp_path, docker_client, plugin_image, sample_project, fresh_train):
    last = of_type(fresh_train, CHECKPOINT)[-1]["subdir"]
    model = os.path.join(fresh_train["task_dir"], "results", last)
    task_dir = lay_out_task_dir(str(tmp_path / "task"), {"epochs": 1}, sample_project["path"], model)
    run = run_entrypoint(docker_client, plugin_image, task_dir, "train.py", 102)

    assert run["rc"] == 0, run["stderr"][-3000:]
    loaded = [e for e in run["events"] if e["message"] == "Model weights loaded"]
    assert loaded and loaded[0]["epochs_done"] == EPOCHS
    first_loss = of_type(run, METRICS, type="train")[0]["metrics"]["loss"]
    assert first_loss < of_type(fresh_train, METRICS, type="train")[0]["metrics"]["loss"] / 5
    [ckpt] = of_type(run, CHECKPOINT)
    with open(os.path.join(task_dir, "results", ckpt["subdir"], "config.json")) as f:
        assert json.load(f)["epochs_done"] == EPOCHS + 1


def test_inference_writes_a_project_with_predictions(
    tmp_path, docker_client, plugin_image, sdk_image, sample_project, sample_summary, fresh_train
):
    last = of_type(fresh_train, CHECKPOINT)[-1]["subdir"]
    model = os.path.join(fresh_train["task_dir"], "results", last)
    task_dir = lay_out_task_dir(str(tmp_path / "task"), {}, sample_project["path"], model)
    run = run_entrypoint(docker_client, plugin_image, task_dir, "inference.py", 103)

    assert run["rc"] == 0, run["stderr"][-3000:]
    n = len(sample_project["items"])
    assert [(p["subtask"], p["current"], p["total"]) for p in of_type(run, PROGRESS)] == [
        ("Model applying: ", i, n) for i in range(n + 1)
    ]
    applied = [e for e in run["events"] if "event_type" in e][-1]
    assert (applied["event_type"], applied["message"]) == (MODEL_APPLIED, "model applied")

    assert os.listdir(os.path.join(task_dir, "results")) == ["sample"]
    predicted = project_summary(os.path.join(task_dir, "results", "sample"), sdk_image)
    original = sample_summary
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
        kept = [lb for lb in item["labels"] if not lb["class"].endswith("_pred")]
        assert kept == before["labels"]
        preds = {lb["class"][: -len("_pred")]: lb for lb in item["labels"] if lb["class"].endswith("_pred")}
        assert sorted(preds) == sorted(original["classes"])
        for truth in before["labels"]:
            pred = preds[truth["class"]]
            assert pred["shape"] == "rectangle" and 0 < pred["tags"]["confidence"] <= 1
            assert iou(pred["bbox"], truth["bbox"]) >= 0.5, (key, truth, pred)


def test_a_crash_is_reported_as_task_crashed(tmp_path, docker_client, plugin_image):
    task_dir = lay_out_task_dir(str(tmp_path / "task"), {"epochs": 1}, project=None)
    run = run_entrypoint(docker_client, plugin_image, task_dir, "train.py", 104)

    assert run["rc"] == 1
    [crash] = of_type(run, TASK_CRASHED)
    # The SDK names the CRITICAL level "fatal" (sly_logger.LOGGING_LEVELS).
    assert crash["level"] == "fatal" and crash["main_name"] == "TRAIN"
    assert "doesn't contain valid project folder" in crash["exc_str"]
    # LOG_LEVEL=DEBUG (what the real agent sets) makes main_wrapper re-raise: a traceback on stderr.
    assert "Traceback" in run["stderr"]


def test_images_are_cached(docker_client, sdk_image, plugin_image):
    from tools.sdk_image import ensure_plugin_image, ensure_sdk_image

    before = docker_client.images.get(plugin_image).id
    t0 = time.monotonic()
    assert ensure_sdk_image(docker_client, log=lambda m: None) == sdk_image
    assert ensure_plugin_image(docker_client, base=sdk_image, log=lambda m: None) == plugin_image
    assert time.monotonic() - t0 < 10
    assert docker_client.images.get(plugin_image).id == before
    assert docker_client.images.get(plugin_image).attrs["Config"]["Cmd"] in (None, [])
