"""The public API's write methods (server/public/write.py): raw requests with good and hostile
input, the multipart reader in process, and one run of the real SDK (6.74.51) on the host that
creates, uploads and `sly.upload_project`s, then reads the result back through the user API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import server.public.files  # noqa: F401  (see HUGE's comment)
import server.public.read  # noqa: F401
import server.public.tasks  # noqa: F401
from protocol.errors import APIError
from protocol.sly_format import empty_ann
from server.files.multipart import MultipartReader
from tests.support.apps import start_app
from tools.sample_project import png_bytes, write_sample_project

# Importing write.py registers its methods in this process, where the session's server runs; the
# router loads the method modules only when it finds none registered, so all of them are imported.
HUGE = 1 << 40  # past every id column


def png(width: int, height: int, shade: int = 0) -> bytes:
    """A small RGB PNG; `shade` makes its bytes (and hash) differ."""
    row = bytes([shade % 256, 7, 9]) * width
    return png_bytes(width, height, [row] * height, 2)


def sly_hash(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A multipart/form-data body as the SDK's MultipartEncoder sends images.bulk.upload."""
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{i}-file"; filename="{i}"\r\n'
        f"Content-Type: image/*\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(parts)
    )
    return body + f"--{boundary}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def upload(app, parts: list[bytes]):
    body, headers = multipart(parts)
    return app.call("images.bulk.upload", data=body, headers=headers)


@pytest.fixture
def app(server, client, make_agent):
    return start_app(server, client, make_agent)


def new_project(app, name: str, meta: dict | None = None) -> tuple[dict, dict]:
    p = app.json("projects.add", {"name": name, "workspaceId": 1, "type": "images"})
    if meta is not None:
        app.json("projects.meta.update", {"id": p["id"], "meta": meta})
    ds = app.json("datasets.add", {"projectId": p["id"], "name": "ds0"})
    return p, ds


def add_images(app, ds_id: int, named: dict[str, bytes]) -> list[dict]:
    r = upload(app, list(named.values()))
    assert r.status_code == 200, r.text
    images = [{"title": n, "hash": sly_hash(d)} for n, d in named.items()]
    return app.json("images.bulk.add", {"datasetId": ds_id, "images": images})


META = {
    "classes": [
        {"title": "box", "shape": "rectangle", "color": "#FF0000"},
        {"title": "dot", "shape": "point", "color": "#00FF00"},
    ],
    "tags": [{"name": "kind", "value_type": "oneof_string", "values": ["a", "b"]}],
}


def box_ann(h: int, w: int, tag: str = "a") -> dict:
    """An annotation in the subpixel coordinates the SDK posts (a rectangle's far corner one on)."""
    return {
        "description": "",
        "size": {"height": h, "width": w},
        "tags": [{"name": "kind", "value": tag}],
        "objects": [
            {
                "classTitle": "box",
                "geometryType": "rectangle",
                "tags": [],
                "points": {"exterior": [[1, 2], [4, 6]], "interior": []},
            },
            {
                "classTitle": "dot",
                "geometryType": "point",
                "tags": [],
                "points": {"exterior": [[3.5, 2.5]], "interior": []},
            },
        ],
    }


def stored_items(client, pid: int) -> dict[str, dict]:
    items, _ = client.project_items_page(pid)
    return {it["name"]: it for it in items}


# --- projects and datasets ---


def test_projects_and_datasets_are_made_by_the_app_and_names_clash_as_supervisely_says(app, client):
    p, ds = new_project(app, "w-proj-1")
    assert p["name"] == "w-proj-1" and p["workspaceId"] == 1 and p["type"] == "images"
    assert ds["projectId"] == p["id"] and ds["name"] == "ds0" and ds["itemsCount"] == 0
    stored = client.get_project(p["id"])
    assert stored["task_id"] == app.task_id
    assert stored["datasets"] == [{"name": "ds0", "items_count": 0, "id": ds["id"]}]

    clash = app.call("projects.add", {"name": "w-proj-1", "workspaceId": 1})
    assert clash.status_code == 400
    assert clash.json()["details"] == {"type": "NONUNIQUE", "errors": [{"name": "w-proj-1", "id": p["id"]}]}
    clash = app.call("datasets.add", {"projectId": p["id"], "name": "ds0"})
    assert clash.status_code == 400 and clash.json()["details"]["errors"] == [{"name": "ds0", "id": ds["id"]}]

    bad = {
        "workspace": ({"name": "x1", "workspaceId": 2}, 404, "workspace"),
        "huge id": ({"name": "x2", "workspaceId": HUGE}, 400, "workspaceId"),
        "string id": ({"name": "x3", "workspaceId": "one"}, 400, "workspaceId"),
        "videos": ({"name": "x4", "workspaceId": 1, "type": "videos"}, 400, "images projects"),
        "slash": ({"name": "a/b", "workspaceId": 1}, 400, "project name"),
        "dots": ({"name": "..", "workspaceId": 1}, 400, "project name"),
        "number name": ({"name": 5, "workspaceId": 1}, 400, "project name"),
    }
    for why, (body, status, words) in bad.items():
        r = app.call("projects.add", body)
        assert r.status_code == status and words in r.json()["error"], (why, r.text)
    for body, words in (
        ({"projectId": p["id"], "name": "d", "parentId": ds["id"]}, "nested"),
        ({"projectId": HUGE, "name": "d"}, "projectId"),
        ({"projectId": p["id"], "name": "a\x00b"}, "NUL"),  # the body check's own answer
    ):
        r = app.call("datasets.add", body)
        assert r.status_code == 400 and words in r.text, r.text
    assert app.call("datasets.add", {"projectId": 999_999, "name": "d"}).status_code == 404
    assert [d["name"] for d in client.get_project(p["id"])["datasets"]] == ["ds0"]


def test_meta_update_checks_the_meta_and_refuses_one_that_stored_annotations_do_not_fit(app, client):
    p, ds = new_project(app, "w-meta", META)
    assert app.json("projects.meta.update", {"id": p["id"], "meta": META})["classes"] == META["classes"]
    bad = app.call("projects.meta.update", {"id": p["id"], "meta": {"classes": [{"title": "x", "shape": "blob"}]}})
    assert bad.status_code == 400 and "shape 'blob'" in bad.json()["error"]
    assert app.call("projects.meta.update", {"id": HUGE, "meta": META}).status_code == 400
    assert app.call("projects.meta.update", {"id": p["id"], "meta": [1]}).status_code == 400

    (img,) = add_images(app, ds["id"], {"a.png": png(8, 8)})
    app.json(
        "annotations.bulk.add",
        {"datasetId": ds["id"], "annotations": [{"imageId": img["id"], "annotation": box_ann(8, 8)}]},
    )
    # Additive: a new class, a new oneof value.
    grown = json.loads(json.dumps(META))
    grown["classes"].append({"title": "line", "shape": "line", "color": "#0000FF"})
    grown["tags"][0]["values"].append("c")
    app.json("projects.meta.update", {"id": p["id"], "meta": grown})
    # A class in use removed, a class in use reshaped, a tag value in use dropped: refused, meta kept.
    for change in (
        lambda m: m["classes"].pop(0),
        lambda m: m["classes"][1].update(shape="polygon"),
        lambda m: m["tags"][0].update(values=["b", "c"]),
    ):
        m = json.loads(json.dumps(grown))
        change(m)
        r = app.call("projects.meta.update", {"id": p["id"], "meta": m})
        assert r.status_code == 400 and f"image {img['id']} ('a.png'" in r.json()["error"], r.text
    assert client.get_project(p["id"])["meta"] == grown
    # An unused class may go.
    m = json.loads(json.dumps(grown))
    m["classes"].pop()
    app.json("projects.meta.update", {"id": p["id"], "meta": m})
    assert client.get_project(p["id"])["meta"] == m


# --- image bytes and items ---


def test_upload_hash_check_and_bulk_add_by_hash(app, client):
    p, ds = new_project(app, "w-images")
    a, b = png(10, 6, 1), png(4, 3, 2)
    r = upload(app, [a, b])
    assert r.status_code == 200 and r.json() == [{"hash": sly_hash(a)}, {"hash": sly_hash(b)}]
    # A blob stored but never readable by this App (a user's upload) is answered as absent.
    hidden = png(5, 5, 3)
    client.upload_bytes(hidden)
    unknown = sly_hash(b"nothing")
    got = app.call("images.internal.hashes.list", json=[sly_hash(a), unknown, sly_hash(hidden), sly_hash(b)])
    assert got.status_code == 200 and got.json() == [sly_hash(a), sly_hash(b)]
    assert app.call("images.internal.hashes.list", json=["zz"]).status_code == 400
    assert app.call("images.internal.hashes.list", json={"hashes": []}).status_code == 400
    assert app.call("images.internal.hashes.list", json=[unknown] * 10_001).status_code == 400

    infos = app.json(
        "images.bulk.add",
        {
            "datasetId": ds["id"],
            "images": [
                {"title": "a.png", "hash": sly_hash(a)},
                {"title": "b.png", "hash": sly_hash(b), "meta": {"k": 1}},
            ],
        },
    )
    assert [(i["name"], i["width"], i["height"], i["hash"], i["datasetId"]) for i in infos] == [
        ("a.png", 10, 6, sly_hash(a), ds["id"]),
        ("b.png", 4, 3, sly_hash(b), ds["id"]),
    ]
    items = stored_items(client, p["id"])
    assert items["a.png"]["sha256"] == hashlib.sha256(a).hexdigest() and items["a.png"]["ann"] == empty_ann(6, 10)
    assert items["a.png"]["id"] == infos[0]["id"]
    assert client.get_project(p["id"])["datasets"][0]["items_count"] == 2

    # A name the dataset holds: Supervisely's NONUNIQUE, naming the image and its id; nothing stored.
    clash = app.call(
        "images.bulk.add",
        {
            "datasetId": ds["id"],
            "images": [{"title": "c.png", "hash": sly_hash(a)}, {"title": "b.png", "hash": sly_hash(a)}],
        },
    )
    assert clash.status_code == 400
    assert clash.json()["details"] == {"type": "NONUNIQUE", "errors": [{"name": "b.png", "id": infos[1]["id"]}]}
    bad = {
        "hidden hash": ([{"title": "h.png", "hash": sly_hash(hidden)}], "images[0] ('h.png')"),
        "hex of hidden": ([{"title": "h.png", "hash": hashlib.sha256(hidden).hexdigest()}], "images[0]"),
        "not a hash": ([{"title": "h.png", "hash": "abc"}], "images[0]"),
        "twice": ([{"title": "x.png", "hash": sly_hash(a)}, {"title": "x.png", "hash": sly_hash(a)}], "twice"),
        "both": ([{"title": "x.png", "hash": sly_hash(a), "imageId": infos[0]["id"]}], "exactly one"),
        "neither": ([{"title": "x.png"}], "exactly one"),
        "link": ([{"title": "x.png", "link": "http://example.com/x.png"}], "link"),
        "huge id": ([{"title": "x.png", "imageId": HUGE}], "imageId"),
        "missing id": ([{"title": "x.png", "imageId": 2_000_000_000}], "no image"),
        "bad title": ([{"title": "../x.png", "hash": sly_hash(a)}], "title"),
        "not an object": (["x.png"], "images[0]"),
        "too many": ([{"title": f"{i}.png", "hash": sly_hash(a)} for i in range(1001)], "at most 1000"),
    }
    for why, (images, words) in bad.items():
        r = app.call("images.bulk.add", {"datasetId": ds["id"], "images": images})
        assert r.status_code == 400 and words in r.json()["error"], (why, r.text)
    assert (
        app.call("images.bulk.add", {"datasetId": HUGE, "images": [{"title": "x", "hash": sly_hash(a)}]}).status_code
        == 400
    )
    assert (
        app.call("images.bulk.add", {"datasetId": 999_999, "images": [{"title": "x", "hash": sly_hash(a)}]}).status_code
        == 404
    )
    assert sorted(stored_items(client, p["id"])) == ["a.png", "b.png"]


def test_the_project_stats_see_the_annotations_an_app_writes(app, client, server):
    p, ds = new_project(app, "w-stats", META)
    (img,) = add_images(app, ds["id"], {"a.png": png(8, 8, 7)})

    def stats() -> dict:
        r = server.admin().get(f"{server.url}/api/v1/projects/{p['id']}/stats", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    assert stats()["objects"] == 0  # counted and kept for this version of the project
    app.json(
        "annotations.bulk.add",
        {"datasetId": ds["id"], "annotations": [{"imageId": img["id"], "annotation": box_ann(8, 8)}]},
    )
    after = stats()  # same item count, a new revision: counted afresh
    assert after["objects"] == 2 and after["labelled"] == 1 and after["classes"]["box"]["objects"] == 1


def test_copy_by_id_shares_the_blob_and_copies_annotations_only_when_asked(app, client):
    p, ds = new_project(app, "w-copy-src", META)
    (src,) = add_images(app, ds["id"], {"a.png": png(8, 8, 4)})
    app.json(
        "annotations.bulk.add",
        {"datasetId": ds["id"], "annotations": [{"imageId": src["id"], "annotation": box_ann(8, 8)}]},
    )
    q, qds = new_project(app, "w-copy-dst", META)
    (dst,) = app.json(
        "images.bulk.add", {"datasetId": qds["id"], "images": [{"title": "copy.png", "imageId": src["id"]}]}
    )
    assert dst["hash"] == src["hash"] and (dst["width"], dst["height"]) == (8, 8)
    copied = stored_items(client, q["id"])["copy.png"]
    assert copied["ann"] == empty_ann(8, 8) and copied["sha256"] == stored_items(client, p["id"])["a.png"]["sha256"]
    app.json("annotations.bulk.copy", {"srcImageIds": [src["id"]], "destImageIds": [dst["id"]]})
    assert stored_items(client, q["id"])["copy.png"]["ann"] == stored_items(client, p["id"])["a.png"]["ann"]
    # Into a project whose meta lacks the classes: refused, naming the destination image.
    r_, rds = new_project(app, "w-copy-bare")
    (bare,) = app.json(
        "images.bulk.add", {"datasetId": rds["id"], "images": [{"title": "c.png", "imageId": src["id"]}]}
    )
    r = app.call("annotations.bulk.copy", {"srcImageIds": [src["id"]], "destImageIds": [bare["id"]]})
    assert r.status_code == 400 and f"image {bare['id']}" in r.json()["error"]
    r = app.call("annotations.bulk.copy", {"srcImageIds": [src["id"]], "destImageIds": [bare["id"], src["id"]]})
    assert r.status_code == 400 and "same length" in r.json()["error"]


def test_multipart_upload_refuses_what_is_not_one_and_keeps_complete_parts(app):
    a, big = png(3, 3, 9), os.urandom(3 * 1024 * 1024 + 17)  # one part spills to a file
    r = upload(app, [a, big])
    assert r.status_code == 200 and r.json() == [{"hash": sly_hash(a)}, {"hash": sly_hash(big)}]
    assert app.call("images.internal.hashes.list", json=[sly_hash(big)]).json() == [sly_hash(big)]

    body, headers = multipart([png(2, 2, 10), png(2, 2, 11)])
    cut = app.call("images.bulk.upload", data=body[:-40], headers=headers)
    assert cut.status_code == 400 and "part 1" in cut.json()["error"]
    # The first part came whole: it is stored and counts as the App's upload.
    assert app.call("images.internal.hashes.list", json=[sly_hash(png(2, 2, 10))]).json() == [sly_hash(png(2, 2, 10))]
    assert app.call("images.internal.hashes.list", json=[sly_hash(png(2, 2, 11))]).json() == []

    assert app.call("images.bulk.upload", {"images": []}).status_code == 400  # JSON, not multipart
    no_boundary = app.call("images.bulk.upload", data=body, headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]
    wrong = app.call("images.bulk.upload", data=b"garbage" + body, headers=headers)
    assert wrong.status_code == 400 and "boundary" in wrong.json()["error"]
    many, headers = multipart([b"x"] * 1001)
    r = app.call("images.bulk.upload", data=many, headers=headers)
    assert r.status_code == 400 and "1000 parts" in r.json()["error"]
    bomb = b"--b0undary\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\nx\r\n--b0undary--\r\n"
    r = app.call("images.bulk.upload", data=bomb, headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert r.status_code == 400 and "headers are longer" in r.json()["error"]


def test_multipart_reader_finds_delimiters_across_chunk_edges():
    """server/files/multipart.py, which images.bulk.upload and the team files share."""
    parts = [b"", b"\r\n--b0und", os.urandom(5000), b"--b0undary"]
    body, _ = multipart(parts)

    async def read(data: bytes, step: int):
        async def chunks():
            for i in range(0, len(data), step):
                yield data[i : i + step]

        out = []
        async for part in MultipartReader(chunks(), b"b0undary"):
            assert part.content_type == "image/*"
            out.append(b"".join([c async for c in part.chunks()]))
        return out

    def run(coro):
        # In a thread of its own: a browser test earlier on this worker may leave a loop running here.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    for step in (1, 3, 7, 64, len(body)):
        assert run(read(body, step)) == parts
    with pytest.raises(APIError, match="ends"):
        run(read(body[:-30], 5))


def test_annotations_are_checked_whole_and_stored_in_pixel_coordinates(app, client):
    p, ds = new_project(app, "w-anns", META)
    one, two = add_images(app, ds["id"], {"one.png": png(8, 8, 20), "two.png": png(9, 7, 21)})
    app.json(
        "annotations.bulk.add",
        {"datasetId": ds["id"], "annotations": [{"imageId": one["id"], "annotation": box_ann(8, 8)}]},
    )
    stored = stored_items(client, p["id"])["one.png"]["ann"]
    # The SDK's subpixel form back in the format's pixels: the rectangle's far corner one less, the point floored.
    assert stored["objects"][0]["points"]["exterior"] == [[1, 2], [3, 5]]
    assert stored["objects"][1]["points"]["exterior"] == [[3, 2]]

    bad_class = box_ann(7, 9)
    bad_class["objects"][0]["classTitle"] = "cat"
    bad = {
        "class": (bad_class, f"image {two['id']} ('two.png')"),
        "size": (box_ann(8, 8), "size is 8x8, the image's is 9x7"),
        "tag value": (box_ann(7, 9, tag="z"), "cannot have the value 'z'"),
        "no objects": ({"size": {"height": 7, "width": 9}, "tags": []}, "objects"),
    }
    before = stored_items(client, p["id"])
    for why, (ann, words) in bad.items():
        # The first annotation is good: it is not stored either.
        anns = [{"imageId": one["id"], "annotation": box_ann(8, 8, tag="b")}, {"imageId": two["id"], "annotation": ann}]
        r = app.call("annotations.bulk.add", {"datasetId": ds["id"], "annotations": anns})
        assert r.status_code == 400 and words in r.json()["error"], (why, r.text)
    assert stored_items(client, p["id"]) == before

    q, qds = new_project(app, "w-anns-other", META)
    for body, status, words in (
        (
            {"datasetId": qds["id"], "annotations": [{"imageId": one["id"], "annotation": box_ann(8, 8)}]},
            400,
            "not an image of dataset",
        ),
        ({"datasetId": ds["id"], "annotations": [{"imageId": HUGE, "annotation": box_ann(8, 8)}]}, 400, "imageId"),
        ({"datasetId": ds["id"], "annotations": [{"imageId": one["id"]}]}, 400, "annotations[0]"),
        (
            {"datasetId": ds["id"], "annotations": [{"imageId": one["id"], "annotation": box_ann(8, 8)}] * 2},
            400,
            "twice",
        ),
        ({"datasetId": ds["id"], "annotations": []}, 400, "non-empty"),
        ({"datasetId": ds["id"], "annotations": [{"imageId": 1, "annotation": {}}] * 1001}, 400, "at most 1000"),
        ({"datasetId": 999_999, "annotations": [{"imageId": one["id"], "annotation": box_ann(8, 8)}]}, 404, "dataset"),
    ):
        r = app.call("annotations.bulk.add", body)
        assert r.status_code == status and words in r.json()["error"], r.text


def test_an_ended_tasks_token_writes_nothing(app, client):
    app.agent.state(app.task_id, "finished", exit_code=0)
    r = app.call("projects.add", {"name": "w-after-end", "workspaceId": 1})
    assert r.status_code == 401
    assert all(p["name"] != "w-after-end" for p in client.list_projects())


# --- the real SDK ---

SDK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import supervisely as sly

    sample, out = sys.argv[1], sys.argv[2]
    api = sly.Api.from_env()
    ws = int(os.environ["WORKSPACE_ID"])
    result = {}

    meta = sly.ProjectMeta.from_json(sly.json.load_json_file(os.path.join(sample, "meta.json")))
    project = api.project.create(ws, "sdk-write", change_name_if_conflict=True)
    again = api.project.create(ws, "sdk-write", change_name_if_conflict=True)
    result["names"] = [project.name, again.name]
    api.project.update_meta(project.id, meta)
    ds = api.dataset.create(project.id, "ds", change_name_if_conflict=True)
    img_dir = os.path.join(sample, "ds0", "img")
    names = sorted(os.listdir(img_dir))
    by_path = api.image.upload_paths(ds.id, names, [os.path.join(img_dir, n) for n in names])
    arr = np.zeros((5, 7, 3), dtype=np.uint8)
    arr[1:3, 2:5] = (200, 10, 30)
    by_np = api.image.upload_np(ds.id, "np.png", arr)
    by_hash = api.image.upload_hashes(ds.id, ["again.png"], [by_path[0].hash])
    by_id = api.image.upload_ids(ds.id, ["copy.png"], [by_path[1].id])
    renamed = api.image.upload_paths(ds.id, [names[0]], [os.path.join(img_dir, names[0])], conflict_resolution="rename")
    ann_dir = os.path.join(sample, "ds0", "ann")
    api.annotation.upload_paths([i.id for i in by_path], [os.path.join(ann_dir, n + ".json") for n in names])
    ann = sly.Annotation.load_json_file(os.path.join(ann_dir, names[1] + ".json"), meta)
    api.annotation.upload_anns([by_id[0].id], [ann])
    api.annotation.upload_jsons([by_hash[0].id], [sly.json.load_json_file(os.path.join(ann_dir, names[0] + ".json"))])
    result["np"] = [by_np.width, by_np.height]
    result["renamed"] = renamed[0].name
    result["project_id"] = project.id

    import time
    t = time.time()
    pid, pname = sly.upload_project(os.path.dirname(sample) + "/big", api, ws, "sdk-import", log_progress=False)
    result["upload_project_s"] = time.time() - t
    result["import"] = [pid, pname]
    with open(out, "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_the_real_sdk_creates_uploads_and_upload_projects(server, client, make_agent, tmp_path, sdk_site):
    site = str(sdk_site)
    sample = write_sample_project(str(tmp_path), "sample", {"ds0": 3})
    big = write_sample_project(str(tmp_path), "big", {"ds0": 30, "ds1": 20}, seed=1)
    app = start_app(server, client, make_agent)
    (tmp_path / "write.py").write_text(SDK_SCRIPT)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": site,
        "SERVER_ADDRESS": server.url,
        "API_TOKEN": app.token,
        "TASK_ID": str(app.task_id),
        "TEAM_ID": "1",
        "WORKSPACE_ID": "1",
        "LOG_LEVEL": "warning",
    }
    out = tmp_path / "result.json"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "write.py"), sample["path"], str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    print(
        f"SDK script {time.monotonic() - started:.1f} s; upload_project of 50 images {result['upload_project_s']:.2f} s"
    )
    first = result["names"][0]
    assert result["names"][1] != first and result["names"][1].startswith(first)
    assert result["np"] == [7, 5] and result["renamed"] != "ds0_000.png"

    def read_ann(root, ds, name):
        with open(os.path.join(root, ds, "ann", name + ".json")) as f:
            return json.load(f)

    def read_img(root, ds, name):
        with open(os.path.join(root, ds, "img", name), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    items = stored_items(client, result["project_id"])
    names = sorted(os.listdir(os.path.join(sample["path"], "ds0", "img")))
    for n in names:
        assert items[n]["ann"] == read_ann(sample["path"], "ds0", n), n
        assert items[n]["sha256"] == read_img(sample["path"], "ds0", n)
    assert items["copy.png"]["sha256"] == items[names[1]]["sha256"]
    # upload_anns re-encodes a bitmap from its mask (other bytes, the same pixels): compared without them.
    assert no_bitmap_data(items["copy.png"]["ann"]) == no_bitmap_data(read_ann(sample["path"], "ds0", names[1]))
    assert items["again.png"]["ann"] == read_ann(sample["path"], "ds0", names[0])
    assert items["np.png"]["ann"]["size"] == {"height": 5, "width": 7}
    stored = client.get_project(result["project_id"])
    assert stored["task_id"] == app.task_id and stored["meta"]["classes"] == sample_meta(sample)["classes"]

    pid, pname = result["import"]
    imported = client.get_project(pid)
    assert pname == "sdk-import" and imported["meta"]["classes"] == sample_meta(big)["classes"]
    assert {d["name"]: d["items_count"] for d in imported["datasets"]} == {"ds0": 30, "ds1": 20}
    got, cursor = {}, None
    while True:
        page, cursor = client.project_items_page(pid, cursor=cursor, limit=20)
        got.update({(it["dataset"], it["name"]): it for it in page})
        if cursor is None:
            break
    assert len(got) == 50
    for (ds, name), it in got.items():
        assert it["ann"] == read_ann(big["path"], ds, name), (ds, name)
        assert it["sha256"] == read_img(big["path"], ds, name)


def no_bitmap_data(ann: dict) -> dict:
    ann = json.loads(json.dumps(ann))
    for o in ann["objects"]:
        if "bitmap" in o:
            del o["bitmap"]["data"]
    return ann


def sample_meta(sample) -> dict:
    with open(os.path.join(sample["path"], "meta.json")) as f:
        return json.load(f)
