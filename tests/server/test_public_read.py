"""The public API's read side (server/public/read.py, infos.py): the answers' shapes as SDK 6.74.51
reads them, paging, filters, bad input, image bytes; and the real SDK against the session server
(download_project, sync and async paths)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from server.http.strict import ID_MAX
from server.public import read as public_read
from tests.support.apps import start_app

META = {
    "classes": [
        {"title": "car", "shape": "rectangle", "color": "#FF0000", "geometry_config": {}},
        {"title": "road", "shape": "polygon", "color": "#00FF00", "geometry_config": {}},
    ],
    "tags": [{"name": "weather", "value_type": "oneof_string", "values": ["sunny", "rain"], "color": "#8A0F59"}],
    "projectType": "images",
}


def _image(w: int, h: int, fmt: str, noise: bool = False) -> bytes:
    im = Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)) if noise else Image.new("RGB", (w, h), (w % 256, 9, 99))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _ann(h: int, w: int, k: int) -> dict:
    return {
        "description": "",
        "size": {"height": h, "width": w},
        "tags": [{"name": "weather", "value": "sunny"}],
        "objects": [
            {
                "classTitle": "car",
                "geometryType": "rectangle",
                "description": "",
                "tags": [],
                "points": {"exterior": [[1 + k, 2], [10 + k, 12]], "interior": []},
            },
            {
                "classTitle": "road",
                "geometryType": "polygon",
                "description": "",
                "tags": [],
                "points": {"exterior": [[0, 0], [w - 1, 0], [w - 1, h - 1]], "interior": []},
            },
        ][: 1 + k % 2],
    }


# name -> (width, height, format, noise): one image over the multipart's 1 MiB piece
IMAGES = {
    "ds0": {"a.png": (60, 40, "PNG", False), "b.jpg": (32, 24, "JPEG", False), "c.png": (48, 30, "PNG", False)},
    "ds1": {"big.png": (700, 600, "PNG", True), "d.png": (20, 10, "PNG", False)},
}


@pytest.fixture
def proj(server, client, make_agent, request):
    """A two-dataset project uploaded through the user API and a live App: a namespace with
    app, pid, ds (name -> dataset id), data (name -> bytes), items (name -> posted item)."""
    data, items, datasets = {}, {}, []
    for ds, imgs in IMAGES.items():
        posted = []
        for k, (name, (w, h, fmt, noise)) in enumerate(imgs.items()):
            data[name] = _image(w, h, fmt, noise)
            items[name] = {"name": name, "sha256": client.upload_bytes(data[name]), "size": len(data[name])}
            posted.append(dict(items[name], ann=_ann(h, w, k)))
        datasets.append({"name": ds, "items": posted})
    p = client.create_project(f"read-{request.node.name[:40]}", datasets, META)
    app = start_app(server, client, make_agent, project_id=p["id"], name=f"read-{request.node.name[:30]}")
    listed = app.json("datasets.list", {"projectId": p["id"]})["entities"]

    class P:
        pass

    out = P()
    out.app, out.pid, out.data, out.items = app, p["id"], data, {n: dict(it, ann=None) for n, it in items.items()}
    out.anns = {it["name"]: it["ann"] for d in datasets for it in d["items"]}
    out.ds = {d["name"]: d["id"] for d in listed}
    return out


def _ids(proj, ds: str) -> dict[str, int]:
    return {e["name"]: e["id"] for e in proj.app.json("images.list", {"datasetId": proj.ds[ds]})["entities"]}


def _err(r, status: int, *words: str):
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    for w in words:
        assert w in body["error"], (w, body)
    return body


def test_team_workspace_project_and_meta_as_the_sdk_reads_them(proj):
    app = proj.app
    teams = app.json("teams.list", {"filter": []})
    assert teams["total"] == 1 and teams["pagesCount"] == 1
    [team] = teams["entities"]
    assert team["id"] == 1 and team["name"] == "default" and team["role"] == "admin"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", team["createdAt"])
    assert app.json("teams.list", {"filter": [{"field": "name", "operator": "=", "value": "other"}]})["total"] == 0
    [ws] = app.json("workspaces.list", {"teamId": 1})["entities"]
    assert ws == {**ws, "id": 1, "teamId": 1, "name": "default"}
    _err(app.call("workspaces.list", {"teamId": 2}), 404, "team")

    info = app.json("projects.info", {"id": proj.pid})
    total = sum(it["size"] for it in proj.items.values())
    assert info["id"] == proj.pid and info["type"] == "images"
    assert (info["imagesCount"], info["itemsCount"], info["datasetsCount"]) == (5, 5, 2)
    assert (info["workspaceId"], info["teamId"], info["size"]) == (1, 1, str(total))
    assert info["settings"] == {} and info["createdAt"].endswith("Z")

    meta = app.json("projects.meta", {"id": proj.pid})
    assert meta["classes"] == META["classes"] and meta["tags"] == META["tags"] and meta["projectType"] == "images"
    assert app.json("instance.version", {}) == {"version": public_read.INSTANCE_VERSION}
    listed = app.json(
        "projects.list", {"workspaceId": 1, "filter": [{"field": "id", "operator": "=", "value": proj.pid}]}
    )
    assert [p["id"] for p in listed["entities"]] == [proj.pid] and listed["total"] == 1


def test_datasets_have_ids_counts_sizes_and_no_parent(proj):
    app = proj.app
    listed = app.json("datasets.list", {"projectId": proj.pid, "filter": [], "recursive": True})
    assert [d["name"] for d in listed["entities"]] == ["ds0", "ds1"]
    for d in listed["entities"]:
        names = IMAGES[d["name"]]
        assert d["projectId"] == proj.pid and d["parentId"] is None and "customData" not in d
        assert d["itemsCount"] == d["imagesCount"] == len(names)
        assert d["size"] == str(sum(proj.items[n]["size"] for n in names))
        assert app.json("datasets.info", {"id": d["id"]}) == d
    one = app.json(
        "datasets.list", {"projectId": proj.pid, "filter": [{"field": "name", "operator": "=", "value": "ds1"}]}
    )
    assert [d["id"] for d in one["entities"]] == [proj.ds["ds1"]]
    # get_list(parent_id=X) filters on parentId: no dataset has a parent
    nested = {"field": "parentId", "operator": "=", "value": proj.ds["ds0"]}
    assert app.json("datasets.list", {"projectId": proj.pid, "filter": [nested]})["entities"] == []
    _err(app.call("datasets.info", {"id": ID_MAX}), 404, f"no dataset {ID_MAX}")
    _err(app.call("datasets.list", {"projectId": ID_MAX}), 404, "project")


def test_images_list_and_info_carry_the_sdk_hash_size_and_dataset(proj):
    app = proj.app
    page = app.json("images.list", {"datasetId": proj.ds["ds0"], "sort": "id", "sort_order": "asc"})
    assert (page["total"], page["perPage"], page["pagesCount"]) == (3, public_read.PER_PAGE_DEFAULT, 1)
    assert [e["name"] for e in page["entities"]] == ["a.png", "b.jpg", "c.png"]
    for e in page["entities"]:
        w, h, fmt, _ = IMAGES["ds0"][e["name"]]
        digest = hashlib.sha256(proj.data[e["name"]]).digest()
        assert e["hash"] == base64.b64encode(digest).decode()  # supervisely._utils.get_bytes_hash
        assert (e["width"], e["height"], e["size"]) == (w, h, len(proj.data[e["name"]]))
        assert e["mime"] == ("image/jpeg" if fmt == "JPEG" else "image/png") and e["ext"] == e["mime"][6:]
        assert e["datasetId"] == proj.ds["ds0"] and e["projectId"] == proj.pid
        assert e["labelsCount"] == len(proj.anns[e["name"]]["objects"])
        assert e["pathOriginal"] is None and e["fullStorageUrl"] is None and e["meta"] == {}
        assert app.json("images.info", {"id": e["id"], "forceMetadataForLinks": False}) == e
    whole = app.json("images.list", {"projectId": proj.pid})
    assert whole["total"] == 5 and {e["datasetId"] for e in whole["entities"]} == set(proj.ds.values())
    _err(app.call("images.list", {}), 400, "datasetId")
    _err(app.call("images.list", {"datasetId": proj.ds["ds0"], "projectId": ID_MAX}), 404, "dataset")


def test_pages_and_after_cursors_meet_at_the_edges(proj):
    app = proj.app
    ds = {"datasetId": proj.ds["ds0"]}
    p1 = app.json("images.list", {**ds, "per_page": 2, "page": 1})
    p2 = app.json("images.list", {**ds, "per_page": 2, "page": 2})
    p3 = app.json("images.list", {**ds, "per_page": 2, "page": 3})
    assert (p1["total"], p1["pagesCount"], p1["perPage"]) == (3, 2, 2)
    assert [len(p["entities"]) for p in (p1, p2, p3)] == [2, 1, 0]
    assert p1["after"] is None  # page mode gives no cursor
    names = [e["name"] for e in p1["entities"] + p2["entities"]]
    assert names == ["a.png", "b.jpg", "c.png"]
    # token mode: the cursor runs to null
    seen, body = [], {**ds, "per_page": 1, "pagination_mode": "token"}
    page = app.json("images.list", body)
    while True:
        seen += [e["name"] for e in page["entities"]]
        if page.get("after") is None:
            break
        page = app.json("images.list", {**body, "after": page["after"]})
    assert seen[:3] == names and len(seen) == 3
    desc = app.json("images.list", {**ds, "sort": "name", "sort_order": "desc"})
    assert [e["name"] for e in desc["entities"]] == ["c.png", "b.jpg", "a.png"]
    assert app.json("images.list", {**ds, "per_page": 10**6})["perPage"] == public_read.PER_PAGE_MAX
    empty = app.json(
        "datasets.list", {"projectId": proj.pid, "filter": [{"field": "id", "operator": "in", "value": []}]}
    )
    assert (empty["total"], empty["pagesCount"], empty["entities"]) == (0, 0, [])
    for bad, field in [({"per_page": 0}, "per_page"), ({"page": 0}, "page"), ({"page": "x"}, "page")]:
        _err(app.call("images.list", {**ds, **bad}), 400, field)
    _err(app.call("images.list", {**ds, "sort": "labelsCount"}), 400, "sort")
    _err(app.call("images.list", {**ds, "sort_order": "up"}), 400, "sort_order")


def test_filters_on_id_and_name_and_their_errors(proj):
    app = proj.app
    ids = _ids(proj, "ds0")
    ds = {"datasetId": proj.ds["ds0"]}

    def names(*filters):
        return sorted(e["name"] for e in app.json("images.list", {**ds, "filter": list(filters)})["entities"])

    assert names({"field": "id", "operator": "in", "value": [ids["a.png"], ids["c.png"], ID_MAX]}) == ["a.png", "c.png"]
    assert names({"field": "name", "operator": "=", "value": "b.jpg"}) == ["b.jpg"]
    assert names({"field": "id", "operator": "!=", "value": ids["a.png"]}) == ["b.jpg", "c.png"]
    assert names(
        {"field": "id", "operator": ">", "value": ids["a.png"]},
        {"field": "name", "operator": "!in", "value": ["c.png"]},
    ) == ["b.jpg"]
    # an id of another dataset does not leak into this one
    other = _ids(proj, "ds1")["d.png"]
    assert names({"field": "id", "operator": "=", "value": other}) == []
    r = app.json(
        "images.list", {**ds, "filter": [{"field": "id", "operator": "in", "value": list(ids.values())}], "per_page": 2}
    )
    assert (r["total"], r["pagesCount"]) == (3, 2)
    cases = [
        ({"field": "labelsCount", "operator": "=", "value": 1}, "filter[0].field"),
        ({"field": "id", "operator": "~", "value": 1}, "filter[0].operator"),
        ({"field": "name", "operator": "<", "value": "a"}, "filter[0].operator"),
        ({"field": "id", "operator": "=", "value": "1"}, "filter[0].value"),
        ({"field": "id", "operator": "=", "value": -1}, "filter[0].value"),
        ({"field": "id", "operator": "=", "value": ID_MAX + 1}, "filter[0].value"),
        ({"field": "id", "operator": "in", "value": [1, "x"]}, "filter[0].value[1]"),
        ({"field": "id", "operator": "in", "value": list(range(public_read.MAX_IDS + 1))}, "filter[0].value"),
        ({"field": "name", "operator": "=", "value": "n" * 2000}, "filter[0].value"),
        ("id=1", "filter[0]"),
    ]
    for f, field in cases:
        _err(app.call("images.list", {**ds, "filter": [f]}), 400, field)
    _err(app.call("images.list", {**ds, "filter": {"field": "id"}}), 400, "'filter'")
    _err(app.call("images.list", {**ds, "filter": [{"field": "id", "operator": "=", "value": 1}] * 21}), 400, "filter")
    _err(app.call("images.list", {**ds, "filters": [{"type": "objects_class", "data": {}}]}), 400, "filters")


@pytest.mark.parametrize(
    "method, field",
    [
        ("projects.info", "id"),
        ("projects.meta", "id"),
        ("datasets.info", "id"),
        ("images.info", "id"),
        ("images.download", "id"),
        ("annotations.info", "imageId"),
        ("datasets.list", "projectId"),
    ],
)
def test_bad_ids_are_400_naming_the_field_and_unknown_ones_404(proj, method, field):
    app = proj.app
    for bad in [ID_MAX + 1, 2**63 - 1, -1, "x", "-3", True, 1.5, None, [1]]:
        _err(app.call(method, {field: bad} if bad is not None else {}), 400, repr(field))
    r = app.call(method, {field: ID_MAX})
    assert r.status_code == 404, r.text
    assert str(ID_MAX) in r.json()["error"]


def test_id_lists_are_bounded_and_checked(proj):
    app = proj.app
    did = proj.ds["ds0"]
    over = list(range(1, public_read.MAX_IDS + 2))
    _err(app.call("images.bulk.download", {"datasetId": did, "imageIds": over}), 400, "imageIds", "10000")
    over_anns = list(range(1, public_read.MAX_ANN_IDS + 2))
    _err(app.call("annotations.bulk.info", {"datasetId": did, "imageIds": over_anns}), 400, "imageIds")
    _err(app.call("images.bulk.download", {"datasetId": did, "imageIds": [1, -5]}), 400, "imageIds[1]")
    _err(app.call("images.bulk.download", {"datasetId": did, "imageIds": "1,2"}), 400, "imageIds")
    _err(app.call("images.bulk.download", {"datasetId": did}), 400, "imageIds")
    # an image of another dataset, or none: 404 naming it, nothing streamed
    other = _ids(proj, "ds1")["d.png"]
    mine = _ids(proj, "ds0")["a.png"]
    body = _err(app.call("images.bulk.download", {"datasetId": did, "imageIds": [mine, other]}), 404, str(other))
    assert body["details"]["missing"] == [other]
    _err(app.call("annotations.bulk.info", {"datasetId": did, "imageIds": [ID_MAX]}), 404, str(ID_MAX))
    _err(app.call("images.bulk.download", {"datasetId": ID_MAX, "imageIds": [mine]}), 404, "dataset")


def _multipart(r) -> list[tuple[int, dict, bytes]]:
    """(name as int, headers, bytes) per part, parsed by hand from the raw answer."""
    boundary = re.search(r"boundary=(\S+)", r.headers["content-type"]).group(1).encode()
    body = r.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        assert data.endswith(b"\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        out.append((int(re.search(r'name="(\d+)"', headers["Content-Disposition"]).group(1)), headers, data[:-2]))
    return out


def test_bulk_download_streams_one_part_per_image_in_the_order_asked(proj):
    app = proj.app
    ids = _ids(proj, "ds1") | _ids(proj, "ds0")
    for ds, order in [("ds1", ["d.png", "big.png", "d.png"]), ("ds0", ["c.png", "a.png", "b.jpg"])]:
        r = app.call("images.bulk.download", {"datasetId": proj.ds[ds], "imageIds": [ids[n] for n in order]})
        assert r.status_code == 200, r.text[:300]
        assert r.headers["content-type"].startswith("multipart/form-data; boundary=")
        assert int(r.headers["content-length"]) == len(r.content)
        parts = _multipart(r)
        want = list(dict.fromkeys(order))  # each once
        assert [p[0] for p in parts] == [ids[n] for n in want]
        for (_, headers, data), name in zip(parts, want, strict=True):
            assert data == proj.data[name]
            assert headers["x-content-checksum-sha256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert len(proj.data["big.png"]) > (1 << 20)  # the path that streams a blob in pieces


def test_single_download_with_checksum_and_range(proj):
    app = proj.app
    iid = _ids(proj, "ds1")["big.png"]
    r = app.call("images.download", {"id": iid})
    assert r.status_code == 200 and r.content == proj.data["big.png"]
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-checksum-sha256"] == base64.b64encode(hashlib.sha256(r.content).digest()).decode()
    part = app.call("images.download", {"id": iid}, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == proj.data["big.png"][10:20]
    size = len(proj.data["big.png"])
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    tail = app.call("images.download", {"id": iid}, headers={"Range": f"bytes={size - 5}-"})
    assert tail.status_code == 206 and tail.content == proj.data["big.png"][-5:]
    last = app.call("images.download", {"id": iid}, headers={"Range": "bytes=-7"})
    assert last.status_code == 206 and last.content == proj.data["big.png"][-7:]
    for bad in [f"bytes={size}-", "bytes=5-2", "pages=1-2", "bytes=-"]:
        r = app.call("images.download", {"id": iid}, headers={"Range": bad})
        assert r.status_code == 416, (bad, r.status_code)


def test_annotations_are_answered_in_subpixel_coordinates(proj):
    app = proj.app
    ids = _ids(proj, "ds0")
    one = app.json("annotations.info", {"imageId": ids["b.jpg"], "withCustomData": False, "integerCoords": False})
    assert (one["imageId"], one["imageName"], one["datasetId"]) == (ids["b.jpg"], "b.jpg", proj.ds["ds0"])
    ann, stored = one["annotation"], proj.anns["b.jpg"]
    assert ann["size"] == stored["size"] and ann["tags"] == stored["tags"]
    rect, poly = ann["objects"]
    (left, top), (right, bottom) = stored["objects"][0]["points"]["exterior"]
    # a rectangle's right and bottom edges one further, a polygon's points at the pixels' centres
    assert rect["points"]["exterior"] == [[left, top], [right + 1, bottom + 1]]
    assert poly["points"]["exterior"] == [[x + 0.5, y + 0.5] for x, y in stored["objects"][1]["points"]["exterior"]]
    order = [ids["c.png"], ids["a.png"], ids["b.jpg"], ids["a.png"]]
    bulk = app.json("annotations.bulk.info", {"datasetId": proj.ds["ds0"], "imageIds": order, "withCustomData": False})
    assert [a["imageId"] for a in bulk] == order[:3]
    assert bulk[2] == one


def test_ended_tasks_and_node_tokens_read_nothing(proj, make_agent):
    app = proj.app
    node = make_agent("read-node")
    r = app.call("projects.info", {"id": proj.pid}, token=node.token)
    _err(r, 401, "API token")
    app.agent.state(app.task_id, "finished", exit_code=0)
    _err(app.call("projects.info", {"id": proj.pid}), 401, "API token")
    _err(app.call("images.bulk.download", {"datasetId": proj.ds["ds0"], "imageIds": [1]}), 401, "API token")


SDK_SCRIPT = r"""
import asyncio, hashlib, json, os, sys, time
import supervisely as sly

pid, dest = int(sys.argv[1]), sys.argv[2]
api = sly.Api.from_env()
out = {"teams": [t.id for t in api.team.get_list()], "workspaces": [w.id for w in api.workspace.get_list(1)]}
info = api.project.get_info_by_id(pid)
out["project"] = [info.id, info.items_count, info.datasets_count, info.type]
meta = sly.ProjectMeta.from_json(api.project.get_meta(pid))
out["classes"] = sorted(c.name for c in meta.obj_classes)
out["missing_project"] = api.project.get_info_by_id(2**31 - 1) is None
sha = lambda b: hashlib.sha256(b).hexdigest()
got = {}
for ds in api.dataset.get_list(pid):
    assert api.dataset.get_info_by_id(ds.id) == ds
    imgs = api.image.get_list(ds.id)
    ids = [i.id for i in imgs]
    assert api.image.get_info_by_id(ids[0]) == imgs[0]
    assert api.image.get_info_by_id_batch(ids[::-1]) == imgs[::-1]
    anns = api.annotation.download_batch(ds.id, ids)
    assert [a.image_id for a in anns] == ids
    assert api.annotation.download(ids[0]).annotation == anns[0].annotation
    blobs = api.image.download_bytes(ds.id, ids)
    paths = [os.path.join(dest, "paths", str(i)) for i in ids]
    os.makedirs(os.path.join(dest, "paths"), exist_ok=True)
    api.image.download_paths(ds.id, ids, paths)
    api.image.download(ids[0], os.path.join(dest, "single"))
    np0 = api.image.download_np(ids[0])
    for img, ann, b, p in zip(imgs, anns, blobs, paths):
        assert open(p, "rb").read() == b
        got[img.name] = {"sha": sha(b), "ann": ann.annotation, "dataset": ds.name, "hash": img.hash}
    assert open(os.path.join(dest, "single"), "rb").read() == blobs[0]
    assert list(np0.shape[:2]) == [imgs[0].height, imgs[0].width]
out["got"] = got

def read_project(d):
    project = sly.Project(d, sly.OpenMode.READ)
    res = {}
    for ds in project.datasets:
        for name in ds.get_items_names():
            res[name] = {"sha": sha(open(ds.get_img_path(name), "rb").read()),
                         "ann": json.load(open(ds.get_ann_path(name))), "dataset": ds.name}
    return res

t = time.monotonic()
sly.download_project(api, pid, os.path.join(dest, "sync"), log_progress=False)
out["sync_s"] = time.monotonic() - t
out["sync"] = read_project(os.path.join(dest, "sync"))
t = time.monotonic()
sly.download_async(api, pid, os.path.join(dest, "async"), log_progress=False)
out["async_s"] = time.monotonic() - t
out["async"] = read_project(os.path.join(dest, "async"))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_the_real_sdk_reads_and_downloads_the_project(proj, server, tmp_path, sdk_site):
    site = sdk_site
    script = tmp_path / "sdk_read.py"
    script.write_text(SDK_SCRIPT)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(site),
        "SERVER_ADDRESS": server.url,
        "API_TOKEN": proj.app.token,
        "TASK_ID": str(proj.app.task_id),
        "SUPERVISELY_SKIP_HTTPS_USER_HELPER_CHECK": "1",
        "LOG_LEVEL": "INFO",
    }
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    t = time.monotonic()
    p = subprocess.run(
        [python, str(script), str(proj.pid), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])
    # The async path catches a failed batch and falls back to single downloads, and a failed
    # README is only logged: the files alone would not show that a method failed.
    for sign in ("Batch download failed", "Task error", "error while creating README", "does not match"):
        assert sign not in p.stderr, (sign, p.stderr[-6000:])
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    took = time.monotonic() - t
    print(f"SDK script {took:.1f}s; download_project sync {out['sync_s']:.2f}s, async {out['async_s']:.2f}s")
    assert out["teams"] == [1] and out["workspaces"] == [1]
    assert out["project"] == [proj.pid, 5, 2, "images"] and out["classes"] == ["car", "road"]
    assert out["missing_project"] is True
    want = {
        name: {"sha": hashlib.sha256(data).hexdigest(), "ann": proj.anns[name], "dataset": ds}
        for ds, names in IMAGES.items()
        for name in names
        for data in [proj.data[name]]
    }
    got = out["got"]
    assert {n: {k: v for k, v in g.items() if k != "hash"} for n, g in got.items()} == want
    assert all(g["hash"] == base64.b64encode(bytes.fromhex(g["sha"])).decode() for g in got.values())
    # the annotations written by download_project are the uploaded ones, byte for byte in JSON
    assert out["sync"] == want
    assert out["async"] == want
