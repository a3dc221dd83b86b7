"""The console's retention controls: deleting a final task from its page, "deleted node", the
nodes page's pages of rows and its summary from the server."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import online_agent, sign_in
from tests.support.fake_agent import FakeAgent
from tests.support.server import ServerProcess


@pytest.mark.slow
def test_task_page_deletes_a_final_task_and_names_a_deleted_node(console, server):
    created, agent = online_agent(server, "short-lived", ["custom"])
    admin = server.admin()
    task = admin.post(
        server.url + "/api/v1/tasks", json={"agent_id": created["id"], "type": "custom", "image": "x:1"}, timeout=10
    ).json()
    agent.poll_until("tasks")
    agent.state(task["id"], "running")
    agent.log(task["id"], "hello")
    page = console
    page.goto(f"{server.url}/tasks/{task['id']}")
    expect(page.locator("#t-stop")).to_be_visible()
    expect(page.locator("#t-delete")).to_be_hidden()  # not final: no Delete
    agent.state(task["id"], "finished", exit_code=0)
    assert admin.delete(f"{server.url}/api/v1/agents/{created['id']}", timeout=10).json()["kept_tasks"] == 1
    page.reload()
    expect(page.locator("#t-node")).to_have_text("deleted node")
    expect(page.locator("#t-delete")).to_be_visible()
    page.goto(f"{server.url}/tasks")
    expect(page.locator(f"tr[data-id='{task['id']}']")).to_contain_text("deleted node")

    page.goto(f"{server.url}/tasks/{task['id']}")
    page.once("dialog", lambda d: d.accept())
    page.locator("#t-delete").click()
    expect(page.locator("#flash")).to_contain_text(f"Deleted task {task['id']}")
    page.wait_for_url("**/tasks")
    assert admin.get(f"{server.url}/api/v1/tasks/{task['id']}", timeout=10).status_code == 404


@pytest.mark.slow
def test_nodes_page_shows_the_server_summary_and_pages_of_100(page, tmp_path):
    srv = ServerProcess(tmp_path / "data").start()  # its own: 120 nodes would crowd the shared one
    try:
        admin = srv.admin()
        for i in range(120):
            admin.post(srv.url + "/api/v1/agents", json={"name": f"bulk-{i:03d}"}, timeout=10).raise_for_status()
        online = admin.post(srv.url + "/api/v1/agents", json={"name": "zz-online"}, timeout=10).json()
        FakeAgent(srv.url, online["token"]).connect()
        sign_in(page, srv)
        expect(page.locator("tr.node-row")).to_have_count(100)
        expect(page.locator("#sum-offline")).to_have_text("120")
        expect(page.locator("#sum-online")).to_have_text("1")
        expect(page.locator("#nodes-range")).to_have_text("1–100 of 121")
        page.get_by_role("button", name="Next").click()
        expect(page.locator("tr.node-row")).to_have_count(21)
        expect(page.locator("#nodes-range")).to_have_text("101–121 of 121")
        expect(page.locator("tr.node-row", has_text="zz-online")).to_have_attribute("data-status", "online")
        expect(page.get_by_role("button", name="Next")).to_be_disabled()
        page.get_by_role("button", name="Previous").click()
        expect(page.locator("tr.node-row")).to_have_count(100)
    finally:
        srv.close()
