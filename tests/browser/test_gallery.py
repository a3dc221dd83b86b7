"""The project gallery (labels drawn over server-made thumbnails, the large view) and the model page."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from PIL import Image

from client import UserClient
from tests.browser.conftest import online_agent, shot
from tools.sample_project import write_sample_project

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect

BLOB_RE = re.compile(r"/api/v1/blobs/[0-9a-f]{64}$")
EXTRA_CLASSES = [
    {"title": "lane", "shape": "line", "color": "#FDD835", "geometry_config": {}, "hotkey": "", "description": ""},
    {"title": "keypoint", "shape": "point", "color": "#F4511E", "geometry_config": {}, "hotkey": "", "description": ""},
    {"title": "field", "shape": "polygon", "color": "#8E24AA", "geometry_config": {}, "hotkey": "", "description": ""},
]


def _extra(i: int, w: int, h: int) -> list[dict]:
    """i extra labels of the shapes the sample lacks: a line, a point, a polygon with a hole."""
    base = {"description": "", "tags": [], "nnCreated": False, "nnUpdated": False}
    shapes = [
        {
            "classTitle": "lane",
            "geometryType": "line",
            "shape": "line",
            "points": {"exterior": [[2, h - 3], [w // 2, h // 2], [w - 3, h - 8]], "interior": []},
        },
        {
            "classTitle": "keypoint",
            "geometryType": "point",
            "shape": "point",
            "points": {"exterior": [[w // 3, h // 3]], "interior": []},
        },
        {
            "classTitle": "field",
            "geometryType": "polygon",
            "shape": "polygon",
            "points": {
                "exterior": [[w // 2, 4], [w - 4, 4], [w - 4, h // 2], [w // 2, h // 2]],
                "interior": [[[w * 5 // 8, 10], [w * 7 // 8, 10], [w * 7 // 8, h // 3], [w * 5 // 8, h // 3]]],
            },
        },
    ]
    return [dict(base, **shapes[k % 3]) for k in range(i)]


@pytest.fixture(scope="module")
def annotated(server, tmp_path_factory):
    """A Supervisely project folder (tools/sample_project.py, edited so that label counts differ from
    image to image: 0 to 6 labels of six shapes) uploaded by the client; and one large image."""
    root = tmp_path_factory.mktemp("gallery")
    summary = write_sample_project(str(root), "streets", {"train": 5, "val": 2}, size=(160, 120), seed=7)
    path = summary["path"]
    meta_path = os.path.join(path, "meta.json")
    meta = json.load(open(meta_path))
    meta["classes"] += EXTRA_CLASSES
    json.dump(meta, open(meta_path, "w"))
    anns = {}
    for n, key in enumerate(sorted(summary["items"])):
        ds, item = key.split("/")
        ann_path = os.path.join(path, ds, "ann", item + ".json")
        ann = json.load(open(ann_path))
        if n == 0:
            ann["objects"] = []  # an image without labels
        ann["objects"] += _extra(n, 160, 120)
        json.dump(ann, open(ann_path, "w"))
        anns[key] = ann
    # a large photo-like image (noise does not compress): the thumbnail must be a small fraction of it
    big = Image.frombytes("RGB", (1600, 1200), os.urandom(1600 * 1200 * 3))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    os.makedirs(os.path.join(path, "val", "img"), exist_ok=True)
    with open(os.path.join(path, "val", "img", "large.png"), "wb") as f:
        f.write(buf.getvalue())
    client = UserClient(server.url, server.admin_token)
    project = client.upload_project_dir(path, name="streets")
    anns["val/large.png"] = {"size": {"height": 1200, "width": 1600}, "objects": [], "tags": []}
    return {"project": project, "anns": anns, "meta": meta, "big_size": len(buf.getvalue())}


def _card_counts(page) -> dict[str, dict]:
    """Per card: the label count it states, the shapes drawn, and bitmaps with their decoded image."""
    return page.eval_on_selector_all(
        "#gallery li.tile",
        """(cards) => Object.fromEntries(cards.map(c => [
        c.dataset.dataset + '/' + c.dataset.item,
        {labels: Number(c.dataset.labels), drawn: c.querySelectorAll('svg.ann .lbl').length,
         shapes: [...c.querySelectorAll('svg.ann .lbl')].map(g => g.dataset.shape).sort(),
         bitmaps: c.querySelectorAll("svg.ann image[href^='data:image/png']").length,
         count: c.querySelector('.count').textContent}]))""",
    )


def _wait_drawn(page, n: int) -> None:
    expect(page.locator("#gallery li.tile")).to_have_count(n)
    expect(page.locator("#gallery li.tile:not([data-ready])")).to_have_count(0)  # every bitmap decoded


def test_gallery_draws_every_label_over_small_thumbnails(console, server, annotated):
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    blob_gets: list[str] = []
    page.on("request", lambda r: blob_gets.append(r.url) if BLOB_RE.search(r.url.split("?")[0]) else None)
    pid = annotated["project"]["id"]
    page.goto(f"{server.url}/projects")
    page.get_by_role("link", name="streets").first.click()
    page.wait_for_url(f"**/projects/{pid}")
    anns = annotated["anns"]
    _wait_drawn(page, len(anns))

    cards = _card_counts(page)
    assert set(cards) == set(anns)
    for key, ann in anns.items():
        shapes = sorted(o["geometryType"] for o in ann["objects"])
        assert cards[key]["labels"] == len(ann["objects"]) == cards[key]["drawn"], key
        assert cards[key]["shapes"] == shapes and cards[key]["count"] == str(len(shapes)), key
        assert cards[key]["bitmaps"] == shapes.count("bitmap"), key
    assert {s for c in cards.values() for s in c["shapes"]} == {"rectangle", "polygon", "bitmap", "line", "point"}

    # a rectangle sits where its annotation says (the overlay's units are the image's pixels)
    key = next(k for k, a in anns.items() if any(o["geometryType"] == "rectangle" for o in a["objects"]))
    (x0, y0), (x1, y1) = next(o for o in anns[key]["objects"] if o["geometryType"] == "rectangle")["points"]["exterior"]
    ds, item = key.split("/")
    rect = page.locator(f"#gallery li.tile[data-item='{item}'][data-dataset='{ds}'] svg.ann rect:not(.case)")
    assert [float(rect.get_attribute(a)) for a in ("x", "y", "width", "height")] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    assert page.locator(f"#gallery li.tile[data-item='{item}'] svg.ann").get_attribute("viewBox") == "0 0 160 120"

    # classes with their object counts across the project, and tags
    want = {}
    for ann in anns.values():
        for o in ann["objects"]:
            want[o["classTitle"]] = want.get(o["classTitle"], 0) + 1
    for title, n in want.items():
        expect(page.locator(f"#p-classes tr[data-class='{title}'] td.objects")).to_have_text(str(n))
    expect(page.locator("#p-tags tr[data-tag='weather']")).to_contain_text("sunny")

    # thumbnails only: the grid never asked for a whole blob, and the large image's thumbnail is small
    assert blob_gets == []
    large = page.locator("#gallery li.tile[data-item='large.png'] img")
    expect(large).to_have_js_property("complete", True)
    assert large.evaluate("i => Math.max(i.naturalWidth, i.naturalHeight)") == 256
    thumb = page.request.get(server.url + large.get_attribute("src"))
    assert thumb.ok and thumb.headers["content-type"] == "image/jpeg"
    assert len(thumb.body()) * 50 < annotated["big_size"]
    shot(page, "project-1440")

    # the dataset filter
    page.get_by_label("Dataset").select_option("val")
    _wait_drawn(page, 3)
    assert "dataset=val" in page.url
    page.set_viewport_size({"width": 900, "height": 900})
    page.get_by_label("Dataset").select_option("")
    _wait_drawn(page, len(anns))
    shot(page, "project-900")
    assert blob_gets == []


def test_large_view_lists_labels_and_tags(console, server, annotated):
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    pid = annotated["project"]["id"]
    page.goto(f"{server.url}/projects/{pid}?dataset=train")
    _wait_drawn(page, 5)
    key = "train/train_004.png"
    ann = annotated["anns"][key]
    page.locator("#gallery li.tile[data-item='train_004.png'] button.open").click()
    dlg = page.locator("#viewer")
    expect(dlg).to_be_visible()
    expect(page.locator("#v-title")).to_have_text("train_004.png")
    labels = page.locator("#v-labels li")
    expect(labels).to_have_count(len(ann["objects"]))
    for i, o in enumerate(ann["objects"]):
        li = labels.nth(i)
        expect(li.locator(".lname")).to_have_text(o["classTitle"])
        expect(li).to_contain_text(o["geometryType"])
        for t in o["tags"]:
            expect(li).to_contain_text(t["name"] if t.get("value") is None else f"{t['name']}: {t['value']}")
    for t in ann["tags"]:
        expect(page.locator("#v-tags")).to_contain_text(f"{t['name']}: {t['value']}")
    img = page.locator("#v-stage img")
    assert re.search(r"/thumb\?size=1024$", img.get_attribute("src"))
    expect(page.locator("#v-stage svg.ann .lbl")).to_have_count(len(ann["objects"]))
    labels.nth(0).hover()
    expect(page.locator("#v-stage svg.ann .lbl.hl")).to_have_count(1)
    page.wait_for_function("() => document.querySelector('#v-stage svg.ann').dataset.ready === '1'")
    page.locator("#v-info").hover()
    expect(page.locator("#v-stage svg.ann .lbl.hl")).to_have_count(0)
    shot(page, "project-viewer-1440")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#v-title")).to_have_text("train_003.png")
    page.keyboard.press("Escape")
    expect(dlg).to_be_hidden()


def _mask_data(w: int, h: int) -> str:
    """A bitmap's data as the SDK writes it: base64(zlib(PNG)); a 1-bit mask with a frame of ones."""
    import base64
    import zlib

    im = Image.new("1", (w, h), 0)
    im.paste(1, (0, 0, w, 4))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(zlib.compress(buf.getvalue())).decode()


def test_large_masks_are_drawn_at_tile_scale(console, server):
    client = UserClient(server.url, server.admin_token)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(buf, format="PNG")
    ref = {"sha256": client.upload_bytes(buf.getvalue()), "size": len(buf.getvalue())}
    meta = {"classes": [{"title": "mask", "shape": "bitmap", "color": "#FF00FF"}], "tags": []}

    def item(name: str, w: int, h: int) -> dict:
        obj = {
            "classTitle": "mask",
            "geometryType": "bitmap",
            "tags": [],
            "bitmap": {"data": _mask_data(w, h), "origin": [0, 0]},
        }
        return dict(ref, name=name, ann={"size": {"height": h, "width": w}, "tags": [], "objects": [obj]})

    # The server takes a mask as large as its image; a task's image may claim 13000 x 13000.
    p = client.create_project(
        "masks",
        [
            {
                "name": "m",
                "items": [item("big.png", 4000, 3000), item("huge.png", 13000, 13000), item("small.png", 40, 30)],
            }
        ],
        meta=meta,
    )
    page = console
    page.goto(f"{server.url}/projects/{p['id']}")
    _wait_drawn(page, 3)

    def label(name: str):
        return page.locator(f"#gallery li.tile[data-item='{name}'] svg.ann .lbl")

    # decoded and tinted at most 1024 pixels a side, drawn over the image's full extent
    assert label("big.png").get_attribute("data-px") == str(1024 * 768)
    im = label("big.png").locator("image")
    assert (im.get_attribute("width"), im.get_attribute("height")) == ("4000", "3000")
    assert im.evaluate(
        "i => new Promise(ok => { const x = new Image(); x.onload = () => ok([x.width, x.height]); "
        "x.src = i.getAttribute('href'); })"
    ) == [1024, 768]
    assert label("small.png").get_attribute("data-px") == str(40 * 30)
    # 169 Mpx: not decoded at all, its outline stands for it
    assert label("huge.png").get_attribute("data-px") == "0"
    expect(label("huge.png")).to_have_class(re.compile("too-large"))
    assert label("huge.png").locator("rect").get_attribute("width") == "13000"


def test_predicted_project_is_browsable_from_its_task(console, server, annotated):
    created, agent = online_agent(server, "predictor", ["inference"])
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks",
            json={
                "agent_id": created["id"],
                "type": "inference",
                "image": "sly-test/busybox:latest",
                "project_id": annotated["project"]["id"],
            },
            timeout=10,
        )
        .json()
    )
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    source = server.admin().get(f"{server.url}/api/v1/projects/{annotated['project']['id']}", timeout=10).json()
    first = source["datasets"][0]["name"]  # datasets: [{name, items_count}]; the items are paged
    items = (
        server.admin()
        .get(
            f"{server.url}/api/v1/projects/{annotated['project']['id']}/items",
            params={"dataset": first, "limit": 4},
            timeout=10,
        )
        .json()["items"]
    )
    meta = {
        "classes": [{"title": "car", "shape": "rectangle", "color": "#00B8D4"}],
        "tags": [{"name": "confidence", "value_type": "any_number", "color": "#00897B"}],
    }
    predicted = []
    for n, it in enumerate(items):
        objs = [
            {
                "classTitle": "car",
                "geometryType": "rectangle",
                "tags": [{"name": "confidence", "value": 0.9 - k / 10}],
                "points": {"exterior": [[5 + 20 * k, 5], [20 + 20 * k, 30]], "interior": []},
            }
            for k in range(n + 1)
        ]
        predicted.append(
            dict(
                name=it["name"],
                sha256=it["sha256"],
                size=it["size"],
                ann={"size": {"height": 120, "width": 160}, "tags": [], "objects": objs},
            )
        )
    r = agent.post(
        f"/agent/v1/tasks/{task['id']}/results",
        {
            "kind": "project",
            "name": "streets predicted",
            "meta": meta,
            "datasets": [{"name": "predictions", "items": predicted}],
        },
    )
    pid = r.json()["id"]
    agent.state(task["id"], "finished", exit_code=0)

    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    page.locator("#t-project").click()
    page.wait_for_url(f"**/projects/{pid}")
    expect(page.locator("#p-origin")).to_contain_text("predictions")
    expect(page.locator("#p-task")).to_have_attribute("href", f"/tasks/{task['id']}")
    _wait_drawn(page, 4)
    cards = _card_counts(page)
    assert {k: c["drawn"] for k, c in cards.items()} == {
        f"predictions/{it['name']}": n + 1 for n, it in enumerate(items)
    }
    expect(page.locator("#p-classes tr[data-class='car'] td.objects")).to_have_text("10")
    colors = page.eval_on_selector_all(
        "#gallery svg.ann .lbl", "gs => [...new Set(gs.map(g => g.getAttribute('stroke')))]"
    )
    assert colors == ["#00B8D4"]
    page.goto(f"{server.url}/projects")
    expect(page.locator("#items tr", has_text="streets predicted")).to_contain_text("predictions")


def test_model_page_shows_config_files_task_and_checkpoints(console, server):
    created, agent = online_agent(server, "ck-trainer", ["train"])
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks",
            json={"agent_id": created["id"], "type": "train", "image": "sly-test/busybox:latest"},
            timeout=10,
        )
        .json()
    )
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    config = {
        "model": {"arch": "yolov8s", "input_size": [640, 640], "classes": ["car", "person"]},
        "train": {"epochs": 3, "lr": 0.001, "augment": True, "resume": None},
    }
    ids = []
    for epoch in (1, 2, 3):
        cfg = json.dumps(dict(config, epoch=epoch), indent=2).encode()
        refs = [
            {"path": "config.json", "sha256": agent.upload(cfg), "size": len(cfg)},
            {"path": f"weights/epoch_{epoch}.pt", "sha256": agent.upload(b"W" * (1000 * epoch)), "size": 1000 * epoch},
        ]
        r = agent.post(
            f"/agent/v1/tasks/{task['id']}/results",
            {
                "kind": "model",
                "name": f"detector e{epoch}",
                "files": refs,
                "checkpoint": {
                    "epoch": epoch,
                    "metrics": {"loss": round(1 / epoch, 3), "mAP": 0.2 * epoch},
                    "final": epoch == 3,
                },
            },
        )
        ids.append(r.json()["id"])
    agent.state(task["id"], "finished", exit_code=0)

    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/tasks/{task['id']}")
    page.locator("#t-model").click()
    page.wait_for_url(f"**/models/{ids[2]}")
    expect(page.locator("#m-name")).to_have_text("detector e3")
    expect(page.locator("#m-kind")).to_contain_text("final")
    expect(page.locator("#m-task-link")).to_have_attribute("href", f"/tasks/{task['id']}")
    expect(page.locator("#m-files tbody tr")).to_have_count(2)
    expect(page.locator("#m-files")).to_contain_text("weights/epoch_3.pt")
    expect(page.locator("#m-files")).to_contain_text("2.9 KiB")
    cfg = page.locator("#m-config")
    for text in ('"arch"', '"yolov8s"', '"lr"', "0.001", "null", "true"):
        expect(cfg).to_contain_text(text)
    rows = page.locator("#m-checkpoints tbody tr")
    expect(rows).to_have_count(3)
    assert rows.locator("td.epoch").all_text_contents() == ["1", "2", "3"]
    expect(rows.nth(2)).to_contain_text("final")
    expect(rows.nth(2)).to_have_class(re.compile("current"))
    expect(rows.nth(0)).to_contain_text("0.2")
    assert rows.nth(2).locator("td.best").all_text_contents() == ["0.333", "0.6"]  # lowest loss, highest mAP
    expect(page.locator("#m-checkpoints th")).to_have_text(["Model", "Epoch", "loss", "mAP", ""])
    shot(page, "model-1440")

    # a collapsed config hides its inner keys; expand all shows them again
    page.get_by_role("button", name="Collapse all").click()
    expect(cfg.get_by_text('"arch"')).to_be_hidden()
    page.get_by_role("button", name="Expand all").click()
    expect(cfg.get_by_text('"arch"')).to_be_visible()

    rows.nth(0).get_by_role("link").click()
    page.wait_for_url(f"**/models/{ids[0]}")
    expect(page.locator("#m-epoch")).to_have_text("1")
    expect(page.locator("#m-metrics")).to_contain_text("loss 1")
    page.set_viewport_size({"width": 900, "height": 900})
    shot(page, "model-900")
