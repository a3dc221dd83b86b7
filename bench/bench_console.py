"""Console benchmark: how fast the task page draws a log and a chart, each against a baseline.

    python bench/bench_console.py [--lines 50000] [--live 50] [--only log|chart]

- replay: a finished task with --lines lines; time until the page (headless Chromium) has drawn
  the last line, against `requests` reading the same server-sent events to `end` (baseline).
- live: one line posted by the agent at a time; time from the POST to the line in the page's DOM,
  against the time to the same line arriving at a `requests` SSE reader (baseline). p50 / p95.
- chart: a 1,000-point, 4-series uPlot chart built and drawn in the task page (SLY.Chart, the
  code the metric and telemetry charts use), against loading the nodes page with its one node
  (baseline: navigation to the page's first data drawn). Medians of --repeat runs.
- gallery: first paint of a 200-image annotated project page (640 x 480 images, 3 labels each:
  rectangle, polygon, bitmap): navigation until every card of the first page shows its thumbnail
  and its labels (bitmaps decoded), against the same nodes-page baseline. "cold" is the first
  visit (the server makes the thumbnails); "warm" a new browser context each run (thumbnails from
  the server's disk cache, none from the browser's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser.conftest import CHROMIUM_ARGS  # noqa: E402
from tests.support.fake_agent import FakeAgent  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402


def sse_lines(url: str, token: str, task_id: int, on_line=None) -> int:
    """Read the task's log stream to `end`; returns the number of lines."""
    n = 0
    with requests.get(
        f"{url}/api/v1/tasks/{task_id}/logs",
        params={"follow": 1, "after": -1},
        headers={"Authorization": f"Bearer {token}"},
        stream=True,
        timeout=(10, 120),
    ) as r:
        event = None
        for raw in r.iter_lines(decode_unicode=True):
            if raw.startswith("event:"):
                event = raw[6:].strip()
            elif raw.startswith("data:") and event == "line":
                n += 1
                if on_line:
                    on_line(json.loads(raw[5:]))
            elif raw == "" and event == "end":
                return n
    return n


def sign_in(page, srv) -> None:
    page.goto(srv.url + "/signin")
    page.fill("#token", srv.admin_token)
    page.click("button[type=submit]")
    page.wait_for_url("**/nodes")


def bench_log(args, srv, agent, new_task):
    """Replay and live latency of the task log; returns (base_replay, page_replay, lat_base, lat_page)."""
    from playwright.sync_api import sync_playwright

    done = new_task()
    for i in range(0, args.lines, 5000):
        agent.log(done, *[f"line {j} " + "x" * 60 for j in range(i, min(args.lines, i + 5000))])
    agent.state(done, "finished", exit_code=0)

    t0 = time.perf_counter()
    assert sse_lines(srv.url, srv.admin_token, done) == args.lines
    base_replay = time.perf_counter() - t0

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = b.new_page()
        sign_in(page, srv)
        t0 = time.perf_counter()
        page.goto(f"{srv.url}/tasks/{done}")
        page.wait_for_function(
            "(n) => { const l = document.querySelector('#log .line:last-child');"
            " return l && l.dataset.seq == String(n - 1); }",
            arg=args.lines,
            timeout=300_000,
        )
        page_replay = time.perf_counter() - t0

        live = new_task()
        page.goto(f"{srv.url}/tasks/{live}")
        page.wait_for_selector("#t-state:text('running')")
        arrived: dict[int, float] = {}
        reader = threading.Thread(
            target=sse_lines,
            args=(srv.url, srv.admin_token, live, lambda ln: arrived.__setitem__(ln["seq"], time.perf_counter())),
            daemon=True,
        )
        reader.start()
        time.sleep(0.5)  # let the reader's stream open before the first line
        lat_page, lat_base = [], []
        for i in range(args.live):
            t0 = time.perf_counter()
            agent.log(live, f"live {i}")
            page.wait_for_function(
                "(s) => { const l = document.querySelector('#log .line:last-child');"
                " return l && l.dataset.seq == String(s); }",
                arg=i,
                polling=2,
            )
            lat_page.append(time.perf_counter() - t0)
            while i not in arrived:
                time.sleep(0.001)
            lat_base.append(arrived[i] - t0)
        agent.state(live, "finished", exit_code=0)
        b.close()
    return base_replay, page_replay, lat_base, lat_page


CHART_JS = """async (n) => {
    const t0 = Date.now() / 1000, xs = Array.from({length: n}, (_, i) => t0 - (n - i) * 5);
    const data = [xs, ...[0, 1, 2, 3].map(k => xs.map((_, i) => 50 + 40 * Math.sin(i / (20 + 7 * k) + k)))];
    const fig = SLY.el("figure", {style: "width:900px"});
    document.getElementById("task").append(fig);
    const start = performance.now();
    const c = new SLY.Chart(fig, {title: "bench", x: "time", unit: "%", range: [0, 100],
                                  series: ["a", "b", "c", "d"].map(label => ({label}))});
    c.set(data);
    await new Promise(r => setTimeout(r, 0));        // uPlot commits its first draw in a microtask
    fig.getBoundingClientRect();                     // and the layout of its legend and axes
    const ms = performance.now() - start;
    if (fig.uplot.data[1].length !== n) throw new Error("chart not drawn");
    c.destroy(); fig.remove();
    return ms;
}"""


def bench_chart(args, srv, new_task):
    """Median seconds to load the nodes page (baseline) and to build and draw a 4 x 1,000-point chart."""
    from playwright.sync_api import sync_playwright

    task = new_task()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1440, "height": 900})
        sign_in(page, srv)
        loads = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            page.goto(srv.url + "/nodes")
            page.wait_for_selector("tr.node-row")
            loads.append(time.perf_counter() - t0)
        page.goto(f"{srv.url}/tasks/{task}")
        page.wait_for_selector("#t-state:text('running')")
        draws = [page.evaluate(CHART_JS, 1000) / 1000 for _ in range(args.repeat)]
        b.close()
    return statistics.median(loads), statistics.median(draws)


GALLERY_IMAGES = 200
GALLERY_DONE = """() => {
    const cards = [...document.querySelectorAll('#gallery li.tile')];
    return cards.length > 0 && cards.every(c => c.dataset.ready && c.querySelector('img').complete
                                           && c.querySelector('img').naturalWidth > 0);
}"""


def gallery_project(srv) -> int:
    """A 200-image project with three labels an image, made through the user API; returns its id."""
    import hashlib
    import io
    import random

    from PIL import Image, ImageDraw

    from tools.sample_project import bitmap_data

    admin = srv.admin()
    meta = {
        "classes": [
            {"title": "car", "shape": "rectangle", "color": "#E53935"},
            {"title": "road", "shape": "polygon", "color": "#43A047"},
            {"title": "sky", "shape": "bitmap", "color": "#1E88E5"},
        ],
        "tags": [],
    }
    disc = bitmap_data([[(x - 20) ** 2 + (y - 20) ** 2 <= 400 for x in range(41)] for y in range(41)])
    rng, items = random.Random(0), []
    for i in range(GALLERY_IMAGES):
        im = Image.merge("RGB", [Image.effect_noise((640, 480), 30 + 5 * k) for k in range(3)])
        x, y = rng.randint(10, 400), rng.randint(10, 300)
        ImageDraw.Draw(im).rectangle([x, y, x + 120, y + 80], fill=(220, 40, 40))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        admin.put(f"{srv.url}/api/v1/blobs/{sha}", data=data).raise_for_status()
        objs = [
            {
                "classTitle": "car",
                "geometryType": "rectangle",
                "tags": [],
                "points": {"exterior": [[x, y], [x + 120, y + 80]], "interior": []},
            },
            {
                "classTitle": "road",
                "geometryType": "polygon",
                "tags": [],
                "points": {"exterior": [[0, 479], [639, 479], [320, 300]], "interior": []},
            },
            {"classTitle": "sky", "geometryType": "bitmap", "tags": [], "bitmap": {"data": disc, "origin": [500, 40]}},
        ]
        items.append(
            {
                "name": f"img_{i:04d}.jpg",
                "sha256": sha,
                "size": len(data),
                "ann": {"size": {"height": 480, "width": 640}, "tags": [], "objects": objs},
            }
        )
    r = admin.post(
        srv.url + "/api/v1/projects",
        json={"name": "bench-gallery", "meta": meta, "datasets": [{"name": "ds0", "items": items}]},
    )
    r.raise_for_status()
    return r.json()["id"]


def bench_gallery(args, srv):
    """Seconds: median nodes-page load (baseline), the first (cold) gallery paint, median warm paints."""
    from playwright.sync_api import sync_playwright

    pid = gallery_project(srv)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)

        def visit(path: str, done: str) -> float:
            ctx = b.new_context(viewport={"width": 1440, "height": 900})  # nothing in the browser's cache
            page = ctx.new_page()
            sign_in(page, srv)
            t0 = time.perf_counter()
            page.goto(srv.url + path)
            page.wait_for_function(done, timeout=120_000, polling=10)
            took = time.perf_counter() - t0
            ctx.close()
            return took

        base = statistics.median(
            visit("/nodes", "() => !!document.querySelector('tr.node-row')") for _ in range(args.repeat)
        )
        cold = visit(f"/projects/{pid}", GALLERY_DONE)
        warm = statistics.median(visit(f"/projects/{pid}", GALLERY_DONE) for _ in range(args.repeat))
        b.close()
    return base, cold, warm


def report_log(args, base_replay, page_replay, lat_base, lat_page):
    def q(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    replay = f"replay {args.lines} lines (s)"
    print(f"{replay:<34}{base_replay:>14.2f}{page_replay:>14.2f}{page_replay / base_replay:>8.2f}")
    print(f"{'replay rate (lines/s)':<34}{args.lines / base_replay:>14.0f}{args.lines / page_replay:>14.0f}")
    for name, p in (("live line p50 (ms)", 50), ("live line p95 (ms)", 95)):
        bq, pq = q(lat_base, p) * 1000, q(lat_page, p) * 1000
        print(f"{name:<34}{bq:>14.1f}{pq:>14.1f}{pq / bq:>8.2f}")
    print(
        f"(live: {args.live} lines, median of both: {statistics.median(lat_base) * 1000:.1f} / "
        f"{statistics.median(lat_page) * 1000:.1f} ms; the page's 30 ms draw batching is part of its number)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50000)
    ap.add_argument("--live", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", choices=["log", "chart", "gallery"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(Path(tmp) / "data").start()
        admin = srv.admin()
        try:
            a = admin.post(srv.url + "/api/v1/agents", json={"name": "bench"}).json()
            agent = FakeAgent(srv.url, a["token"])
            agent.connect()

            def new_task() -> int:
                t = admin.post(
                    srv.url + "/api/v1/tasks", json={"agent_id": a["id"], "type": "custom", "image": "x"}
                ).json()
                agent.poll_until("tasks")
                agent.state(t["id"], "running")
                return t["id"]

            log = bench_log(args, srv, agent, new_task) if args.only in (None, "log") else None
            chart = bench_chart(args, srv, new_task) if args.only in (None, "chart") else None
            gallery = bench_gallery(args, srv) if args.only in (None, "gallery") else None
        finally:
            srv.stop()

    print(f"{'measure':<34}{'baseline':>14}{'console':>14}{'ratio':>8}")
    if log:
        report_log(args, *log)
    if chart:
        base, drawn = chart
        print(f"{'chart 4 x 1,000 points (ms)':<34}{base * 1000:>14.1f}{drawn * 1000:>14.1f}{drawn / base:>8.2f}")
        print(f"(chart: baseline is loading the nodes page until its node is drawn; medians of {args.repeat} runs)")
    if gallery:
        base, cold, warm = gallery
        for name, v in (("gallery first paint, cold (ms)", cold), ("gallery first paint, warm (ms)", warm)):
            print(f"{name:<34}{base * 1000:>14.1f}{v * 1000:>14.1f}{v / base:>8.2f}")
        print(
            f"(gallery: {GALLERY_IMAGES}-image project, first page of 48 cards with thumbnails and labels; baseline "
            f"is the nodes page in a new browser context; warm: median of {args.repeat})"
        )


if __name__ == "__main__":
    main()
