"""The console's charts (uPlot), the layout at 900 and 1,440 px, the favicon and stale-node removal."""

from __future__ import annotations

import math
import sqlite3
import time

import pytest
import requests

from tests.browser.conftest import online_agent, shot, sign_in
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect

DAY = 86400.0

# What a chart holds and shows, read from the uPlot instance the figure carries (`figure.uplot`):
# series labels, data columns, tick values per axis (uPlot's `_splits`), marks, and how many canvas
# pixels are painted in each series' colour (so a series that is listed but not drawn fails).
CHART_STATE = """(fig) => {
    const u = fig.uplot;
    const ctx = u.ctx, img = ctx.getImageData(0, 0, ctx.canvas.width, ctx.canvas.height).data;
    const rgb = s => {
        const h = s.replace('#', '').slice(0, 6);
        return [0, 2, 4].map(i => parseInt(h.slice(i, i + 2), 16));
    };
    const painted = u.series.slice(1).map(s => {
        const [r, g, b] = rgb(s._stroke); let n = 0;
        for (let i = 0; i < img.length; i += 4)
            if (img[i + 3] > 200
                && Math.abs(img[i] - r) + Math.abs(img[i + 1] - g) + Math.abs(img[i + 2] - b) < 40) n++;
        return n;
    });
    return {labels: u.series.map(s => s.label), data: u.data.map(c => Array.from(c)),
            ticks: u.axes.map(a => (a._splits || []).length), painted, marks: Number(fig.dataset.marks || 0),
            xmin: u.scales.x.min, xmax: u.scales.x.max};
}"""


def poll_page(page, predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll while letting Playwright dispatch the page's events (a plain sleep would hold them)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        page.wait_for_timeout(20)


def chart_state(page, selector: str) -> dict:
    return page.locator(selector).evaluate(CHART_STATE)


def train_task(server, agent_name: str) -> tuple[dict, FakeAgent]:
    created, agent = online_agent(server, agent_name, ["train"])
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks",
            json={
                "agent_id": created["id"],
                "type": "train",
                "image": "registry.example.com/team/detector-train:2024.11-cuda12",
            },
            timeout=10,
        )
        .json()
    )
    agent.poll_until("tasks")
    agent.state(task["id"], "preparing")
    agent.state(task["id"], "running")
    return task, agent


@pytest.mark.slow
def test_task_page_draws_train_and_val_curves_with_axes_and_checkpoints(console, server):
    task, agent = train_task(server, "curves")
    train = [1.20, 0.80, 0.55, 0.40, 0.32, 0.27, 0.24, 0.22]
    val = [1.35, 0.98, 0.74, 0.62, 0.57, 0.55, 0.54, 0.55]
    lines = []
    for epoch, (t, v) in enumerate(zip(train, val, strict=True), 1):
        lines.append(
            {
                "message": f"epoch {epoch}",
                "event_type": "metrics",
                "type": "train",
                "epoch": epoch,
                "metrics": {"loss": t, "accuracy": 1 - t / 2},
            }
        )
        lines.append(
            {
                "message": f"val {epoch}",
                "event_type": "EventType.METRICS",
                "type": "val",
                "epoch": epoch,
                "metrics": {"loss": v, "accuracy": 1 - v / 2},
            }
        )
        if epoch in (3, 6):  # the SDK's report_checkpoint_saved, as the agent normalises it
            lines.append(
                {
                    "message": "checkpoint",
                    "event_type": "checkpoint",
                    "id": epoch // 3,
                    "subdir": f"checkpoints/{epoch}",
                    "sizeb": 1000,
                    "best_now": epoch == 6,
                }
            )
    agent.log(task["id"], *lines)

    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/tasks/{task['id']}")
    loss = "#t-metrics figure[data-metric='loss']"
    expect(page.locator(f"{loss} .uplot canvas")).to_have_count(1)
    # marks come with the log stream; by default only the best checkpoint is marked
    expect(page.locator(loss)).to_have_attribute("data-marks", "1")
    expect(page.locator("#ck-count")).to_have_text("(2)")
    expect(page.locator("#t-metrics figure")).to_have_count(2)  # loss and accuracy
    expect(page.locator(f"{loss} figcaption")).to_contain_text("◆ best checkpoint")
    page.get_by_role("button", name="All (2)").click()
    expect(page.locator(loss)).to_have_attribute("data-marks", "2")

    st = chart_state(page, loss)
    assert st["labels"] == ["epoch", "train", "val"]
    assert st["data"] == [list(range(1, 9)), train, val]
    assert all(n >= 3 for n in st["ticks"]), st["ticks"]  # both axes carry ticks
    assert all(n > 50 for n in st["painted"]), st["painted"]  # both lines are on the canvas
    legend = page.locator(f"{loss} .u-legend")
    expect(legend).to_contain_text("train")
    expect(legend).to_contain_text("val")
    expect(page.locator(f"{loss} figcaption")).to_contain_text("train 0.22 · val 0.55")
    expect(page.locator(f"{loss} figcaption")).to_contain_text("2 checkpoints")

    # The cursor tooltip names the epoch, both values, and the checkpoint saved there.
    box = page.locator(f"{loss} .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 2 / 7, box["y"] + box["height"] / 2)  # epoch 3 of 1..8
    tip = page.locator(f"{loss} .u-tip")
    expect(tip).to_be_visible()
    expect(tip).to_contain_text("epoch 3")
    expect(tip).to_contain_text("train 0.55")
    expect(tip).to_contain_text("val 0.74")
    expect(tip).to_contain_text("checkpoint 1")

    # A new epoch while the page is open extends both series.
    agent.log(
        task["id"],
        {"message": "e9", "event_type": "metrics", "type": "train", "epoch": 9, "metrics": {"loss": 0.21}},
        {"message": "v9", "event_type": "metrics", "type": "val", "epoch": 9, "metrics": {"loss": 0.56}},
    )
    expect(page.locator(loss)).to_have_attribute("data-points", "9", timeout=10_000)
    assert chart_state(page, loss)["data"][1][-1] == 0.21
    shot(page, "task-1440")
    page.set_viewport_size({"width": 900, "height": 900})
    expect(page.locator(loss)).to_be_visible()
    poll_for(lambda: page.evaluate("document.documentElement.scrollWidth") <= 900, timeout=5, what="page fits 900 px")
    shot(page, "task-900")
    agent.state(task["id"], "finished", exit_code=0)


@pytest.mark.slow
def test_node_page_charts_follow_telemetry_over_the_chosen_window(console, server):
    gpus = [
        {
            "index": i,
            "name": "NVIDIA A100-SXM4-80GB",
            "memory_total": 80 << 30,
            "memory_used": 10 << 30,
            "utilization": 50,
        }
        for i in range(2)
    ]
    created, agent = online_agent(server, "charted", gpus=gpus)
    cpu = [12.0, 25.0, 41.0, 58.0, 70.0]
    for i, c in enumerate(cpu):
        agent.telemetry(
            cpu=c,
            mem=30 + i,
            disk=40 + i,
            gpus=[dict(g, utilization=20 * i + 10 * g["index"], memory_used=(8 + i + g["index"]) << 30) for g in gpus],
        )
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/nodes/{created['id']}")
    for chart in ("cpu", "memory", "disk", "gpu-util", "gpu-mem"):
        expect(page.locator(f"#chart-{chart} .uplot canvas")).to_have_count(1)
        expect(page.locator(f"#chart-{chart}")).to_have_attribute("data-points", "5")
    st = chart_state(page, "#chart-cpu")
    assert st["labels"] == ["time", "CPU"] and st["data"][1] == cpu
    assert all(n >= 2 for n in st["ticks"]) and st["painted"][0] > 20
    gpu = chart_state(page, "#chart-gpu-util")
    assert gpu["labels"] == ["time", "GPU 0", "GPU 1"]
    assert gpu["data"][1:] == [[0, 20, 40, 60, 80], [10, 30, 50, 70, 90]]
    assert chart_state(page, "#chart-disk")["labels"] == ["time", "/data"]

    # A new node's few seconds of samples are not squeezed into the window's right edge: the axis
    # starts at its first sample and spans a minute (the samples fill it from the left), whatever the window.
    for window in ("1 h", "15 min"):
        page.get_by_role("button", name=window).click()
        expect(page.get_by_role("button", name=window)).to_have_attribute("aria-pressed", "true")
        st = chart_state(page, "#chart-cpu")
        assert st["xmin"] == st["data"][0][0] and 59 <= st["xmax"] - st["xmin"] < 90, (window, st["xmin"], st["xmax"])
        assert st["xmax"] >= time.time() - 5, (window, st["xmax"])
    page.get_by_role("button", name="All").click()
    st = chart_state(page, "#chart-cpu")
    assert st["xmax"] - st["xmin"] < 60  # fitted to the samples, posted within seconds

    agent.telemetry(cpu=5, mem=31)  # live: the page picks up new samples
    expect(page.locator("#chart-cpu")).to_have_attribute("data-points", "6", timeout=10_000)
    assert chart_state(page, "#chart-cpu")["data"][1][-1] == 5

    # Screenshots of a node with a longer, smoother history.
    created, agent = online_agent(server, "gpu-box-03", gpus=gpus)
    for i in range(60):
        agent.telemetry(
            cpu=45 + 25 * math.sin(i / 6),
            mem=52 + 10 * math.sin(i / 15),
            disk=61 + i / 30,
            gpus=[
                dict(
                    g,
                    utilization=max(0, min(100, 70 + 25 * math.sin(i / 5 + 2 * g["index"]))),
                    memory_used=int((38 + 20 * g["index"] + 6 * math.sin(i / 9)) * (80 << 30) / 100),
                )
                for g in gpus
            ],
        )
    page.goto(f"{server.url}/nodes/{created['id']}")
    expect(page.locator("#chart-gpu-mem")).to_have_attribute("data-points", "60")
    shot(page, "node-1440")
    page.set_viewport_size({"width": 900, "height": 900})
    poll_for(lambda: page.evaluate("document.documentElement.scrollWidth") <= 900, timeout=5, what="page fits 900 px")
    shot(page, "node-900")
    page.evaluate("localStorage.removeItem('sly.node.window')")


@pytest.mark.slow
def test_nodes_page_fits_900_px_with_every_action_visible(console, server):
    long_name = "gpu-box-17.training-cluster.eu-west.example.internal"
    gpus = [
        {
            "index": i,
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total": 80 << 30,
            "memory_used": 30 << 30,
            "utilization": 60,
        }
        for i in range(4)
    ]
    created, agent = online_agent(server, long_name, ["train", "inference", "custom"], gpus=gpus)
    agent.telemetry(cpu=47, mem=63, disk=71, gpus=[dict(g, utilization=15 + 20 * g["index"]) for g in gpus])
    page = console
    for width in (1440, 900):
        page.set_viewport_size({"width": width, "height": 900})
        page.reload()
        row = page.locator("tr.node-row", has_text=long_name[:12])
        expect(row.locator(".gpu .bar")).to_have_count(4)
        overflow = page.evaluate("""() => ({page: document.documentElement.scrollWidth,
            table: (w => w.scrollWidth - w.clientWidth)(document.querySelector('.table-wrap'))})""")
        assert overflow["page"] <= width and overflow["table"] <= 0, (width, overflow)
        expect(row.locator("td.actions button").first).to_be_visible()
        # every row's action buttons, measured in one go: the list re-renders as telemetry comes
        boxes = page.evaluate("""() => [...document.querySelectorAll('tr.node-row td.actions button')]
            .map(b => { const r = b.getBoundingClientRect(); return {x: r.x, width: r.width, height: r.height}; })""")
        assert boxes, "no action buttons"
        for bb in boxes:
            assert bb["width"] > 0 and bb["height"] > 0, (width, bb)
            assert bb["x"] >= 0 and bb["x"] + bb["width"] <= width, (width, bb)
        name = row.locator("a.node-name")
        assert name.get_attribute("title") == long_name  # the full name on hover
        if width == 900:
            assert name.evaluate("e => e.scrollWidth > e.clientWidth")  # cut with an ellipsis here
        # Bars sit on one line across the row: CPU, memory, disk and the first GPU bar start level.
        tops = [row.locator(f".{c} .bar").first.bounding_box()["y"] for c in ("cpu", "mem", "disk", "gpu")]
        assert max(tops) - min(tops) < 1.5, tops
        expect(page.locator("#sum-online")).not_to_have_text("—")
        shot(page, f"nodes-{width}")


def test_favicon_is_served_and_linked(page, server):
    r = requests.get(server.url + "/favicon.ico", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.content[:4] == b"\x00\x00\x01\x00"  # an ICO header
    page.goto(server.url + "/signin")
    href = page.locator("link[rel=icon]").get_attribute("href")
    assert requests.get(server.url + href, timeout=10).headers["content-type"] == "image/svg+xml"
    csp = requests.get(server.url + "/signin", timeout=10).headers["content-security-policy"]
    assert "style-src 'self';" in csp and "unsafe" not in csp


def _age(db_path, agent_id: int, *, last_seen: float | None = None, created_at: float | None = None) -> None:
    """Move an agent's times into the past, straight in the server's SQLite file (no API sets them)."""
    with sqlite3.connect(db_path, timeout=10) as db:
        if last_seen is not None:
            db.execute("UPDATE agents SET last_seen = ? WHERE id = ?", (last_seen, agent_id))
        if created_at is not None:
            db.execute("UPDATE agents SET created_at = ? WHERE id = ?", (created_at, agent_id))


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own (a known set of nodes); a node stays online 10 minutes after contact."""
    srv = ServerProcess(tmp_path / "data", extra_args=["--offline-after-s", "600"]).start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_remove_stale_nodes_deletes_only_offline_nodes_older_than_the_threshold(page, own_server):
    srv = own_server
    admin, db_path, now = srv.admin(), srv.data_dir / "server.db", time.time()

    def add(name: str, connect: bool) -> int:
        body = admin.post(srv.url + "/api/v1/agents", json={"name": name}, timeout=10).json()
        if connect:
            FakeAgent(srv.url, body["token"]).connect()

            # The contact goes to the database with the server's next batch (--contact-flush-s, 1 s):
            # wait for it, so that the aging below is not overwritten by it.
            def written():
                with sqlite3.connect(db_path, timeout=10) as db:
                    return db.execute("SELECT last_seen FROM agents WHERE id = ?", (body["id"],)).fetchone()[0]

            poll_for(written, timeout=10, what=f"{name}'s contact written")
        return body["id"]

    old = add("gone-10-days", True)
    recent = add("gone-2-days", True)
    never_old = add("never-seen-40-days", False)
    never_new = add("never-seen-new", False)
    alive = add("alive-since-long", True)
    _age(db_path, old, last_seen=now - 10 * DAY, created_at=now - 60 * DAY)
    _age(db_path, recent, last_seen=now - 2 * DAY, created_at=now - 60 * DAY)
    _age(db_path, never_old, created_at=now - 40 * DAY)
    _age(db_path, alive, created_at=now - 90 * DAY)  # added long ago, but online now: kept

    sign_in(page, srv)
    page.get_by_role("button", name="Remove stale nodes…").click()
    age = page.get_by_label("Remove offline nodes last seen more than")
    expect(age).to_have_value(str(int(7 * DAY)))
    listed = page.locator("#stale-list li")
    expect(listed).to_have_count(2)
    assert {t.split(" ")[0] for t in listed.all_inner_texts()} == {"gone-10-days", "never-seen-40-days"}
    age.select_option(label="1 day")
    expect(listed).to_have_count(3)  # the 2-day-old one joins at 1 day
    age.select_option(label="30 days")
    expect(listed).to_have_count(1)
    age.select_option(label="7 days")
    expect(listed).to_have_count(2)

    # The confirmation comes after the page has loaded the node list again: answer it from a
    # handler (a dialog blocks the click that opens it), first "cancel", then "OK".
    answers, prompts = ["dismiss", "accept"], []
    page.on("dialog", lambda d: (prompts.append(d.message), getattr(d, answers.pop(0))()))
    page.get_by_role("button", name="Remove 2 nodes").click()
    poll_page(page, lambda: len(prompts) == 1, what="the first confirmation")
    assert len(admin.get(srv.url + "/api/v1/agents", timeout=10).json()["items"]) == 5  # cancelled: none removed
    page.get_by_role("button", name="Remove 2 nodes").click()
    expect(page.locator("#stale-status")).to_have_text("2 / 2 removed")
    assert "Remove 2 offline nodes last seen more than 7 days ago" in prompts[1]
    assert page.locator("#stale-progress").get_attribute("value") == "2"
    expect(page.locator("#flash")).to_contain_text("Removed 2 offline nodes")
    left = {a["id"] for a in admin.get(srv.url + "/api/v1/agents", timeout=10).json()["items"]}
    assert left == {recent, never_new, alive}
    expect(page.locator("tr.node-row")).to_have_count(3)
    expect(listed).to_have_count(0)
    expect(page.get_by_role("button", name="Remove", exact=True)).to_be_disabled()


@pytest.mark.slow
def test_forty_checkpoints_leave_the_curves_readable(console, server):
    """One checkpoint per epoch for 40 epochs: the default marks only the best; "All" draws the others
    as small diamonds on the axis, so the curves keep nearly every pixel they have with no marks."""
    task, agent = train_task(server, "forty")
    lines = []
    for epoch in range(1, 41):
        lines.append(
            {"message": "m", "event_type": "metrics", "type": "train", "epoch": epoch, "metrics": {"loss": 2 / epoch}}
        )
        lines.append(
            {"message": "c", "event_type": "checkpoint", "id": epoch, "sizeb": 10, "best_now": epoch in (10, 20, 30)}
        )
    agent.log(task["id"], *lines)
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{server.url}/tasks/{task['id']}")
    loss = "#t-metrics figure[data-metric='loss']"
    expect(page.locator("#ck-count")).to_have_text("(40)")
    expect(page.locator(loss)).to_have_attribute("data-marks", "1")
    painted = {}
    for mode, marks in (("None", "0"), ("All (40)", "40"), ("◆ Best", "1")):
        page.get_by_role("button", name=mode).click()
        expect(page.locator(loss)).to_have_attribute("data-marks", marks)
        page.wait_for_timeout(50)
        painted[mode] = chart_state(page, loss)["painted"][0]
    # the curve keeps >= 90% of its pixels with all 40 marks (a full-height line each hid a third)
    assert painted["All (40)"] >= 0.9 * painted["None"], painted
    # the best is the last checkpoint that said best_now: epoch 30, in the tooltip there
    box = page.locator(f"{loss} .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 29 / 39, box["y"] + box["height"] / 2)
    expect(page.locator(f"{loss} .u-tip")).to_contain_text("checkpoint 30 (best)")
    agent.state(task["id"], "finished", exit_code=0)


def test_node_window_caps_a_long_history(console, server):
    """Three hours of samples: 15 min and 1 h show exactly that much up to now; All shows them all."""
    created, _ = online_agent(server, "long-history")
    now = time.time()
    items = [
        {"ts": now - 3 * 3600 + 60 * i, "cpu": 50 + 40 * math.sin(i / 9), "mem": 40, "disks": [30], "gpus": []}
        for i in range(180)
    ]
    body = {"items": items, "disks": ["/data"], "gpus": []}
    page = console
    page.route(f"**/api/v1/agents/{created['id']}/telemetry*", lambda route: route.fulfill(json=body))
    page.goto(f"{server.url}/nodes/{created['id']}")
    for window, span in (("15 min", 900), ("1 h", 3600), ("All", 3 * 3600)):
        page.get_by_role("button", name=window).click()
        st = chart_state(page, "#chart-cpu")
        assert abs((st["xmax"] - st["xmin"]) - span) < 90, (window, st["xmax"] - st["xmin"])
    page.evaluate("localStorage.removeItem('sly.node.window')")
