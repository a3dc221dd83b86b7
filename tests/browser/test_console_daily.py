"""The console's smaller daily items (issue 25): why a queued task waits, in the task list; the log
box's tools; a warning for a node name in use; labels that show on an image in their own colour."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from client.api import UserClient
from tests.browser.conftest import create_task as _task
from tests.browser.conftest import online_agent, shot

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


def test_task_list_says_why_queued_tasks_wait(console, server):
    busy, agent = online_agent(server, "list-refusing")
    agent.poll(free_slots=0, refusing="not enough disk: 120 MB free under /data (MIN_FREE_DISK_MB)")
    r = server.admin().post(server.url + "/api/v1/agents", json={"name": "list-never-started"}, timeout=10)
    never = r.json()
    refused = _task(server, busy["id"], type="custom", image="x:1")
    unstarted = _task(server, never["id"], type="custom", image="x:1")
    page = console
    page.goto(server.url + "/tasks?state=queued")
    row = page.locator(f"tr.task-row[data-id='{refused['id']}'] .waiting")
    expect(row).to_have_attribute("data-reason", "node_refusing")
    expect(row).to_contain_text("list-refusing takes no task now: not enough disk")
    other = page.locator(f"tr.task-row[data-id='{unstarted['id']}'] .waiting")
    expect(other).to_have_attribute("data-reason", "node_offline")
    expect(other).to_contain_text("has never connected")
    # a task that runs says nothing of waiting
    agent.poll(free_slots=1)
    page.goto(server.url + "/tasks")
    expect(page.locator(f"tr.task-row[data-id='{refused['id']}']")).to_have_attribute("data-state", "assigned")
    expect(page.locator(f"tr.task-row[data-id='{refused['id']}'] .waiting")).to_have_count(0)
    server.admin().post(f"{server.url}/api/v1/tasks/{unstarted['id']}/stop", timeout=10)


def test_log_box_filters_wraps_downloads_goes_full_screen_and_jumps_to_the_bottom(console, server):
    created, agent = online_agent(server, "log-tools", ["custom"])
    task = _task(server, created["id"], type="custom", image="x:1")
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    agent.log(task["id"], *[f"step {i}: loss {1 / (i + 1):.3f}" for i in range(300)], "W" * 400)
    agent.log(task["id"], {"message": "disk almost full", "level": "warning", "stream": "stderr"})
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/tasks/{task['id']}")
    log = page.locator("#log")
    expect(log.locator(".line")).to_have_count(302)
    assert log.evaluate("e => e.clientHeight") >= 0.6 * 900  # taller than the 384 px it was

    # filter: only the matching lines stay, with their count
    page.get_by_label("Filter the log").fill("step 29")
    expect(log.locator(".line:visible")).to_have_count(11)  # step 29, 290..299
    expect(page.locator("#log-matches")).to_have_text("11 of 302 lines")
    agent.log(task["id"], "step 29x arrives live")  # a new line is filtered as it arrives
    expect(log.locator(".line:visible")).to_have_count(12)
    page.get_by_label("Filter the log").fill("")
    expect(log.locator(".line:visible")).to_have_count(303)

    # wrap off: the long line runs past the box (scrolls sideways); on again: it wraps
    long_line = log.locator(".line", has_text="WWWW")
    page.get_by_role("button", name="Wrap").click()
    expect(page.get_by_role("button", name="Wrap")).to_have_attribute("aria-pressed", "false")
    assert log.evaluate("e => e.scrollWidth > e.clientWidth")
    page.get_by_role("button", name="Wrap").click()
    assert long_line.evaluate("e => e.getBoundingClientRect().height") > 30

    # scrolled up: following pauses, and "Jump to bottom" brings it back
    log.evaluate("e => { e.scrollTop = 0; e.dispatchEvent(new Event('scroll')); }")
    jump = page.get_by_role("button", name="Jump to bottom")
    expect(jump).to_be_visible()
    jump.click()
    expect(jump).to_be_hidden()
    assert log.evaluate("e => e.scrollHeight - e.scrollTop - e.clientHeight") < 8

    # download: the whole log as text, one line each, as shown
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download").click()
    text = open(dl.value.path(), encoding="utf-8").read().splitlines()
    assert dl.value.suggested_filename == f"task-{task['id']}.log"
    assert len(text) == 303 and text[0].endswith("step 0: loss 1.000")
    assert text[301].endswith("[stderr] WARNING: disk almost full")

    # full screen: the log covers the window; Esc leaves it
    page.get_by_role("button", name="Full screen").click()
    box = page.locator("#log-card").bounding_box()
    assert box["width"] == 1440 and box["height"] == 900, box
    shot(page, "task-log-full")
    page.keyboard.press("Escape")
    expect(page.get_by_role("button", name="Full screen")).to_have_attribute("aria-pressed", "false")
    assert page.locator("#log-card").bounding_box()["width"] < 1440
    agent.state(task["id"], "finished", exit_code=0)


def test_add_and_edit_warn_when_a_node_has_the_name(console, server):
    taken, _ = online_agent(server, "dup-name-node")
    other, _ = online_agent(server, "dup-other-node")
    page = console
    page.goto(server.url + "/nodes")
    page.get_by_role("button", name="Add node").click()
    warn = page.locator("#add-name-warn")
    page.locator("#add-panel").get_by_label("Name").fill("Dup-Name-Node ")
    expect(warn).to_contain_text(f"A node named “dup-name-node” exists already (#{taken['id']})")
    page.locator("#add-panel").get_by_label("Name").fill("dup-name-node-2")
    expect(warn).to_be_hidden()
    page.keyboard.press("Escape")
    # editing a node: its own name is no clash, another's is
    page.get_by_role("button", name="Edit dup-other-node").click()
    ewarn = page.locator("#edit-name-warn")
    page.wait_for_timeout(300)  # the fleet's names load
    expect(ewarn).to_be_hidden()
    page.locator("#edit-panel").get_by_label("Name").fill("dup-name-node")
    expect(ewarn).to_contain_text("exists already")
    page.keyboard.press("Escape")
    expect(page.locator("#edit-panel")).to_be_hidden()


def test_labels_show_on_an_image_painted_in_their_class_colour(console, server):
    """The demo paints each object in its class colour: a label drawn only in that colour vanishes.
    The casing (a dark band under the colour line) must put dark pixels along the box's edge."""
    color = (232, 119, 46)
    buf = io.BytesIO()
    Image.new("RGB", (160, 120), color).save(buf, format="PNG")
    client = UserClient(server.url, server.admin_token)
    meta = {"classes": [{"title": "car", "shape": "rectangle", "color": "#E8772E"}], "tags": []}
    ann = {
        "size": {"height": 120, "width": 160},
        "tags": [],
        "objects": [
            {
                "classTitle": "car",
                "geometryType": "rectangle",
                "tags": [],
                "points": {"exterior": [[30, 25], [129, 94]], "interior": []},
            }
        ],
    }
    item = {"name": "same.png", "sha256": client.upload_bytes(buf.getvalue()), "size": len(buf.getvalue()), "ann": ann}
    project = client.create_project("same-colour", [{"name": "ds", "items": [item]}], meta=meta)
    page = console
    page.goto(f"{server.url}/projects/{project['id']}")
    frame = page.locator("#gallery li.tile .frame")
    expect(page.locator("#gallery li.tile[data-ready]")).to_have_count(1)
    page.wait_for_timeout(100)  # the thumbnail paints
    png = Image.open(io.BytesIO(frame.screenshot())).convert("RGB")
    px = png.tobytes()
    dark = sum(1 for i in range(0, len(px), 3) if px[i] + px[i + 1] + px[i + 2] < 200)
    w, h = png.size
    # the box's outline at tile scale is about 2 * (0.62 w + 0.58 h) pixels long; most of it dark
    assert dark > 1.5 * (0.6 * w + 0.55 * h), (dark, png.size)
