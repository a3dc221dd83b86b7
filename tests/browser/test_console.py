"""The web console in a real browser: sign-in, nodes, tasks with live logs, telemetry, uploads."""

from __future__ import annotations

import hashlib
import re

import pytest
import requests

from tests.browser.conftest import online_agent, shot, sign_in
from tests.support.fake_agent import FakeAgent

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


def hide_token(page, token: str) -> None:
    """Mask the token on the page before a screenshot goes to docs/ (tokens never go to disk)."""
    page.evaluate(
        """(t) => {
        const mask = "•".repeat(32), v = document.getElementById("token-value"); v.value = mask;
        for (const p of document.querySelectorAll("#run-commands pre"))
            p.textContent = p.textContent.split(t).join(mask);
    }""",
        token,
    )


@pytest.mark.slow
def test_sign_in_then_add_node_shows_a_working_token_once(page, server):
    page.goto(server.url + "/tasks")
    page.wait_for_url(re.compile(r"/signin\?next=%2Ftasks$"))  # no session: pages send you to sign-in, and back
    page.get_by_label("Admin token").fill("wrong-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_be_visible()
    shot(page, "signin")
    sign_in(page, server)
    assert server.admin_token not in page.url

    page.get_by_role("button", name="Add node").click()
    page.locator("#add-panel").get_by_label("Name").fill("browser-node-1")
    page.locator("#add-panel").get_by_role("button", name="Create").click()
    token_box = page.get_by_label("Token", exact=True)
    expect(token_box).to_have_value(re.compile(r"^[A-Za-z0-9]{32}$"))
    token = token_box.input_value()
    commands = page.locator("#run-commands pre.cmd")
    expect(commands.first).to_contain_text(token)
    assert "docker run" in " ".join(commands.all_inner_texts())
    page.locator("#token-panel").get_by_role("button", name="Copy", exact=True).click()
    assert page.evaluate("navigator.clipboard.readText()") == token
    hide_token(page, token)
    shot(page, "nodes-add")

    # The token shown is the node's: the agent API accepts it.
    FakeAgent(server.url, token).connect()
    page.get_by_role("button", name="Done").click()
    expect(page.locator("#token-panel")).to_be_hidden()
    assert page.locator("#token-value").input_value() == ""  # not left in the page
    row = page.locator("tr.node-row", has_text="browser-node-1")
    expect(row.locator(".status")).to_have_text("online", timeout=10_000)

    # Sign out: the session cookie no longer opens the API.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url("**/signin")
    assert page.request.get(server.url + "/api/v1/agents").status == 401


def test_edit_node_untick_type_then_server_refuses_it_and_form_hides_node(console, server):
    created, agent = online_agent(server, "edit-me", ["train", "custom"])
    page = console
    page.reload()
    row = page.locator("tr.node-row", has_text="edit-me")
    row.get_by_role("button", name="Edit edit-me", exact=True).click()
    page.locator("#edit-panel").get_by_label("Name").fill("edited-node")
    form = page.locator("#edit-form")
    expect(form.get_by_label("custom")).to_be_checked()
    form.get_by_label("custom").uncheck()
    form.get_by_role("button", name="Save").click()
    expect(page.locator("tr.node-row", has_text="edited-node").locator(".types")).to_have_text("train")

    admin = server.admin()
    got = admin.get(f"{server.url}/api/v1/agents/{created['id']}", timeout=10).json()
    assert got["name"] == "edited-node" and got["allowed_task_types"] == ["train"]
    r = admin.post(
        server.url + "/api/v1/tasks",
        json={"agent_id": created["id"], "type": "custom", "image": "sly-test/busybox:latest"},
        timeout=10,
    )
    assert r.status_code == 409, r.text

    agent.poll()  # keep it online
    page.goto(server.url + "/tasks")
    page.get_by_text("New task").click()
    page.get_by_label("Type").select_option("train")
    expect(page.locator("#nt-node option", has_text="edited-node")).to_have_count(1)
    page.get_by_label("Type").select_option("custom")
    expect(page.locator("#nt-node option", has_text="edited-node")).to_have_count(0)


@pytest.mark.slow
def test_task_from_form_live_log_progress_and_stop(console, server):
    created, agent = online_agent(server, "runner", ["custom", "train"])
    page = console
    page.goto(server.url + "/tasks")
    page.get_by_text("New task").click()
    form = page.locator("#task-form")
    form.get_by_label("Type").select_option("custom")
    form.get_by_label("Node").select_option(label="runner")
    form.get_by_label("Image").fill("sly-test/busybox:latest")
    form.get_by_label("Timeout (s)").fill("600")
    form.get_by_role("button", name="Start task").click()
    page.wait_for_url(re.compile(r".*/tasks/\d+$"))
    task_id = int(page.url.rsplit("/", 1)[1])
    task = server.admin().get(f"{server.url}/api/v1/tasks/{task_id}", timeout=10).json()
    assert (task["agent_id"], task["type"], task["image"]) == (created["id"], "custom", "sly-test/busybox:latest")

    # Act as the agent: take the task, run it, ship log lines and progress.
    assert [t["id"] for t in agent.poll_until("tasks")] == [task_id]
    agent.state(task_id, "preparing")
    agent.state(task_id, "running")
    expect(page.locator("#t-state")).to_have_text("running")
    log = page.locator("#log .line")
    agent.log(
        task_id,
        "hello from the task",
        {"message": "pulling image", "stream": "agent"},
        {"message": "something odd", "stream": "stderr", "level": "warning"},
    )
    expect(log).to_have_count(3)
    expect(page.locator("#log .src-stderr.lvl-warning")).to_have_text(re.compile("something odd"))
    expect(page.locator("#log .src-agent")).to_have_count(1)

    progress = page.locator("#t-progress")
    agent.log(task_id, {"message": "step 3/10", "event_type": "progress", "current": 3, "total": 10})
    expect(progress).to_have_attribute("value", "3")
    agent.log(
        task_id,
        *[f"line {i}" for i in range(60)],
        {"message": "step 7/10", "event_type": "progress", "current": 7, "total": 10},
    )
    expect(log).to_have_count(65)
    expect(progress).to_have_attribute("value", "7")  # from the log line, live
    agent.state(task_id, "running", progress={"current": 7, "total": 10})  # as the agent also reports it
    assert page.evaluate(
        "() => { const l = document.getElementById('log'); return l.scrollHeight - l.scrollTop - l.clientHeight < 8; }"
    )

    # Scrolled up, the log keeps its place when new lines come.
    page.evaluate(
        "() => { const l = document.getElementById('log'); l.scrollTop = 0; l.dispatchEvent(new Event('scroll')); }"
    )
    expect(page.locator("#log-follow")).to_contain_text("paused")
    agent.log(task_id, "after scrolling up")
    expect(log).to_have_count(66)
    assert page.evaluate("document.getElementById('log').scrollTop") == 0
    page.evaluate("() => { const l = document.getElementById('log'); l.scrollTop = l.scrollHeight; }")
    shot(page, "task")

    page.goto(server.url + f"/tasks?agent_id={created['id']}")
    row = page.locator(f"tr.task-row[data-id='{task_id}']")
    expect(row.locator("progress")).to_have_attribute("value", "7")
    shot(page, "tasks")
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name=f"Stop task {task_id}").click()
    assert agent.poll_until("stop", running=[task_id]) == [task_id]
    agent.state(task_id, "stopped", exit_code=137)
    expect(row.locator(".state")).to_have_text("stopped", timeout=10_000)
    expect(row.get_by_role("button", name=f"Stop task {task_id}")).to_have_count(0)

    page.get_by_label("State").select_option("running")
    expect(row).to_have_count(0)
    page.get_by_label("State").select_option("stopped")
    expect(row).to_have_count(1)
    assert "state=stopped" in page.url  # filters are kept in the URL

    page.goto(server.url + f"/tasks/{task_id}")
    expect(page.locator("#t-exit")).to_have_text("137 (killed by Stop: SIGKILL after the grace period)")
    expect(page.locator("#t-states li")).to_have_count(5)  # queued assigned preparing running stopped


def test_task_page_shows_results_metrics_and_error(console, server):
    created, agent = online_agent(server, "trainer", ["train"])
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
    for epoch, loss in enumerate((0.9, 0.5, 0.3), 1):
        agent.log(
            task["id"],
            {
                "message": f"epoch {epoch}",
                "event_type": "EventType.METRICS",
                "type": "train",
                "epoch": epoch,
                "metrics": {"loss": loss},
            },
        )
    agent.state(task["id"], "uploading")
    report = b"accuracy 0.97\n"
    agent.results(task["id"], "artifacts", {"report.txt": report})
    agent.results(task["id"], "model", {"weights.bin": b"W" * 100}, name="trained-model")
    agent.state(task["id"], "failed", exit_code=3, error="upload of the last checkpoint failed")

    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#t-state")).to_have_text("failed")
    expect(page.locator("#t-exit")).to_have_text("3")
    expect(page.locator("#t-error")).to_have_text("upload of the last checkpoint failed")
    link = page.get_by_role("link", name="report.txt")
    assert page.request.get(server.url + link.get_attribute("href")).body() == report
    expect(page.locator("#t-results")).to_contain_text("Model")
    expect(page.locator("#t-metrics figure[data-metric='loss']")).to_have_attribute("data-points", "3")
    expect(page.locator("#log .line")).to_have_count(3)
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    shot(page, "task-finished")


def test_rotate_and_delete_ask_first(console, server):
    created, agent = online_agent(server, "doomed")
    page = console
    page.reload()
    row = page.locator("tr.node-row", has_text="doomed")
    page.once("dialog", lambda d: d.dismiss())
    row.get_by_role("button", name="Rotate token of doomed").click()
    expect(page.locator("#token-panel")).to_be_hidden()
    agent.connect()  # dismissed: the old token still works
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Rotate token of doomed").click()
    expect(page.locator("#token-value")).to_have_value(re.compile(r"^[A-Za-z0-9]{32}$"))
    with pytest.raises(requests.HTTPError):
        agent.connect()  # rotated: the old token is refused
    FakeAgent(server.url, page.locator("#token-value").input_value()).connect()
    page.get_by_role("button", name="Done").click()
    page.once("dialog", lambda d: d.accept())
    row.get_by_role("button", name="Delete doomed").click()
    expect(page.locator("tr.node-row", has_text="doomed")).to_have_count(0)
    assert server.admin().get(f"{server.url}/api/v1/agents/{created['id']}", timeout=10).status_code == 404


def test_long_log_of_an_ended_task_loads_and_keeps_the_newest_lines(console, server):
    created, agent = online_agent(server, "chatty", ["custom"])
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks",
            json={"agent_id": created["id"], "type": "custom", "image": "sly-test/busybox:latest"},
            timeout=10,
        )
        .json()
    )
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    agent.log(task["id"], *[f"line {i}" for i in range(5100)])
    agent.state(task["id"], "finished", exit_code=0)
    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#log-trimmed")).to_contain_text("100 earlier lines")
    expect(page.locator("#log .line")).to_have_count(5000)
    assert page.locator("#log .line").first.get_attribute("data-seq") == "100"
    assert page.locator("#log .line").last.inner_text().endswith("line 5099")


def test_telemetry_bars_on_the_nodes_page(console, server):
    gpus = [{"index": 0, "name": "Fake A100", "memory_total": 40 << 30, "memory_used": 10 << 30, "utilization": 55}]
    created, agent = online_agent(server, "reporter", gpus=gpus)
    for i in range(5):
        agent.telemetry(
            cpu=10 + 15 * i, mem=30 + i, disk=40, gpus=[dict(gpus[0], utilization=20 * i, memory_used=(8 + i) << 30)]
        )
    page = console
    page.reload()
    row = page.locator("tr.node-row", has_text="reporter")
    expect(row.locator(".cpu .bar")).to_have_attribute("data-pct", "70.0")
    expect(row.locator(".gpu .bar")).to_have_attribute("data-pct", "80.0")
    expect(row.locator(".disk .usage-tag")).to_have_attribute("title", "/data")
    row.get_by_role("link", name="reporter").click()
    page.wait_for_url(f"**/nodes/{created['id']}")
    expect(page.locator("#sysinfo")).to_contain_text("fake-node")
    expect(page.locator("#chart-cpu")).to_have_attribute("data-points", "5")  # charts: test_console_charts.py


def test_upload_folder_as_project_and_model(console, server, tmp_path):
    root = tmp_path / "cats"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    files = {"train/a.jpg": b"A" * 300_000, "train/b.jpg": b"B" * 1000, "val/c.jpg": b"C" * 10, "meta.json": b"{}"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    page = console
    page.goto(server.url + "/projects")
    page.get_by_label("Folder", exact=True).set_input_files(root)
    page.get_by_label("Name", exact=True).fill("cats-upload")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#up-status")).to_contain_text("Uploaded project")
    assert page.locator("#up-progress").get_attribute("value") == page.locator("#up-progress").get_attribute("max")
    row = page.locator("#items tr", has_text="cats-upload")
    expect(row).to_have_count(1)

    projects = server.admin().get(server.url + "/api/v1/projects", timeout=10).json()["items"]
    pid = [p for p in projects if p["name"] == "cats-upload"][0]["id"]
    items = server.admin().get(f"{server.url}/api/v1/projects/{pid}/items", params={"limit": 5000}, timeout=10).json()
    assert items["next"] is None
    got = {f"{i['dataset']}/{i['name']}": (i["sha256"], i["size"]) for i in items["items"]}
    want = {("ds0/" + k if "/" not in k else k): (hashlib.sha256(v).hexdigest(), len(v)) for k, v in files.items()}
    assert got == want

    row.get_by_text("Files").click()
    link = row.get_by_role("link", name="train/a.jpg")
    href = link.get_attribute("href")
    assert page.request.get(server.url + href).body() == files["train/a.jpg"]  # download with the session cookie
    shot(page, "projects")

    page.goto(server.url + "/models")
    page.get_by_label("Folder", exact=True).set_input_files(root / "train")
    page.get_by_label("Name", exact=True).fill("cats-weights")
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#up-status")).to_contain_text("Uploaded model")
    expect(page.locator("#items tr", has_text="cats-weights")).to_contain_text("2 files")
    shot(page, "models")


def test_sha256_fallback_matches_hashlib(console):
    """The plain-JS SHA-256 used where WebCrypto is absent (plain http on a LAN) is right."""
    for n in (0, 3, 55, 56, 64, 1000, 70_000):
        data = bytes((i * 7 + 3) % 256 for i in range(n))
        js = console.evaluate("(a) => SLY._sha256js(new Uint8Array(a))", list(data))
        assert js == hashlib.sha256(data).hexdigest(), n


def test_pages_are_served_without_session_only_as_redirects(server):
    r = requests.get(server.url + "/nodes", allow_redirects=False, timeout=10)
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2Fnodes"  # and back after it
    r = requests.get(server.url + "/console/static/console.js", timeout=10)
    assert r.status_code == 200 and "SLY" in r.text
    assert requests.get(server.url + "/console/static/nope.py", timeout=10).status_code == 404


def test_every_field_is_labelled_and_adding_a_node_works_from_the_keyboard(console, server):
    page = console
    unlabelled = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.outerHTML)"""
    for path in ("/nodes", "/tasks", "/projects", "/models"):
        page.goto(server.url + path)
        assert page.evaluate(unlabelled) == [], path

    page.goto(server.url + "/nodes")
    page.get_by_role("button", name="Add node").focus()
    page.keyboard.press("Enter")  # opens the form with the name field focused
    expect(page.locator("#add-name")).to_be_focused()
    page.keyboard.type("keyboard-node")
    page.keyboard.press("Enter")  # submits
    expect(page.locator("#token-value")).to_have_value(re.compile(r"^[A-Za-z0-9]{32}$"))
    expect(page.locator("#token-panel button").first).to_be_focused()


def test_nodes_page_says_why_a_node_takes_no_tasks(console, server):
    created, agent = online_agent(server, "full-disk")
    agent.poll(free_slots=0, refusing="not enough disk: 120 MB free under /data, 2048 MB required (MIN_FREE_DISK_MB)")
    console.reload()
    row = console.locator("tr.node-row", has_text="full-disk")
    expect(row.locator(".refusing")).to_contain_text("Takes no tasks: not enough disk: 120 MB free")
    agent.poll(free_slots=2)  # space is back: the note goes
    console.reload()
    expect(console.locator("tr.node-row", has_text="full-disk").locator(".refusing")).to_have_count(0)
