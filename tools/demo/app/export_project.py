"""The demo's App: export the task's project as a .tar to team files, standard library only.

An App in the protocol sense: it reads the environment an App gets (SERVER_ADDRESS, API_TOKEN,
TASK_ID, TEAM_ID, PROJECT_ID) and calls the same public API methods, with the same bodies, that
the Supervisely SDK calls for `sly.download_project`, `api.file.upload` and
`api.task.set_output_archive` (POST <SERVER_ADDRESS>/public/api/v3/<method>, header x-api-key).
The demo cannot ship the 825 MB SDK; the tests run the real SDK (tests/sdk/apps).

The archive holds a Supervisely project folder named after the project: meta.json and, per
dataset, img/<image> and ann/<image>.json. It is uploaded to /exports/<task id>/<name>.tar and
set as the task's output. Progress lines are the SDK's JSON log lines, so the node shows them.
"""

import hashlib
import io
import json
import math
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid

BATCH = 50  # ids per bulk request, as the SDK's `batched` default


class Api:
    """POST public API methods with the App's token; JSON in, JSON (or raw bytes) out."""

    def __init__(self, server: str, token: str):
        self.base = server.rstrip("/") + "/public/api/v3/"
        self.token = token

    def call(self, method: str, body: bytes, content_type: str):
        headers = {"x-api-key": self.token, "Content-Type": content_type}
        req = urllib.request.Request(self.base + method, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.headers.get("Content-Type", ""), r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise SystemExit(f"{method} answered {e.code}: {detail}") from None

    def post(self, method: str, body: dict):
        _, data = self.call(method, json.dumps(body).encode(), "application/json")
        return json.loads(data)

    def all_pages(self, method: str, body: dict) -> list:
        """Every entity of a paged list method ({total, perPage, pagesCount, entities})."""
        first = self.post(method, body)
        out = list(first["entities"])
        for page in range(2, first["pagesCount"] + 1):
            out += self.post(method, {**body, "page": page, "per_page": first["perPage"]})["entities"]
        if len(out) != first["total"]:
            raise SystemExit(f"{method}: {len(out)} entities of {first['total']}")
        return out


def log(message: str, **fields) -> None:
    """One JSON log line as the SDK's logger writes it."""
    line = {"message": message, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "level": "info", **fields}
    print(json.dumps(line), flush=True)


def progress(subtask: str, current: int, total: int) -> None:
    log("progress", event_type="EventType.PROGRESS", subtask=subtask, current=current, total=total)


def multipart_parts(content_type: str, body: bytes):
    """(name, bytes) of every part of a multipart body (the `name` of its Content-Disposition)."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        yield name, data[:-2] if data.endswith(b"\r\n") else data


def multipart_body(fields: list) -> tuple[bytes, str]:
    """A multipart/form-data body of (name, value) text fields and (name, (filename, bytes)) files."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
            out.write(b"Content-Type: application/x-tar\r\n\r\n" + data + b"\r\n")
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _floor_points(points, height: int, width: int) -> None:
    for p in points:
        p[0] = math.floor(p[0]) - 1 if p[0] == width else math.floor(p[0])
        p[1] = math.floor(p[1]) - 1 if p[1] == height else math.floor(p[1])


def to_pixel(ann: dict) -> dict:
    """An annotation as the server answers it (the labeling tool's subpixel coordinates) in the
    pixel coordinates of a project on disk, as the SDK converts it
    (`Annotation._to_pixel_coordinate_system_json`) for the geometries the demo project has."""
    height, width = ann["size"]["height"], ann["size"]["width"]
    for obj in ann.get("objects", []):
        points = obj.get("points") or {}
        if obj.get("geometryType") == "rectangle":
            (x1, y1), (x2, y2) = points["exterior"]
            left, right = sorted((round(x1), round(x2)))
            top, bottom = sorted((round(y1), round(y2)))
            points["exterior"] = [[left, top], [max(left, right - 1), max(top, bottom - 1)]]
            continue
        _floor_points(points.get("exterior", []), height, width)
        for hole in points.get("interior", []):
            _floor_points(hole, height, width)
        if "bitmap" in obj:
            obj["bitmap"]["origin"] = [math.floor(v) for v in obj["bitmap"]["origin"]]
    return ann


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def export(api: Api, project_id: int, tar: tarfile.TarFile) -> tuple[str, int]:
    """Write the project into `tar` as a Supervisely project folder; its name and image count."""
    project = api.post("projects.info", {"id": project_id})
    name = project["name"]
    meta = api.post("projects.meta", {"id": project_id})
    add_file(tar, f"{name}/meta.json", json.dumps(meta, indent=4).encode())
    count = 0
    for dataset in api.all_pages("datasets.list", {"projectId": project_id}):
        images = api.all_pages("images.list", {"datasetId": dataset["id"]})
        names = {image["id"]: image["name"] for image in images}
        for start in range(0, len(images), BATCH):
            ids = [image["id"] for image in images[start : start + BATCH]]
            body = {"datasetId": dataset["id"], "imageIds": ids}
            for info in api.post("annotations.bulk.info", body):
                ann = json.dumps(to_pixel(info["annotation"]), indent=4).encode()
                add_file(tar, f"{name}/{dataset['name']}/ann/{names[info['imageId']]}.json", ann)
            ctype, data = api.call("images.bulk.download", json.dumps(body).encode(), "application/json")
            for image_id, content in multipart_parts(ctype, data):
                add_file(tar, f"{name}/{dataset['name']}/img/{names[int(image_id)]}", content)
            count += len(ids)
            progress(f"Downloading images from {dataset['name']!r}", count, project.get("imagesCount") or count)
    return name, count


def main() -> int:
    api = Api(os.environ["SERVER_ADDRESS"], os.environ["API_TOKEN"])
    task_id, team_id = int(os.environ["TASK_ID"]), int(os.environ["TEAM_ID"])
    project_id = int(os.environ["PROJECT_ID"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        name, count = export(api, project_id, tar)
    archive = buf.getvalue()
    log(f"project {name!r}: {count} images packed, {len(archive)} bytes")

    remote_dir, file_name = f"/exports/{task_id}/", f"{name}.tar"
    body, ctype = multipart_body([("name", file_name), ("path", remote_dir), ("file", (file_name, archive))])
    _, answer = api.call(f"file-storage.bulk.upload?teamId={team_id}", body, ctype)
    uploaded = json.loads(answer)[0]
    # What api.task.set_output_archive sends: the file's info, then the output.
    info = api.post("file-storage.info", {"id": uploaded["id"]})
    output = {
        "general": {
            "icon": {"className": "zmdi zmdi-archive", "color": "#33c94c", "backgroundColor": "#d9f7e4"},
            "title": file_name,
            "titleUrl": info.get("storagePath"),
            "download": True,
            "description": "Download archive",
        }
    }
    api.post("tasks.output.set", {"taskId": task_id, "output": output})
    log(
        f"archive uploaded to team files: {remote_dir}{file_name}",
        file_id=uploaded["id"],
        size=len(archive),
        sha256=hashlib.sha256(archive).hexdigest(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
