"""Open a Supervisely project folder with the real SDK inside the SDK image; return a JSON summary.

On the host, `project_summary(path)` runs this same file in a container of the SDK image with
the project mounted read-only at /projects/<its folder name> (the SDK takes a project's name
from its folder). Inside, `sly.Project(dir, sly.OpenMode.READ)` opens it, every annotation is
loaded against the meta and every image is decoded, and the summary is printed as JSON:

    {"name": ..., "classes": {title: shape}, "tag_metas": {name: value_type},
     "datasets": [names], "total_items": n,
     "items": {"<ds>/<item>": {"size": [h, w], "image_shape": [h, w, c],
                               "labels": [{"class", "shape", "bbox": [top, left, bottom, right],
                                           "tags": {name: value}}],
                               "tags": {name: value}, "roundtrip": true}}}

`roundtrip` is whether `Annotation.from_json(file).to_json()` gives the file's JSON back (bitmap
masks compared decoded: the SDK re-encodes their PNGs). Later end-to-end tests use this on
projects downloaded with the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess

SCRIPT_IN_CONTAINER = "/opt/sdk_check.py"


def project_summary(path: str, image: str | None = None, timeout: float = 300) -> dict:
    """Summarise the project at `path` (a folder with meta.json) as the SDK sees it."""
    if image is None:
        from tools.sdk_image import SDK_IMAGE as image
    path = os.path.abspath(path)
    inside = f"/projects/{os.path.basename(path.rstrip('/'))}"
    proc = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{path}:{inside}:ro",
            "-v",
            f"{os.path.abspath(__file__)}:{SCRIPT_IN_CONTAINER}:ro",
            image,
            "python3",
            SCRIPT_IN_CONTAINER,
            inside,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"the SDK could not open {path} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summarise(project_dir: str) -> dict:  # runs inside the SDK image
    import numpy as np
    import supervisely as sly

    def decoded(ann_json):
        for obj in ann_json.get("objects", []):
            if "bitmap" in obj:
                obj["bitmap"]["data"] = sly.Bitmap.base64_2_data(obj["bitmap"]["data"]).astype(np.uint8).tolist()
        return ann_json

    project = sly.Project(project_dir, sly.OpenMode.READ)
    meta = project.meta
    items = {}
    for dataset in project.datasets:
        for item in dataset:
            ann_path = dataset.get_ann_path(item)
            with open(ann_path) as f:
                raw = json.load(f)
            ann = sly.Annotation.load_json_file(ann_path, meta)
            img = sly.image.read(dataset.get_img_path(item))
            labels = []
            for label in ann.labels:
                bbox = label.geometry.to_bbox()
                labels.append(
                    {
                        "class": label.obj_class.name,
                        "shape": label.geometry.geometry_name(),
                        "bbox": [bbox.top, bbox.left, bbox.bottom, bbox.right],
                        "tags": {t.name: t.value for t in label.tags},
                    }
                )
            items[f"{dataset.name}/{item}"] = {
                "size": list(ann.img_size),
                "image_shape": list(img.shape),
                "labels": labels,
                "tags": {t.name: t.value for t in ann.img_tags},
                "roundtrip": decoded(ann.to_json()) == decoded(raw),
            }
    return {
        "name": project.name,
        "total_items": project.total_items,
        "datasets": sorted(ds.name for ds in project.datasets),
        "classes": {c.name: c.geometry_type.geometry_name() for c in meta.obj_classes},
        "tag_metas": {t.name: t.value_type for t in meta.tag_metas},
        "items": items,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(_summarise(sys.argv[1])))
