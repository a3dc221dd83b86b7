"""Train a tiny colour model and predict with it: a headless Supervisely App on the real SDK (6.74.51).

Written only against `sly.Api`, as an App developer writes one. It reads everything through the
public API: the project and its meta, its datasets (`api.dataset.get_list`), their images
(`api.image.get_list`, the bytes with `api.image.download_paths`) and annotations
(`api.annotation.download_batch`). The "network" needs no torch: one mean RGB colour per object
class, moved towards the colours under that class's labels at `lr` per epoch (deterministic).
Each epoch's weights are a checkpoint in team files (`api.file.upload`,
`/train/<task id>/checkpoints/epoch_<n>.json`); `sly.Progress("Epochs", ...)` reports the epochs.

Then it predicts: a new project `<name> predictions` (`api.project.create`, `update_meta` with
the input meta plus one rectangle class `<class>_pred` per class), the same datasets
(`api.dataset.create`), every image copied by id (`api.image.upload_ids`), each one's pixels
read back with `api.image.download_np` and annotated with its original labels plus, per class,
the bounding box of the pixels near that class's colour with a `confidence` tag
(`api.annotation.upload_anns`). The new project is the task's output (`set_output_project`).

MODAL_STATE keys (all optional): epochs (3), lr (0.5), max_distance (40), min_pixels (4).
"""

import hashlib
import json
import os

import numpy as np
import supervisely as sly

SUFFIX = "_pred"
CONFIDENCE = "confidence"


def modal_state():
    return json.loads(os.environ.get("MODAL_STATE") or "{}")


def read_project(api, project_id, data_dir):
    """[(dataset, [(image info, image path, annotation)])] of every dataset, read through the API."""
    meta = sly.ProjectMeta.from_json(api.project.get_meta(project_id))
    out = []
    for dataset in api.dataset.get_list(project_id):
        images = api.image.get_list(dataset.id)
        ids = [image.id for image in images]
        folder = os.path.join(data_dir, "images", str(dataset.id))
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, image.name) for image in images]
        api.image.download_paths(dataset.id, ids, paths)
        anns = api.annotation.download_batch(dataset.id, ids)
        by_id = {a.image_id: sly.Annotation.from_json(a.annotation, meta) for a in anns}
        out.append((dataset, [(image, path, by_id[image.id]) for image, path in zip(images, paths, strict=True)]))
    return meta, out


def label_colours(items):
    """(class title, mean RGB under the label) for every label of every item."""
    samples = []
    for _, path, ann in items:
        img = sly.image.read(path)
        for label in ann.labels:
            mask = np.zeros(img.shape[:2], dtype=bool)
            label.draw(mask, color=True)
            if mask.any():
                samples.append((label.obj_class.name, img[mask].mean(axis=0)))
    return samples


def save_checkpoint(api, team_id, task_id, data_dir, epoch, classes, means):
    local = os.path.join(data_dir, "checkpoints", f"epoch_{epoch}.json")
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, "w") as f:
        json.dump({"epoch": epoch, "classes": classes, "means": [[round(v, 4) for v in m] for m in means]}, f)
    info = api.file.upload(team_id, local, f"/train/{task_id}/checkpoints/epoch_{epoch}.json")
    with open(local, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    sly.logger.info("checkpoint saved", extra={"epoch": epoch, "path": info.path, "file_id": info.id, "sha256": digest})


def predict(img, means, classes, pred_classes, confidence_meta, state):
    """One `<class>_pred` rectangle per class whose colour is near enough to enough pixels."""
    labels = []
    img = img.astype(float)
    for title, mean in zip(classes, means, strict=True):
        distance = np.linalg.norm(img - mean, axis=2)
        rows, cols = np.nonzero(distance <= state["max_distance"])
        if len(rows) < state["min_pixels"]:
            continue
        rect = sly.Rectangle(int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
        score = round(float(1.0 - distance[rows, cols].mean() / state["max_distance"]), 4)
        tags = sly.TagCollection([sly.Tag(confidence_meta, score)])
        labels.append(sly.Label(rect, pred_classes[title], tags=tags))
    return labels


def main():
    api = sly.Api.from_env()
    task_id = sly.env.task_id()
    team_id = sly.env.team_id()
    workspace_id = sly.env.workspace_id()
    project_id = sly.env.project_id()
    state = {"epochs": 3, "lr": 0.5, "max_distance": 40.0, "min_pixels": 4, **modal_state()}
    task = api.task.get_info_by_id(task_id)
    sly.logger.info("Training starts", extra={"task_id": task["id"], "state": state})

    project = api.project.get_info_by_id(project_id)
    data_dir = sly.app.get_data_dir()
    meta, datasets = read_project(api, project.id, data_dir)
    items = [item for _, ds_items in datasets for item in ds_items]
    samples = label_colours(items)
    sly.logger.info("Samples collected", extra={"images": len(items), "labels": len(samples)})

    classes = [c.name for c in meta.obj_classes]
    means = np.zeros((len(classes), 3))
    epochs = int(state["epochs"])
    progress = sly.Progress("Epochs", epochs)
    for epoch in range(1, epochs + 1):
        for title, colour in samples:
            idx = classes.index(title)
            means[idx] += state["lr"] * (colour - means[idx])
        save_checkpoint(api, team_id, task_id, data_dir, epoch, classes, means.tolist())
        progress.iter_done_report()

    pred_classes = {title: sly.ObjClass(title + SUFFIX, sly.Rectangle) for title in classes}
    out_meta = meta.add_obj_classes(list(pred_classes.values()))
    if out_meta.get_tag_meta(CONFIDENCE) is None:
        out_meta = out_meta.add_tag_meta(sly.TagMeta(CONFIDENCE, sly.TagValueType.ANY_NUMBER))
    confidence_meta = out_meta.get_tag_meta(CONFIDENCE)
    out_project = api.project.create(workspace_id, f"{project.name} predictions", change_name_if_conflict=True)
    api.project.update_meta(out_project.id, out_meta)

    progress = sly.Progress("Predicting", len(items))
    for dataset, ds_items in datasets:
        out_dataset = api.dataset.create(out_project.id, dataset.name)
        copies = api.image.upload_ids(
            out_dataset.id, [image.name for image, _, _ in ds_items], [image.id for image, _, _ in ds_items]
        )
        anns = []
        for image, _, ann in ds_items:
            labels = predict(api.image.download_np(image.id), means, classes, pred_classes, confidence_meta, state)
            anns.append(ann.add_labels(labels))
            progress.iter_done_report()
        api.annotation.upload_anns([copy.id for copy in copies], anns)

    api.task.set_output_project(task_id, out_project.id, out_project.name)
    sly.logger.info("Predictions uploaded", extra={"project_id": out_project.id, "project_name": out_project.name})


if __name__ == "__main__":
    sly.main_wrapper("TRAIN_APP", main)
