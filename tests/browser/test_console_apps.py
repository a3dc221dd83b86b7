"""The console side of Apps (issue 22): the `app` task form (project, dataset, modal-state JSON), a
task's output as a link, and the team files browser."""

from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest
from PIL import Image

from client.api import UserClient
from tests.browser.conftest import online_agent, shot
from tests.support.apps import AppTask

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


def _project(server, name: str) -> dict:
    client = UserClient(server.url, server.admin_token)
    buf = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buf, format="PNG")
    item = {"name": "a.png", "sha256": client.upload_bytes(buf.getvalue()), "size": len(buf.getvalue())}
    client.create_project(name, [{"name": "train", "items": [item]}, {"name": "val", "items": [item]}], meta={})
    projects = server.admin().get(server.url + "/api/v1/projects?limit=1000", timeout=10).json()["items"]
    pid = next(p["id"] for p in projects if p["name"] == name)
    return server.admin().get(f"{server.url}/api/v1/projects/{pid}", timeout=10).json()


def _app(server, name: str) -> AppTask:
    """An app task on a new fake node, handed out and running: its API token is live."""
    created, agent = online_agent(server, name, ["app"])
    r = server.admin().post(
        server.url + "/api/v1/tasks",
        json={"agent_id": created["id"], "type": "app", "image": "sly-test/app:1"},
        timeout=10,
    )
    t = r.json()
    task = next(x for x in agent.poll_until("tasks") if x["id"] == t["id"])
    agent.state(t["id"], "running")
    return AppTask(server.url, t["id"], task["api_token"], agent, task)


def _upload(app: AppTask, files: list[tuple[str, bytes]]) -> list[dict]:
    """Team files as the SDK's api.file.upload sends them (name, folder, bytes per file)."""
    fields = []
    for dst, data in files:
        folder, name = dst.rsplit("/", 1)
        fields += [("name", (None, name)), ("path", (None, folder + "/")), ("file", (name, io.BytesIO(data)))]
    r = app.call("file-storage.bulk.upload?teamId=1", files=fields)
    assert r.status_code == 200, r.text
    return r.json()


def _set_output(app: AppTask, output: dict) -> None:
    r = app.call("tasks.output.set", {"taskId": app.task_id, "output": output})
    assert r.status_code == 200, r.text


def test_app_form_takes_project_dataset_and_a_checked_modal_state(console, server):
    created, agent = online_agent(server, "app-form-node", ["app"])
    project = _project(server, "app-form-project")
    val = next(d for d in project["datasets"] if d["name"] == "val")
    page = console
    page.goto(server.url + "/tasks")
    page.locator("#new-task summary").click()
    form = page.locator("#task-form")
    form.get_by_label("Type").select_option("app")
    form.get_by_label("Node").select_option(str(created["id"]))  # offered: online and allows app
    expect(page.locator("#nt-model-box")).to_be_hidden()  # an App has no input model
    expect(page.locator("#nt-config-label")).to_have_text("Modal state (JSON)")
    page.get_by_label("Image").fill("registry.local/export-app:1")
    page.get_by_label("Project").select_option(label=f"app-form-project (#{project['id']})")
    dataset = page.get_by_label("Dataset")
    expect(dataset.locator("option")).to_have_count(3)  # all, train, val
    dataset.select_option(label="val (1 images)")

    before = len(server.admin().get(server.url + "/api/v1/tasks?limit=1000", timeout=10).json()["items"])
    state = page.get_by_label("Modal state (JSON)")
    state.fill('{"format": "coco",')
    expect(page.locator("#nt-config-error")).to_contain_text("Modal state not valid JSON")
    expect(state).to_have_attribute("aria-invalid", "true")
    page.get_by_role("button", name="Start task").click()
    expect(page.locator("#task-form-error")).to_contain_text("not valid JSON")
    state.fill("[1, 2]")
    expect(page.locator("#nt-config-error")).to_contain_text("must be a JSON object")
    page.get_by_role("button", name="Start task").click()
    after = server.admin().get(server.url + "/api/v1/tasks?limit=1000", timeout=10).json()["items"]
    assert len(after) == before  # nothing was sent

    state.fill('{"format": "coco", "splits": {"val": true}}')
    expect(page.locator("#nt-config-error")).to_be_hidden()
    page.get_by_role("button", name="Start task").click()
    page.wait_for_url("**/tasks/*")
    tid = int(page.url.rsplit("/", 1)[1])
    task = server.admin().get(f"{server.url}/api/v1/tasks/{tid}", timeout=10).json()
    assert (task["type"], task["project_id"], task["dataset_id"]) == ("app", project["id"], val["id"])
    assert task["config"] == {"format": "coco", "splits": {"val": True}}
    expect(page.locator("#t-in-dataset")).to_have_text("val")
    expect(page.locator("#t-in-project a")).to_have_text("app-form-project")

    # Clone keeps the dataset
    page.goto(f"{server.url}/tasks?clone={tid}")
    expect(page.get_by_label("Dataset")).to_have_value(str(val["id"]))
    expect(page.get_by_label("Modal state (JSON)")).to_have_value(json.dumps(task["config"], indent=2))
    server.admin().post(f"{server.url}/api/v1/tasks/{tid}/stop", timeout=10)


@pytest.mark.slow
def test_output_links_and_the_team_files_browser(console, server):
    app = _app(server, "app-output-node")
    root = f"/exports/run-{app.task_id}"
    archive = b"PK\x03\x04 an archive " * 100
    infos = _upload(app, [(f"{root}/export.zip", archive), (f"{root}/logs/train.txt", b"epoch 1\n")])
    zip_id = next(i["id"] for i in infos if i["name"] == "export.zip")
    page = console
    page.set_viewport_size({"width": 1440, "height": 900})

    # a file: its download link (named as the file) and its folder in the browser
    _set_output(app, {"general": {"title": "export.zip", "titleUrl": f"/files/{zip_id}"}})
    page.goto(f"{server.url}/tasks/{app.task_id}")
    link = page.locator("#t-output-link")
    expect(link).to_have_text("export.zip")
    href = link.get_attribute("href")
    assert href == f"/api/v1/files/download?path={quote(root + '/export.zip', safe='')}"
    assert page.request.get(server.url + href).body() == archive
    expect(page.locator("#t-output a.hint")).to_have_attribute("href", f"/files?path={quote(root + '/', safe='')}")

    # a folder: a link to it in the team files browser
    _set_output(app, {"general": {"title": root + "/", "titleUrl": f"/files/{zip_id}", "description": "Directory"}})
    expect(page.locator("#t-output")).to_have_attribute("data-type", "directory", timeout=10_000)
    page.locator("#t-output-link").click()
    page.wait_for_url("**/files?path=*")
    crumbs = page.locator("#f-crumbs")
    expect(crumbs).to_contain_text(f"team files / exports / run-{app.task_id}")
    rows = page.locator("#f-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_have_attribute("data-path", f"{root}/export.zip")
    expect(rows.nth(1)).to_have_attribute("data-path", f"{root}/logs/")
    zip_row = rows.nth(0)
    expect(zip_row.locator("td.num")).to_have_text(f"{len(archive) / 1024:.1f} KiB")
    expect(zip_row.locator("td.task a")).to_have_attribute("href", f"/tasks/{app.task_id}")
    with page.expect_download() as dl:
        zip_row.get_by_role("link", name="Download export.zip").click()
    assert open(dl.value.path(), "rb").read() == archive
    shot(page, "files-1440")

    # into a sub-folder and back up by the breadcrumbs
    rows.nth(1).get_by_role("link").click()
    expect(page.locator("#f-table tbody tr")).to_have_count(1)
    expect(page.locator("#f-table tbody tr")).to_have_attribute("data-path", f"{root}/logs/train.txt")
    crumbs.get_by_role("link", name="exports").click()
    expect(page.locator(f"#f-table tbody tr[data-path='{root}/']")).to_have_count(1)
    page.set_viewport_size({"width": 390, "height": 800})
    page.goto(f"{server.url}/files?path={quote(root + '/', safe='')}")
    expect(page.locator("#f-table tbody tr")).to_have_count(2)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # the names are whole on a phone (wrapped, not cut to "ex…")
    name = page.locator("#f-table tbody tr td.name .trunc").first
    assert name.evaluate("e => e.scrollWidth <= e.clientWidth"), name.inner_text()
    shot(page, "files-390")
    page.goto(f"{server.url}/files?path=/no/such/folder/")
    expect(page.locator("#f-missing")).to_contain_text("No team file or folder /no/such/folder/")

    # a project: a link to its page, by name
    project = _project(server, "app-output-project")
    _set_output(app, {"project": {"id": project["id"]}})
    page.goto(f"{server.url}/tasks/{app.task_id}")
    expect(page.locator("#t-output-link")).to_have_text("app-output-project")
    expect(page.locator("#t-output-link")).to_have_attribute("href", f"/projects/{project['id']}")
    app.agent.state(app.task_id, "finished", exit_code=0)
