"""A legacy-style Supervisely NN plugin trainer, written against the real SDK (6.74.51).

It follows supervisely/nn/legacy/hosted/trainer.py: the task config from TaskPaths, the one
project under data/, checkpoints through TrainCheckpoints (results/00000000, 00000001, ...,
each announced with report_checkpoint_saved), metrics with report_metrics_training and
report_metrics_validation, progress with sly.Progress. The "network" is tiny and needs no
torch: one mean RGB colour per object class, moved towards the colours seen under that class's
labels at `lr` per epoch. With a model in /sly_task_data/model it starts from those weights.

Config keys (all optional): epochs, lr, val_datasets (names; default: the last dataset).
"""

import json
import os
from copy import deepcopy

import numpy as np
import supervisely as sly
from supervisely.io import fs as sly_fs
from supervisely.io.json import dump_json_file
from supervisely.nn.legacy.config import update_recursively
from supervisely.nn.legacy.hosted.trainer import TrainCheckpoints
from supervisely.task.progress import epoch_float, report_metrics_training, report_metrics_validation

WEIGHTS = "weights.npz"
DEFAULT_CONFIG = {"epochs": 3, "lr": 0.5, "val_datasets": None}


def load_config():
    with open(sly.TaskPaths.TASK_CONFIG_PATH) as f:
        task_config = json.load(f)
    sly.logger.info("Input config", extra={"config": task_config})
    config = deepcopy(DEFAULT_CONFIG)
    update_recursively(config, task_config)
    sly.logger.info("Full config", extra={"config": config})
    return config


def class_colours(project, ds_names):
    """(class title, mean RGB) for every label of the given datasets, one pair per label."""
    samples = []
    for dataset in project.datasets:
        if dataset.name not in ds_names:
            continue
        for item in dataset:
            img = sly.image.read(dataset.get_img_path(item))
            ann = sly.Annotation.load_json_file(dataset.get_ann_path(item), project.meta)
            for label in ann.labels:
                mask = np.zeros(img.shape[:2], dtype=bool)
                label.draw(mask, color=True)
                if mask.any():
                    samples.append((label.obj_class.name, img[mask].mean(axis=0)))
    return samples


def nearest(means, colour):
    return int(np.argmin(np.linalg.norm(means - colour, axis=1)))


def main():
    config = load_config()
    project = sly.read_single_project(sly.TaskPaths.DATA_DIR)
    sly.logger.info(f"Project structure has been read. Samples: {project.total_items}.")
    ds_names = [ds.name for ds in project.datasets]
    val_names = set(config["val_datasets"] or ds_names[-1:])
    train_names = set(ds_names) - val_names or val_names

    classes = [c.name for c in project.meta.obj_classes]
    means = np.zeros((len(classes), 3))
    epochs_before = 0
    if sly_fs.file_exists(sly.TaskPaths.MODEL_CONFIG_PATH):
        with open(sly.TaskPaths.MODEL_CONFIG_PATH) as f:
            model_config = json.load(f)
        weights = np.load(os.path.join(sly.TaskPaths.MODEL_DIR, WEIGHTS))
        known = dict(zip(model_config["classes"], weights["means"], strict=True))
        means = np.array([known.get(c, np.zeros(3)) for c in classes], dtype=float)
        epochs_before = model_config.get("epochs_done", 0)
        sly.logger.info("Model weights loaded", extra={"classes": list(known), "epochs_done": epochs_before})

    train = class_colours(project, train_names)
    val = class_colours(project, val_names)
    sly.logger.info("Samples collected", extra={"train_labels": len(train), "val_labels": len(val)})

    checkpoints = TrainCheckpoints(sly.TaskPaths.RESULTS_DIR)
    best_val = None
    epochs = int(config["epochs"])
    progress = sly.Progress("Epochs", epochs)
    for epoch in range(epochs):
        for it, (title, colour) in enumerate(train):
            idx = classes.index(title)
            loss = float(np.linalg.norm(means[idx] - colour) / 255.0)
            means[idx] += config["lr"] * (colour - means[idx])
            report_metrics_training(epoch_float(epoch, it + 1, len(train)), {"loss": loss})

        val_loss = float(np.mean([np.linalg.norm(means[classes.index(t)] - c) / 255.0 for t, c in val]))
        accuracy = float(np.mean([classes[nearest(means, c)] == t for t, c in val]))
        report_metrics_validation(epoch + 1.0, {"loss": val_loss, "accuracy": accuracy})

        out_dir = checkpoints.get_dir_to_write()
        np.savez(os.path.join(out_dir, WEIGHTS), means=means)
        dump_json_file(
            {"settings": config, "classes": classes, "epochs_done": epochs_before + epoch + 1, "val_loss": val_loss},
            os.path.join(out_dir, sly.TaskPaths.MODEL_CONFIG_NAME),
        )
        is_best = best_val is None or val_loss < best_val
        best_val = val_loss if is_best else best_val
        checkpoints.saved(
            is_best,
            sly_fs.get_directory_size(out_dir),
            {"epoch": epoch + 1, "val_loss": val_loss, "accuracy": accuracy},
        )
        progress.iter_done_report()

    sly.logger.info("Training finished", extra={"best_val_loss": best_val})


if __name__ == "__main__":
    sly.main_wrapper("TRAIN", main)
