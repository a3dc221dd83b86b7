"""The console says why a queued task waits (a line under its state) and adds a GPU node with the
GPU form of the run command."""

from __future__ import annotations

import pytest

from tests.browser.conftest import online_agent

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


@pytest.mark.slow
def test_task_page_says_why_a_queued_task_waits(console, server):
    created, agent = online_agent(server, "waiting-node")
    agent.poll(free_slots=0, refusing="not enough disk: 120 MB free under /data, 2048 MB required (MIN_FREE_DISK_MB)")
    admin = server.admin()
    t = admin.post(
        server.url + "/api/v1/tasks", json={"agent_id": created["id"], "type": "custom", "image": "x:1"}
    ).json()
    console.goto(f"{server.url}/tasks/{t['id']}")
    line = console.locator("#t-waiting")
    expect(line).to_be_visible()
    expect(line).to_contain_text("Waiting: node waiting-node takes no task now: not enough disk")
    expect(line).to_have_attribute("data-reason", "node_refusing")
    agent.poll(free_slots=1)  # room again: the node takes the task, which no longer waits
    expect(console.locator("#t-state")).to_have_text("assigned", timeout=15_000)
    expect(line).to_be_hidden()


def test_adding_a_gpu_node_prints_the_gpu_run_command(console, server):
    page = console
    page.goto(server.url + "/nodes")
    page.get_by_role("button", name="Add node").click()
    page.locator("#add-panel").get_by_label("Name").fill("browser-gpu-node")
    page.locator("#add-panel").get_by_label("This node has GPUs").check()
    page.locator("#add-panel").get_by_role("button", name="Create").click()
    docker = page.locator('#run-commands pre.cmd[data-form="docker"]')
    expect(docker).to_contain_text("--network host --gpus all ")
    page.get_by_role("button", name="Done").click()
