"""The console's daily flows (issue 25): checkpoints without an epoch, structured log lines,
a task's full details and Clone, outages, sign-in back to the page followed, the gallery's
place in the URL, 404s, progress only for a task that ran, Esc on panels."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from client.api import UserClient
from tests.browser.conftest import create_task as _task
from tests.browser.conftest import online_agent

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


def test_checkpoints_without_an_epoch_are_all_listed_on_the_model_page(console, server):
    created, agent = online_agent(server, "ck-no-epoch", ["train"])
    task = _task(server, created["id"], type="train", image="sly-test/busybox:latest")
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    ids = []
    for i in range(4):  # what the agent posts for a CHECKPOINT event without epoch or metrics
        w = f"weights {i}".encode()
        body = {
            "kind": "model",
            "name": f"ck {i}",
            "files": [{"path": "w.bin", "sha256": agent.upload(w), "size": len(w)}],
        }
        ids.append(agent.post(f"/agent/v1/tasks/{task['id']}/results", dict(body, checkpoint={})).json()["id"])
    agent.state(task["id"], "finished", exit_code=0)
    results = server.admin().get(f"{server.url}/api/v1/tasks/{task['id']}", timeout=10).json()["results"]
    assert results["checkpoints"] == ids and results["model_id"] == ids[-1]

    page = console
    page.goto(f"{server.url}/models/{ids[-1]}")
    expect(page.locator("#m-ck-note")).to_have_text(f"saved by task #{task['id']}, 4 in all")
    rows = page.locator("#m-checkpoints tbody tr")
    expect(rows).to_have_count(4)
    assert rows.locator("td.epoch").all_text_contents() == ["—"] * 4
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#t-model")).to_have_text("ck 3")  # results by name, not "#id"
    expect(page.locator("#t-checkpoints a")).to_have_text(["ck 0", "ck 1", "ck 2"])


def test_structured_log_lines_read_as_the_cli_prints_them(console, server):
    created, agent = online_agent(server, "structured", ["train"])
    task = _task(server, created["id"], type="train", image="sly-test/busybox:latest")
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    agent.log(
        task["id"],
        "plain words",
        {"message": "progress", "event_type": "EventType.PROGRESS", "subtask": "Epochs", "current": 2, "total": 5},
        {
            "message": "metrics",
            "event_type": "metrics",
            "type": "train",
            "epoch": 1,
            "metrics": {"loss": 0.6, "acc": 0.8},
        },
        {
            "message": "checkpoint",
            "event_type": "EventType.CHECKPOINT",
            "subdir": "00000001",
            "sizeb": 18,
            "best_now": True,
            "optional": {"epoch": 1},
        },
    )
    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    lines = page.locator("#log .line")
    expect(lines).to_have_count(4)
    expect(lines.nth(0)).to_contain_text("plain words")
    expect(lines.nth(1)).to_contain_text("Epochs [" + "#" * 12 + "." * 18 + "] 2/5")
    expect(lines.nth(2)).to_contain_text("metrics train epoch 1: loss 0.6 acc 0.8")
    expect(lines.nth(3)).to_contain_text("checkpoint 00000001 (18 bytes), epoch 1 (best)")
    expect(page.locator("#log .line.ev")).to_have_count(3)


def test_task_page_shows_what_ran_and_clone_fills_the_form(console, server):
    created, agent = online_agent(server, "cloner", ["train", "custom"])
    client = UserClient(server.url, server.admin_token)
    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, format="PNG")
    item = {"name": "a.png", "sha256": client.upload_bytes(buf.getvalue()), "size": len(buf.getvalue())}
    project = client.create_project("clone-input", [{"name": "ds", "items": [item]}], meta={"classes": [], "tags": []})
    w = b"base weights"
    model = client.create_model("clone-base", [{"path": "w.bin", "sha256": client.upload_bytes(w), "size": len(w)}])
    config = {"epochs": 3, "nested": {"lr": 0.01}}
    task = _task(
        server,
        created["id"],
        type="train",
        image="registry.local/train:7",
        command=["python", "train.py", "--name", "two words"],
        project_id=project["id"],
        model_id=model["id"],
        config=config,
        resources={"gpus": 0, "cpus": 2, "memory": "2g"},
        timeout_s=3600,
    )
    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#t-command")).to_have_text("python train.py --name 'two words'")
    expect(page.locator("#t-in-project a")).to_have_text("clone-input")
    expect(page.locator("#t-in-project a")).to_have_attribute("href", f"/projects/{project['id']}")
    expect(page.locator("#t-in-model a")).to_have_text("clone-base")
    expect(page.locator("#t-resources")).to_have_text("0 GPUs, 2 CPUs, memory 2g")
    expect(page.locator("#t-timeout")).to_have_text("1h 0m")
    expect(page.locator("#t-config")).to_be_hidden()  # folded until asked for
    page.locator("#t-config-box summary").click()
    assert json.loads(page.locator("#t-config").inner_text()) == config
    expect(page.locator("#t-chain")).to_be_hidden()  # no retry policy, no resume chain

    page.get_by_role("link", name="Clone / Re-run").click()
    page.wait_for_url(f"**/tasks?clone={task['id']}")
    form = page.locator("#task-form")
    expect(page.locator("#clone-note")).to_contain_text(f"Cloned from task #{task['id']}")
    expect(form.get_by_label("Type")).to_have_value("train")
    expect(form.get_by_label("Node")).to_have_value(str(created["id"]))
    expect(form.get_by_label("Image")).to_have_value("registry.local/train:7")
    expect(form.get_by_label("Command")).to_have_value("python train.py --name 'two words'")
    expect(form.get_by_label("Project")).to_have_value(str(project["id"]))
    expect(form.get_by_label("Model")).to_have_value(str(model["id"]))
    expect(form.get_by_label("CPUs")).to_have_value("2")
    expect(form.get_by_label("Memory", exact=True)).to_have_value("2g")
    expect(form.get_by_label("Timeout (s)")).to_have_value("3600")
    assert json.loads(form.get_by_label("Config (JSON)").input_value()) == config
    # images used before are suggested
    assert "registry.local/train:7" in page.eval_on_selector_all("#nt-images option", "os => os.map(o => o.value)")
    form.get_by_role("button", name="Start task").click()
    page.wait_for_url(re.compile(r".*/tasks/\d+$"))
    again = server.admin().get(f"{server.url}/api/v1/tasks/{page.url.rsplit('/', 1)[1]}", timeout=10).json()
    assert again["id"] != task["id"]
    for k in ("type", "agent_id", "image", "command", "project_id", "model_id", "config", "timeout_s"):
        assert again[k] == task[k], k  # the command stays a list: the same words


def test_resume_chain_links_show_when_present(console, server):
    created, agent = online_agent(server, "chain-node", ["custom"])
    task = _task(server, created["id"], type="custom", image="x:1")
    console.route(
        f"**/api/v1/tasks/{task['id']}",
        lambda route: route.fulfill(
            json=dict(
                route.fetch().json(),
                retry={"max": 2, "agent_ids": [created["id"]], "attempt": 1},
                resumed_from=task["id"] - 1 if task["id"] > 1 else 0,
                continued_by=task["id"] + 1000,
            )
        ),
    )
    console.goto(f"{server.url}/tasks/{task['id']}")
    expect(console.locator("#t-retry")).to_contain_text("retry on loss: attempt 1 of 2")
    expect(console.locator("#t-continued-by")).to_have_attribute("href", f"/tasks/{task['id'] + 1000}")
    expect(console.locator("#t-resumed-from")).to_be_visible()


def test_a_task_that_never_ran_has_no_progress_bar_and_unknown_pages_are_404(console, server):
    created, agent = online_agent(server, "pull-fails", ["custom"])
    task = _task(server, created["id"], type="custom", image="nope/missing:1")
    agent.poll_until("tasks")
    agent.state(task["id"], "preparing", progress={"current": 14, "total": 14})  # the download count
    agent.state(task["id"], "failed", error="could not pull nope/missing:1")
    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#t-progress-text")).to_have_text("none: the task never ran")
    expect(page.locator("#t-progress")).to_be_hidden()
    page.goto(f"{server.url}/tasks?agent_id={created['id']}")
    row = page.locator(f"tr.task-row[data-id='{task['id']}']")
    expect(row.locator("td.progress")).to_have_text("never ran")
    expect(row.locator("progress")).to_have_count(0)

    streams = []
    page.on("request", lambda r: streams.append(r.url) if "/logs" in r.url else None)
    page.goto(f"{server.url}/tasks/999999")
    expect(page.locator("#notfound")).to_contain_text("Task 999999 does not exist")
    expect(page.locator("#t-progress")).to_have_count(0)
    assert not streams, "no log stream for a task that does not exist"
    for path in ("/nope", "/tasks/abc"):
        r = page.goto(server.url + path)
        assert r.status == 404 and r.headers["content-type"].startswith("text/html")
        expect(page.locator("#notfound")).to_contain_text("404")
    assert page.request.get(server.url + "/api/v1/nope").json()["error"] == "not_found"  # the API keeps JSON


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_an_outage_shows_one_notice_that_clears_and_times_keep_counting(console, server):
    online_agent(server, "outage-node")
    page = console
    page.reload()
    seen = page.locator("tr.node-row", has_text="outage-node").locator("time.seen")
    expect(seen).to_be_visible()
    page.route("**/api/v1/**", lambda route: route.abort())  # the server is gone
    notice = page.locator("#conn")
    expect(notice).to_have_text("Connection lost, reconnecting…", timeout=15_000)
    expect(page.locator("#flash")).to_be_hidden()  # no red "Failed to fetch" besides it
    before = seen.inner_text()
    expect(seen).not_to_have_text(before)  # the time goes on counting while nothing answers
    page.unroute("**/api/v1/**")
    expect(notice).to_be_hidden(timeout=15_000)
    expect(page.locator("#flash")).to_be_hidden()


def test_sign_in_returns_to_the_page_followed_and_a_spent_link_says_so(page, server):
    page.goto(f"{server.url}/tasks?state=running")
    page.wait_for_url(re.compile(r"/signin\?next="))
    page.get_by_label("Admin token").fill(server.admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/tasks\?state=running$"))
    # only a path of this server: elsewhere goes to the nodes page
    page.goto("about:blank")  # no page script left to answer a 401 with its own redirect
    page.context.clear_cookies()
    page.goto(f"{server.url}/signin?next=//evil.example/x")
    page.get_by_label("Admin token").fill(server.admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/nodes")
    link = server.admin().post(server.url + "/api/v1/session/links", timeout=10).json()["path"]
    page.goto(server.url + link)
    page.wait_for_url("**/nodes")
    page.goto("about:blank")  # no page script left to answer a 401 with its own redirect
    page.context.clear_cookies()
    page.goto(server.url + link)
    page.wait_for_url(re.compile(r"/signin\?link=spent$"))
    expect(page.locator("#signin-link-spent")).to_contain_text("This sign-in link was used or has expired")
    page.goto(f"{server.url}/signin")
    expect(page.locator("#signin-link-spent")).to_be_hidden()


def test_gallery_page_and_open_image_are_in_the_url(console, server):
    client = UserClient(server.url, server.admin_token)
    refs = []
    for i in range(60):
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (i * 4, 80, 120)).save(buf, format="PNG")
        refs.append(
            {"name": f"im{i:03d}.png", "sha256": client.upload_bytes(buf.getvalue()), "size": len(buf.getvalue())}
        )
    p = client.create_project("paged", [{"name": "ds", "items": refs}], meta={"classes": [], "tags": []})
    page = console
    page.goto(f"{server.url}/projects/{p['id']}")
    expect(page.locator("#gallery li.tile")).to_have_count(48)
    # the viewer goes on past the page: 48 of 60 continues to 49
    page.locator("#gallery li.tile").nth(47).locator("button.open").click()
    expect(page.locator("#v-pos")).to_have_text("48 of 60")
    page.wait_for_url(lambda u: "image=" in u)
    page.locator("#v-next").click()
    expect(page.locator("#v-pos")).to_have_text("49 of 60")
    expect(page.locator("#v-title")).to_have_text("im048.png")
    expect(page.locator("#gallery li.tile")).to_have_count(12)
    page.wait_for_url(lambda u: bool(re.search(r"[?&]page=2(&|$)", u)) and "image=" in u)
    # a reload keeps the page and the open image
    page.reload()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#v-title")).to_have_text("im048.png")
    expect(page.locator("#g-range")).to_have_text("49–60 of 60")
    # back steps over the page's start, to the previous page's last image
    page.locator("#v-prev").click()
    expect(page.locator("#v-title")).to_have_text("im047.png")
    expect(page.locator("#g-range")).to_have_text("1–48 of 60")
    page.locator("#v-next").click()
    expect(page.locator("#v-title")).to_have_text("im048.png")
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    # the viewer's history entry is left (Back, async), and the URL says the page shown
    page.wait_for_url(lambda u: "image=" not in u and bool(re.search(r"[?&]page=2(&|$)", u)))
    # Back with the viewer open closes it and stays on the project
    page.locator("#gallery li.tile").nth(3).locator("button.open").click()
    expect(page.locator("#v-title")).to_have_text("im051.png")
    page.go_back()
    expect(page.locator("#viewer")).to_be_hidden()
    page.wait_for_url(lambda u: "image=" not in u and f"/projects/{p['id']}?" in u)
    expect(page.locator("#g-range")).to_have_text("49–60 of 60")


def test_esc_closes_node_panels_and_a_gpu_less_fleet_hides_gpus_free(console, server):
    page = console
    page.goto(server.url + "/nodes")
    page.get_by_role("button", name="Add node").click()
    expect(page.locator("#add-panel")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#add-panel")).to_be_hidden()
    summary = server.admin().get(server.url + "/api/v1/agents", timeout=10).json()["summary"]
    gpus = page.locator("#sum-gpus").locator("xpath=..")
    if summary["gpus_total"]:
        expect(gpus).to_be_visible()
    else:
        expect(gpus).to_be_hidden()
