"""Thumbnails of image blobs (made once, cached on disk, immutable ETag), project stats, models by task."""

from __future__ import annotations

import io
import json
import random

import requests
from PIL import Image

from protocol import endpoints


def _noise_png(w: int, h: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    im = Image.frombytes("RGB", (w, h), bytes(rng.getrandbits(8) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _thumb_url(server, sha: str, size=None) -> str:
    return server.url + endpoints.path(endpoints.USER_BLOB_THUMB, sha256=sha) + (f"?size={size}" if size else "")


def _thumb_files(server, sha: str) -> list:
    return sorted((server.data_dir / "thumbs" / sha[:2]).glob(f"{sha}-*.jpg"))


def test_thumbnail_is_small_cached_once_and_revalidates_with_its_etag(server, client):
    big = _noise_png(800, 600)
    sha = client.upload_bytes(big)
    s = server.admin()
    r = s.get(_thumb_url(server, sha), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert len(r.content) < len(big) / 10
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (256, 192)  # fits 256 x 256, aspect kept
    assert "immutable" in r.headers["cache-control"] and "private" in r.headers["cache-control"]
    etag = r.headers["etag"]

    (made,) = _thumb_files(server, sha)
    stamp = made.stat().st_mtime_ns
    again = s.get(_thumb_url(server, sha, 256), timeout=30)
    assert again.content == r.content and made.stat().st_mtime_ns == stamp  # served from disk, not remade
    assert s.get(_thumb_url(server, sha), headers={"if-none-match": etag}, timeout=30).status_code == 304

    preview = s.get(_thumb_url(server, sha, 1024), timeout=30)
    with Image.open(io.BytesIO(preview.content)) as im:
        assert im.size == (800, 600)  # never enlarged
    assert preview.headers["etag"] != etag and len(_thumb_files(server, sha)) == 2


def test_thumbnail_needs_a_sign_in_an_image_and_a_known_size(server, client):
    sha = client.upload_bytes(_noise_png(40, 30, seed=2))
    assert requests.get(_thumb_url(server, sha), timeout=10).status_code == 401
    s = server.admin()
    text = client.upload_bytes(b"not an image at all\n")
    r = s.get(_thumb_url(server, text), timeout=10)
    assert r.status_code == 415 and r.json()["error"] == "not_an_image"
    assert not _thumb_files(server, text)
    r = s.get(_thumb_url(server, sha, 300), timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "bad_size"
    assert s.get(_thumb_url(server, "0" * 64), timeout=10).status_code == 404
    assert s.get(_thumb_url(server, "xyz"), timeout=10).status_code == 400


def test_transparent_image_gets_a_white_background(server, client):
    im = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    r = server.admin().get(_thumb_url(server, client.upload_bytes(buf.getvalue()), 128), timeout=10)
    with Image.open(io.BytesIO(r.content)) as t:
        assert min(t.convert("RGB").getpixel((5, 5))) > 240


def test_project_stats_count_objects_per_class_and_images_per_tag(server, client):
    img = _noise_png(30, 20, seed=3)
    sha = client.upload_bytes(img)
    meta = {
        "classes": [
            {"title": "car", "shape": "rectangle", "color": "#FF0000"},
            {"title": "road", "shape": "polygon", "color": "#00FF00"},
        ],
        "tags": [
            {"name": "night", "value_type": "none", "color": "#111111"},
            {"name": "conf", "value_type": "any_number", "color": "#222222"},
        ],
    }

    def ann(cars: int, roads: int, night: bool) -> dict:
        rect = {
            "classTitle": "car",
            "geometryType": "rectangle",
            "tags": [{"name": "conf", "value": 0.5}],
            "points": {"exterior": [[1, 1], [5, 5]], "interior": []},
        }
        poly = {
            "classTitle": "road",
            "geometryType": "polygon",
            "tags": [],
            "points": {"exterior": [[0, 0], [10, 0], [5, 9]], "interior": []},
        }
        return {
            "size": {"height": 20, "width": 30},
            "tags": [{"name": "night"}] if night else [],
            "objects": [rect] * cars + [poly] * roads,
        }

    items = [
        {"name": f"{i}.png", "sha256": sha, "size": len(img), "ann": a}
        for i, a in enumerate([ann(2, 1, True), ann(1, 0, False), ann(0, 0, True)])
    ]
    p = client.create_project("stats", [{"name": "ds0", "items": items}], meta=meta)
    s = server.admin()
    r = s.get(server.url + endpoints.path(endpoints.PROJECT_STATS, project_id=p["id"]), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "items": 3,
        "labelled": 2,
        "objects": 4,
        "classes": {"car": {"objects": 3, "items": 2}, "road": {"objects": 1, "items": 1}},
        "tags": {"night": 2},
        "object_tags": {"conf": 3},
    }
    assert s.get(server.url + endpoints.path(endpoints.PROJECT_STATS, project_id=999999), timeout=10).status_code == 404


def test_models_listed_by_the_task_that_made_them(server, client, make_agent):
    agent = make_agent("thumb-trainer", ["train"])
    task = client.create_task(agent.id, "train", "img")
    agent.poll()
    agent.state_raw(task["id"], "running")
    ids = []
    for epoch in (1, 2):
        w = f"w{epoch}".encode()
        ref = {"path": "model.pt", "sha256": agent.upload(w), "size": len(w)}
        r = agent.post_raw(
            endpoints.path(endpoints.TASK_RESULTS, task_id=task["id"]),
            json={"kind": "model", "files": [ref], "checkpoint": {"epoch": epoch, "final": epoch == 2}},
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    other = client.create_model("unrelated", [])
    got = server.admin().get(server.url + endpoints.MODELS, params={"task_id": task["id"]}, timeout=10).json()
    assert [m["id"] for m in got["items"]] == ids[::-1] and other["id"] not in [m["id"] for m in got["items"]]
    assert got["items"][0]["checkpoint"] == {"epoch": 2.0, "metrics": None, "final": True}
    assert json.dumps(got).count('"files_count"') == 2
