"""A legacy-style Supervisely NN plugin inference, written against the real SDK (6.74.51).

It follows supervisely/nn/legacy/hosted/inference_batch.py (BatchInferenceApplier): the model
from TaskPaths.MODEL_DIR, the one project under data/, a new project at
results/<input project name> whose meta is the input meta plus the model's classes renamed
with a suffix ("_pred", the legacy `model_classes.add_suffix`), every input item copied with
its annotation plus the predicted labels, progress "Model applying: ", and finally
report_inference_finished() (the MODEL_APPLIED event).

Prediction: for every class of the model, the pixels whose colour is within `max_distance` of
the class's mean colour; their bounding box is one rectangle `<class>_pred` with a
`confidence` tag (the mean closeness of those pixels, 0..1).
"""

import json
import os
from copy import deepcopy

import numpy as np
import supervisely as sly
from supervisely.nn.legacy.config import update_recursively
from supervisely.task.progress import report_inference_finished

WEIGHTS = "weights.npz"
DEFAULT_CONFIG = {"model_classes": {"add_suffix": "_pred"}, "max_distance": 40.0, "min_pixels": 4}
CONFIDENCE = "confidence"


def load_config():
    with open(sly.TaskPaths.TASK_CONFIG_PATH) as f:
        task_config = json.load(f)
    config = deepcopy(DEFAULT_CONFIG)
    update_recursively(config, task_config)
    sly.logger.info("Full inference config", extra={"config": config})
    return config


def main():
    config = load_config()
    with open(sly.TaskPaths.MODEL_CONFIG_PATH) as f:
        model_config = json.load(f)
    means = np.load(os.path.join(sly.TaskPaths.MODEL_DIR, WEIGHTS))["means"]
    suffix = config["model_classes"]["add_suffix"]
    model_classes = [sly.ObjClass(title + suffix, sly.Rectangle) for title in model_config["classes"]]

    in_project = sly.read_single_project(sly.TaskPaths.DATA_DIR)
    sly.logger.info(f"Project structure has been read. Samples: {in_project.total_items}.")
    out_meta = in_project.meta.add_obj_classes(model_classes)
    if out_meta.get_tag_meta(CONFIDENCE) is None:
        out_meta = out_meta.add_tag_meta(sly.TagMeta(CONFIDENCE, sly.TagValueType.ANY_NUMBER))
    confidence_meta = out_meta.get_tag_meta(CONFIDENCE)

    out_project = sly.Project(os.path.join(sly.TaskPaths.RESULTS_DIR, in_project.name), sly.OpenMode.CREATE)
    out_project.set_meta(out_meta)
    progress = sly.Progress("Model applying: ", in_project.total_items)
    for in_dataset in in_project:
        out_dataset = out_project.create_dataset(in_dataset.name)
        for item in in_dataset:
            paths = in_dataset.get_item_paths(item)
            ann = sly.Annotation.load_json_file(paths.ann_path, out_meta)
            img = sly.image.read(paths.img_path).astype(float)
            labels = []
            for obj_class, mean in zip(model_classes, means, strict=True):
                distance = np.linalg.norm(img - mean, axis=2)
                rows, cols = np.nonzero(distance <= config["max_distance"])
                if len(rows) < config["min_pixels"]:
                    continue
                rect = sly.Rectangle(int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max()))
                score = round(float(1.0 - distance[rows, cols].mean() / config["max_distance"]), 4)
                tags = sly.TagCollection([sly.Tag(confidence_meta, score)])
                labels.append(sly.Label(rect, obj_class, tags=tags))
            out_dataset.add_item_file(item, paths.img_path, ann=ann.add_labels(labels))
            progress.iter_done_report()

    report_inference_finished()


if __name__ == "__main__":
    sly.main_wrapper("INFERENCE", main)
