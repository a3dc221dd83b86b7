"""Supervisely projects on the server: meta + annotations stored and read back unchanged, bad ones
refused with a 400 naming the item, the plain form, project results, checkpoint models."""

from __future__ import annotations

import base64
import copy
import io
import json
import zlib

import pytest
from PIL import Image

from protocol import endpoints
from tests.support.server import dataset_counts

# A bitmap exactly as the SDK documents it (supervisely/geometry/bitmap_base.py: 3x3 ring mask).
SDK_BITMAP = (
    "eJzrDPBz5+WS4mJgYOD19HAJAtLMIMwIInOeqf8BUmwBPiGuQPr///9Lb86/C2QxlgT5BTM4PLuRBuTwebo4hlTMSa44sKHhISMDux"
    "pTYrr03F6gDIOnq5/LOqeEJgDM5ht6"
)


def _png(w: int, h: int, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _mask_b64(w: int, h: int) -> str:
    """A mask encoded the way sly.Bitmap.data_2_base64 does it: zlib(PNG with a 2-colour palette), base64."""
    im = Image.new("P", (w, h), 1)
    im.putpalette([0, 0, 0, 255, 255, 255])
    buf = io.BytesIO()
    im.save(buf, format="PNG", transparency=0)
    return base64.b64encode(zlib.compress(buf.getvalue())).decode()


META = {
    "classes": [
        {
            "title": "car",
            "shape": "rectangle",
            "color": "#FF0000",
            "geometry_config": {},
            "hotkey": "",
            "description": "",
        },
        {"title": "road", "shape": "polygon", "color": "#00FF00", "geometry_config": {}},
        {"title": "sky", "shape": "bitmap", "color": "#0000ff", "geometry_config": {}},
        {"title": "lane", "shape": "line", "color": "#123456"},
        {"title": "stuff", "shape": "any", "color": "#ABCDEF"},
    ],
    "tags": [
        {"name": "weather", "value_type": "oneof_string", "values": ["sunny", "rain"], "color": "#8A0F59"},
        {"name": "confidence", "value_type": "any_number", "color": "#0F8A25"},
        {"name": "verified", "value_type": "none", "color": "#112233"},
        {"name": "note", "value_type": "any_string", "color": "#445566"},
    ],
    "projectType": "images",
}


def _ann(h=40, w=60) -> dict:
    return {
        "description": "two cars — ünïcode",
        "size": {"height": h, "width": w},
        "tags": [{"name": "weather", "value": "sunny"}, {"name": "verified", "value": None}],
        "objects": [
            {
                "classTitle": "car",
                "geometryType": "rectangle",
                "description": "",
                "tags": [{"name": "confidence", "value": 0.875}],
                "points": {"exterior": [[1, 2], [30, 20]], "interior": []},
            },
            {
                "classTitle": "road",
                "geometryType": "polygon",
                "tags": [],
                "points": {
                    "exterior": [[0, 39], [59, 39], [30.5, 20.25]],
                    "interior": [[[20, 36], [40, 36], [30, 30]]],
                },
            },
            {
                "classTitle": "sky",
                "geometryType": "bitmap",
                "tags": [{"name": "note", "value": "top"}],
                "bitmap": {"data": _mask_b64(8, 5), "origin": [3, 4]},
            },
            {
                "classTitle": "sky",
                "geometryType": "bitmap",
                "tags": [],
                "bitmap": {"data": SDK_BITMAP, "origin": [0, 0]},
            },
            {
                "classTitle": "lane",
                "geometryType": "line",
                "tags": [],
                "points": {"exterior": [[1, 1], [9, 9]], "interior": []},
            },
            {
                "classTitle": "stuff",
                "geometryType": "point",
                "tags": [],
                "points": {"exterior": [[5, 5]], "interior": []},
            },
        ],
        "customBigData": {},
    }


@pytest.fixture
def images(client):
    """Two uploaded PNG images: name -> {name, sha256, size}."""
    out = {}
    for name, (w, h) in {"a.png": (60, 40), "b.png": (32, 24)}.items():
        data = _png(w, h)
        out[name] = {"name": name, "sha256": client.upload_bytes(data), "size": len(data)}
    return out


def _sly_body(images, ann_a=None, meta=META, name="sly") -> dict:
    return {
        "name": name,
        "meta": meta,
        "datasets": [
            {"name": "ds0", "items": [dict(images["a.png"], ann=ann_a if ann_a is not None else _ann())]},
            {"name": "ds1", "items": [dict(images["b.png"], ann=_ann(24, 32))]},
        ],
    }


class Admin:
    """Plain HTTP as the admin (the user client has no call for the new routes)."""

    def __init__(self, server):
        self.url, self.s = server.url, server.admin()

    def get(self, path, **kw):
        return self.s.get(self.url + path, timeout=30, **kw)

    def post(self, path, **kw):
        return self.s.post(self.url + path, timeout=30, **kw)


@pytest.fixture
def admin(server) -> Admin:
    return Admin(server)


def _post(admin, body):
    # json.dumps, unlike requests' json=, writes NaN: what a careless client could send
    return admin.post(endpoints.PROJECTS, data=json.dumps(body), headers={"content-type": "application/json"})


def _items(admin, pid, **params) -> list[dict]:
    out, cursor = [], None
    while True:
        r = admin.get(endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid), params=dict(params, cursor=cursor or ""))
        assert r.status_code == 200, r.text
        page = r.json()
        out += page["items"]
        cursor = page["next"]
        if cursor is None:
            return out


def _canon(v) -> str:
    return json.dumps(v, ensure_ascii=False)  # key order kept: equal text = the same JSON, byte for byte


def test_round_trip_keeps_meta_and_every_annotation_byte_identical(admin, client, images, make_agent):
    body = _sly_body(images)
    r = _post(admin, body)
    assert r.status_code == 200, r.text
    pid = r.json()["id"]

    p = client.get_project(pid)
    assert _canon(p["meta"]) == _canon(META)
    assert dataset_counts(p["datasets"]) == [
        {"name": "ds0", "items_count": 1},
        {"name": "ds1", "items_count": 1},
    ]  # no items inline
    assert r.json()["datasets"] == p["datasets"]

    items = _items(admin, pid, limit=1)  # one item a page: the cursor carries on
    assert [(i["dataset"], i["name"]) for i in items] == [("ds0", "a.png"), ("ds1", "b.png")]
    assert [{k: i[k] for k in ("name", "sha256", "size")} for i in items] == [images["a.png"], images["b.png"]]
    assert _canon(items[0]["ann"]) == _canon(body["datasets"][0]["items"][0]["ann"])
    assert _canon(items[1]["ann"]) == _canon(body["datasets"][1]["items"][0]["ann"])
    assert [i["name"] for i in _items(admin, pid, dataset="ds1")] == ["b.png"]

    listed = next(x for x in client.list_projects() if x["id"] == pid)
    assert dataset_counts(listed["datasets"]) == [{"name": "ds0", "items_count": 1}, {"name": "ds1", "items_count": 1}]
    assert "meta" not in listed

    agent = make_agent("sly-reader")  # the agent gets the meta in the poll answer and pages the items with anns
    tid = client.create_task(agent.id, "train", image="img:1", project_id=pid)["id"]
    [got] = agent.poll(free_slots=1)["tasks"]
    assert got["id"] == tid
    proj = got["project"]
    assert (proj["id"], proj["name"]) == (pid, "sly") and _canon(proj["meta"]) == _canon(META)
    assert proj["datasets"] == p["datasets"]
    paged = agent.project_items(tid, limit=1)
    assert _canon([{k: i[k] for k in ("name", "sha256", "size", "ann")} for i in paged]) == _canon(
        [it for d in body["datasets"] for it in d["items"]]
    )
    assert [i["dataset"] for i in paged] == ["ds0", "ds1"]


def test_items_page_of_a_missing_project_and_a_bad_cursor(admin, client):
    r = admin.get(endpoints.path(endpoints.PROJECT_ITEMS, project_id=999999))
    assert r.status_code == 404 and r.json()["error"] == "project_not_found"
    pid = client.create_project("empty", [])["id"]
    r = admin.get(endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid), params={"cursor": "x"})
    assert r.status_code == 400 and r.json()["error"] == "bad_cursor"
    assert _items(admin, pid) == []


def test_plain_form_gets_the_empty_meta_and_annotations_sized_from_the_image(admin, client, images):
    junk = client.upload_bytes(b"not an image")
    p = client.create_project(
        "plain", [{"name": "ds", "items": [images["a.png"], {"name": "x.bin", "sha256": junk, "size": 12}]}]
    )
    assert p["meta"] == {"classes": [], "tags": [], "projectType": "images"}
    assert dataset_counts(p["datasets"]) == [{"name": "ds", "items_count": 2}]
    items = _items(admin, p["id"])
    assert [{k: i[k] for k in ("name", "sha256", "size")} for i in items] == [
        images["a.png"],
        {"name": "x.bin", "sha256": junk, "size": 12},
    ]
    anns = [i["ann"] for i in items]
    empty = {"description": "", "tags": [], "objects": [], "customBigData": {}}
    assert anns == [dict(empty, size={"height": 40, "width": 60}), dict(empty, size={"height": None, "width": None})]


def _bad(mutate, images):
    ann = _ann()
    meta = copy.deepcopy(META)
    mutate(ann, meta)
    return _sly_body(images, ann_a=ann, meta=meta)


def _set(path, value):
    def mutate(ann, meta):
        *head, last = path
        target = {"ann": ann, "meta": meta}
        for k in head:
            target = target[k]
        target[last] = value

    return mutate


BAD = [
    # (mutation, error code, words the detail must hold)
    (
        _set(("ann", "objects", 1, "classTitle"), "dog"),
        "bad_annotation",
        "dataset ds0, item a.png, object 2: classTitle 'dog' is not a class of the meta",
    ),
    (
        _set(("ann", "objects", 0, "points", "exterior"), [[1, 2]]),
        "bad_annotation",
        "dataset ds0, item a.png, object 1: a rectangle needs exactly 2 exterior points",
    ),
    (
        _set(("ann", "objects", 1, "points", "exterior"), [[0, 0], [1, 1]]),
        "bad_annotation",
        "object 2: a polygon needs at least 3 exterior points",
    ),
    (
        _set(("ann", "objects", 1, "points", "interior"), [[[0, 0], [1, 1]]]),
        "bad_annotation",
        "object 2: polygon interior 1 has 2 points",
    ),
    (
        _set(("ann", "objects", 2, "bitmap", "data"), "%%%not base64"),
        "bad_annotation",
        "object 3: bitmap data is not valid base64",
    ),
    (
        _set(("ann", "objects", 2, "bitmap", "data"), base64.b64encode(b"plain bytes, no zlib").decode()),
        "bad_annotation",
        "object 3: bitmap data is neither zlib-compressed nor a PNG",
    ),
    (
        _set(("ann", "objects", 2, "bitmap", "data"), base64.b64encode(zlib.compress(b"GIF89a....")).decode()),
        "bad_annotation",
        "object 3: bitmap data does not hold a PNG",
    ),
    (
        _set(("ann", "objects", 2, "bitmap", "data"), base64.b64encode(zlib.compress(_png(4, 4))[:-6]).decode()),
        "bad_annotation",
        "object 3: bitmap data is truncated",
    ),
    (
        _set(("ann", "objects", 2, "bitmap", "origin"), [1.5, 2]),
        "bad_annotation",
        "bitmap origin must be [x, y] integers",
    ),
    (
        _set(("ann", "objects", 0, "points", "exterior"), [[1, "2"], [3, 4]]),
        "bad_annotation",
        "object 1: exterior has [1, '2'], which is not an [x, y] pair of numbers",
    ),
    (
        _set(("ann", "objects", 0, "points", "exterior"), [[1, float("nan")], [3, 4]]),
        "bad_annotation",
        "dataset ds0, item a.png: the number nan is not allowed",
    ),
    (
        _set(("ann", "objects", 0, "geometryType"), "polygon"),
        "bad_annotation",
        "object 1: geometryType 'polygon' does not match the shape 'rectangle' of its class 'car'",
    ),
    (_set(("ann", "objects", 5, "geometryType"), "nonsense"), "bad_annotation", "class 'stuff' has shape 'any'"),
    (
        _set(("ann", "tags", 0, "name"), "season"),
        "bad_annotation",
        "dataset ds0, item a.png: tag 1 'season' is not a tag",
    ),
    (
        _set(("ann", "tags", 0, "value"), "snow"),
        "bad_annotation",
        "tag 1 ('weather', oneof_string) cannot have the value 'snow'",
    ),
    (
        _set(("ann", "objects", 0, "tags", 0, "value"), "high"),
        "bad_annotation",
        "object 1: tag 1 ('confidence', any_number) cannot have the value 'high'",
    ),
    (_set(("ann", "objects", 0, "tags"), None), "bad_annotation", "object 1: tags must be a list"),
    (
        _set(("ann", "size"), {"height": 0, "width": 60}),
        "bad_annotation",
        "dataset ds0, item a.png: the annotation's size",
    ),
    (
        _set(
            ("ann", "objects"),
            [{"classTitle": "car", "tags": [], "points": {"exterior": [[0, 0], [1, 1]], "interior": []}}] * 10_001,
        ),
        "bad_annotation",
        "10001 objects are more than the limit of 10000",
    ),
    (_set(("meta", "classes", 0, "color"), "red"), "bad_meta", "meta: class 'car': color 'red' is not '#RRGGBB'"),
    (_set(("meta", "classes", 0, "shape"), "blob"), "bad_meta", "meta: class 'car': shape 'blob' is not one of"),
    (_set(("meta", "classes", 1, "title"), "car"), "bad_meta", "meta: class 'car': is defined twice"),
    (_set(("meta", "tags", 0, "values"), []), "bad_meta", "meta: tag 'weather': a oneof_string tag needs 'values'"),
    (_set(("meta", "tags", 1, "value_type"), "number"), "bad_meta", "meta: tag 'confidence': value_type 'number'"),
]


@pytest.mark.parametrize("mutate, code, words", BAD, ids=[b[2][:60] for b in BAD])
def test_bad_annotation_or_meta_is_refused_naming_the_item(admin, client, images, mutate, code, words):
    before = len(client.list_projects())
    r = _post(admin, _bad(mutate, images))
    assert r.status_code == 400, r.text
    err = r.json()
    if err["error"] in ("malformed_json", "non_finite_number"):
        assert "nan" in words  # NaN is refused already when the body is read (strict input); nothing is stored
    else:
        assert err["error"] == code, err
        assert words in err["detail"], err["detail"]
    assert len(client.list_projects()) == before  # nothing half-stored


def test_an_annotation_over_the_size_limit_is_refused(admin, client, images):
    ann = _ann()
    ann["description"] = "x" * (1024 * 1024)
    r = _post(admin, _sly_body(images, ann_a=ann))
    assert r.status_code == 400 and "dataset ds0, item a.png: the annotation is" in r.json()["detail"]


def _task_for_results(client, agent, ttype="inference"):
    tid = client.create_task(agent.id, ttype, image="img:1")["id"]
    agent.poll(free_slots=1)
    assert agent.state_raw(tid, "running").status_code == 200
    return tid


def _results(agent, tid, body):
    return agent.post_raw(endpoints.path(endpoints.TASK_RESULTS, task_id=tid), json=body)


def test_results_project_with_annotations_both_forms_and_idempotent(admin, client, images, make_agent):
    agent = make_agent("predictor")
    tid = _task_for_results(client, agent)
    agent.upload(_png(60, 40))  # a.png: a node's results name only blobs it may read
    preds = _ann()
    body = {
        "kind": "project",
        "name": "preds",
        "meta": META,
        "files": [
            dict(
                path="ds0/" + images["a.png"]["name"],
                sha256=images["a.png"]["sha256"],
                size=images["a.png"]["size"],
                ann=preds,
            )
        ],
    }
    r = _results(agent, tid, body)
    assert r.status_code == 200, r.text
    pid = r.json()["results"]["project_id"]
    assert r.json()["id"] == pid
    p = client.get_project(pid)
    assert p["task_id"] == tid and p["name"] == "preds" and _canon(p["meta"]) == _canon(META)
    [item] = _items(admin, pid)
    assert _canon(item["ann"]) == _canon(preds)

    again = _results(agent, tid, body)  # re-posted after an agent restart
    assert again.json()["results"]["project_id"] == pid
    as_datasets = {
        "kind": "project",
        "name": "preds",
        "meta": META,
        "datasets": [{"name": "ds0", "items": [dict(images["a.png"], ann=preds)]}],
    }
    assert _results(agent, tid, as_datasets).json()["results"]["project_id"] == pid  # the same project
    assert sum(1 for x in client.list_projects() if x["task_id"] == tid) == 1

    bad = copy.deepcopy(as_datasets)
    bad["datasets"][0]["items"][0]["ann"]["objects"][0]["classTitle"] = "dog"
    r = _results(agent, tid, bad)
    assert r.status_code == 400 and "dataset ds0, item a.png, object 1: classTitle 'dog'" in r.json()["detail"]
    r = _results(agent, tid, {"kind": "model", "files": [], "meta": META})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_checkpoints_are_models_of_the_task_and_reposts_make_no_duplicates(client, make_agent):
    agent = make_agent("trainer")
    tid = _task_for_results(client, agent, "train")

    def files(tag: str) -> list[dict]:
        cfg = json.dumps({"epochs": 3, "tag": tag}).encode()
        w = f"weights {tag}".encode()
        return [
            {"path": "config.json", "sha256": agent.upload(cfg), "size": len(cfg)},
            {"path": "model.pt", "sha256": agent.upload(w), "size": len(w)},
        ]

    ck = []
    for epoch in (1, 2, 3):
        body = {
            "kind": "model",
            "name": f"ck {epoch}",
            "files": files(f"e{epoch}"),
            "checkpoint": {"epoch": epoch, "metrics": {"loss": 1.0 / epoch}},
        }
        r = _results(agent, tid, body)
        assert r.status_code == 200, r.text
        ck.append((body, r.json()["id"]))
        assert r.json()["results"]["model_id"] == r.json()["id"]  # the latest checkpoint so far
    ids = [i for _b, i in ck]
    res = client.get_task(tid)["results"]
    assert res["checkpoints"] == ids and res["model_id"] == ids[2]

    again = _results(agent, tid, ck[0][0]).json()  # restart: checkpoint 1 posted again
    assert again["id"] == ids[0] and again["results"]["checkpoints"] == ids and again["results"]["model_id"] == ids[2]
    assert sum(1 for m in client.list_models() if m["task_id"] == tid) == 3

    final = _results(agent, tid, dict(ck[1][0], checkpoint={"epoch": 2, "final": True})).json()
    assert final["id"] == ids[1]  # same files: the same model, promoted to final
    assert final["results"]["model_id"] == ids[1]
    later = _results(agent, tid, {"kind": "model", "files": files("e4"), "checkpoint": {"epoch": 4}}).json()
    assert later["results"]["model_id"] == ids[1]  # a checkpoint marked final outranks a later one
    plain = _results(agent, tid, {"kind": "model", "name": "final-model", "files": files("final")}).json()
    assert plain["results"]["model_id"] == plain["id"]  # results/model written by the task wins
    assert plain["id"] not in plain["results"]["checkpoints"]

    m = client.get_model(ids[0])
    assert m["task"] == {"id": tid, "type": "train", "state": "running"}
    assert m["checkpoint"] == {"epoch": 1.0, "metrics": {"loss": 1.0}, "final": False}
    assert m["config"] == {"epochs": 3, "tag": "e1"}
    cfg = next(f for f in m["files"] if f["path"] == "config.json")
    assert json.loads(client.download_blob(cfg["sha256"])) == m["config"]  # readable through its file list
    assert client.get_model(plain["id"])["checkpoint"] is None

    r = _results(
        agent, tid, {"kind": "model", "files": files("x"), "checkpoint": {"epoch": 1, "metrics": {"loss": "nan"}}}
    )
    assert r.status_code == 400
    r = _results(agent, tid, {"kind": "artifacts", "files": [], "checkpoint": {"epoch": 1}})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def _stored(n_per_ds: dict[str, int], objects: int = 1) -> list[dict]:
    obj = {
        "classTitle": "road",
        "geometryType": "polygon",
        "tags": [],
        "points": {"exterior": [[0, 0], [5, 5], [9, 0]], "interior": []},
    }
    return [
        {
            "name": ds,
            "items": [
                {
                    "name": f"{i}.png",
                    "sha256": f"{i:064x}",
                    "size": i + 1,
                    "ann": {
                        "size": {"height": 9, "width": 9},
                        "tags": [],
                        "objects": [dict(obj, id=k) for k in range(objects)],
                    },
                }
                for i in range(n)
            ],
        }
        for ds, n in n_per_ds.items()
    ]


@pytest.mark.parametrize("page_items, page_objects", [(500, 20_000), (3, 20_000), (500, 5), (1, 1)])
def test_same_project_compares_a_page_at_a_time_and_tells_any_difference(engine, monkeypatch, page_items, page_objects):
    from server.projects import service

    monkeypatch.setattr(service, "SAME_PAGE_ITEMS", page_items)
    monkeypatch.setattr(service, "SAME_PAGE_OBJECTS", page_objects)
    meta = {"classes": [], "tags": []}
    shape = {"a": 4, "empty": 0, "b": 7}
    with engine.begin() as conn:
        pid = service.insert_project(conn, "p", meta, _stored(shape, objects=2), 1.0)
        empty = service.insert_project(conn, "e", meta, [], 1.0)
        assert service.same_project(conn, pid, meta, _stored(shape, objects=2))
        assert service.same_project(conn, empty, meta, [])
        assert not service.same_project(conn, empty, meta, _stored({"a": 1}))
        assert not service.same_project(conn, pid + 99, meta, _stored(shape, objects=2))
        assert not service.same_project(conn, pid, {"classes": [], "tags": [{"name": "t"}]}, _stored(shape, objects=2))
        assert not service.same_project(conn, pid, meta, _stored(shape, objects=1))  # every ann differs
        assert not service.same_project(conn, pid, meta, _stored({"a": 4, "b": 7}, objects=2))  # a dataset less
        assert not service.same_project(conn, pid, meta, _stored({"a": 4, "empty": 0, "b": 6}, objects=2))  # shorter
        assert not service.same_project(conn, pid, meta, _stored({"a": 4, "empty": 0, "b": 8}, objects=2))  # longer
        assert not service.same_project(conn, pid, meta, _stored({"a": 5, "empty": 0, "b": 6}, objects=2))  # moved
        for k in range(11):  # one field of one item differs, wherever it is
            for field, value in (("name", "x.png"), ("sha256", "f" * 64), ("size", 10**6), ("ann", {})):
                posted = _stored(shape, objects=2)
                items = [it for ds in posted for it in ds["items"]]
                items[k][field] = value
                assert not service.same_project(conn, pid, meta, posted), (k, field)


def test_a_project_of_more_items_than_an_insert_batch_is_stored_whole(engine, monkeypatch):
    from server.projects import service

    monkeypatch.setattr(service, "INSERT_BATCH", 3)
    meta = {"classes": [], "tags": []}
    shape = {"a": 5, "b": 3, "c": 1}
    with engine.begin() as conn:
        pid = service.insert_project(conn, "p", meta, _stored(shape), 1.0)
        rows = service.items_page(conn, pid, None, None, 100)
        stored = [
            {
                "name": ds,
                "items": [{k: r[k] for k in ("name", "sha256", "size", "ann")} for r in rows if r["dataset"] == ds],
            }
            for ds in shape
        ]
        assert stored == _stored(shape) and len(rows) == 9
        assert dataset_counts(service.get_project(conn, pid)["datasets"]) == [
            {"name": ds, "items_count": n} for ds, n in shape.items()
        ]
        assert service.same_project(conn, pid, meta, _stored(shape))
