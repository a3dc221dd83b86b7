"""Narrow windows (issue 25, item 10): no page overflows sideways at 600 and 390 px, and the sidebar
folds away behind a menu button below 700 px."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from client.api import UserClient
from tests.browser.conftest import online_agent, shot

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect

LONG_NAME = "gpu-box-17.training-cluster.eu-west.example.internal"
LONG_IMAGE = "registry.example.com/team/very-long-project-name/detector-train:2024.11-cuda12.4-cudnn9-runtime"
# What sticks out: the page's scroll width and every element whose right edge is past the window
# (a table inside a scrolling wrapper is allowed to be wider than its wrapper: it scrolls there).
OVERFLOW = """(width) => {
    const out = [];
    for (const e of document.querySelectorAll('main *')) {
        if (e.closest('.table-wrap, .scroll-x, .table-scroll, .log, pre, dialog, [hidden]')) continue;
        const r = e.getBoundingClientRect();
        if (r.width && r.right > width + 1) out.push(`${e.tagName}#${e.id}.${e.className} ${Math.round(r.right)}`);
    }
    return {page: document.documentElement.scrollWidth, sticking: out.slice(0, 8)};
}"""


def _fixtures(server) -> dict:
    gpus = [
        {"index": i, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 << 30, "memory_used": 30 << 30}
        for i in range(2)
    ]
    created, agent = online_agent(server, LONG_NAME, ["train", "custom"], gpus=gpus)
    agent.telemetry(cpu=47, mem=63, disk=71, gpus=[dict(g, utilization=40) for g in gpus])
    client = UserClient(server.url, server.admin_token)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 90, 40)).save(buf, format="PNG")
    item = {"name": "a-rather-long-image-file-name-000001.png", "sha256": client.upload_bytes(buf.getvalue())}
    item["size"] = len(buf.getvalue())
    project = client.create_project("narrow-project", [{"name": "train", "items": [item]}], meta={"classes": []})
    w = b"weights"
    model = client.create_model("narrow-model", [{"path": "w.bin", "sha256": client.upload_bytes(w), "size": len(w)}])
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks",
            json={"agent_id": created["id"], "type": "train", "image": LONG_IMAGE, "config": {"lr": 0.01}},
            timeout=10,
        )
        .json()
    )
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    agent.log(task["id"], "x" * 300, {"message": "m", "event_type": "metrics", "epoch": 1, "metrics": {"loss": 1.0}})
    return {"agent": created, "task": task, "project": project, "model": model}


@pytest.mark.slow
def test_pages_fit_600_and_390_px_and_the_sidebar_folds_behind_a_menu(console, server):
    f = _fixtures(server)
    pages = {
        "nodes": "/nodes",
        "node": f"/nodes/{f['agent']['id']}",
        "tasks": "/tasks",
        "task": f"/tasks/{f['task']['id']}",
        "projects": "/projects",
        "project": f"/projects/{f['project']['id']}",
        "models": "/models",
        "model": f"/models/{f['model']['id']}",
        "files": "/files",
    }
    page = console
    ready = {
        "nodes": "tr.node-row",
        "tasks": "tr.task-row",
        "task": "#log .line",
        "project": "#gallery li.tile",
        "projects": "#items tbody tr",
        "models": "#items tbody tr",
    }
    for width in (600, 390):
        page.set_viewport_size({"width": width, "height": 800})
        for name, path in pages.items():
            page.goto(server.url + path)
            if name in ready:
                expect(page.locator(ready[name]).first).to_be_visible()
            page.wait_for_timeout(150)  # a resize observer or a chart may still lay out
            got = page.evaluate(OVERFLOW, width)
            assert got["page"] <= width and not got["sticking"], (name, width, got)
    # The sidebar: gone at 390 px, a menu button shows it over the page, Esc and a link close it.
    page.goto(server.url + f"/tasks/{f['task']['id']}")
    side = page.locator(".sidebar")
    menu = page.get_by_role("button", name="Menu")
    expect(side).not_to_be_in_viewport()
    expect(menu).to_have_attribute("aria-expanded", "false")
    menu.click()
    expect(side).to_be_in_viewport()
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(side.get_by_role("link", name="Team files")).to_be_visible()
    page.keyboard.press("Escape")
    expect(side).not_to_be_in_viewport()
    shot(page, "task-390")
    page.goto(server.url + "/nodes")
    expect(page.locator("tr.node-row").first).to_be_visible()
    shot(page, "nodes-390")
    menu.click()
    side.get_by_role("link", name="Tasks").click()
    page.wait_for_url("**/tasks")
    expect(side).not_to_be_in_viewport()
    # At 1,440 px there is no menu button: the sidebar is always there.
    page.set_viewport_size({"width": 1440, "height": 900})
    expect(page.get_by_role("button", name="Menu")).to_be_hidden()
    expect(side).to_be_in_viewport()
