"""Playwright driving Debian's Chromium (headless) against the real server subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.fake_agent import FakeAgent

# Where shot() writes: a temporary dir, unless SLY_SCREENSHOTS names one (`./run.sh screenshots`
# points it at docs/screenshots/), so a test run never rewrites the committed images.
SCREENSHOTS_ENV = "SLY_SCREENSHOTS"
_screenshots: Path | None = None
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session", autouse=True)
def screenshots_dir(tmp_path_factory) -> Path:
    global _screenshots
    _screenshots = (
        Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else tmp_path_factory.mktemp("screenshots")
    )
    return _screenshots


@pytest.fixture(scope="session")
def browser(chromium_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect.set_options(timeout=15_000)  # CI shares 2 cores with Docker and other suites
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    ctx.set_default_timeout(15_000)
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # A Content-Security-Policy refusal means a page needs something the policy forbids.
    pg.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, server) -> None:
    page.goto(server.url + "/signin")
    page.get_by_label("Admin token").fill(server.admin_token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/nodes")


@pytest.fixture
def console(page, server):
    """A page signed in to the console."""
    sign_in(page, server)
    return page


def shot(page, name: str) -> None:
    """Screenshot of the page as <name>.png in the screenshot dir (see SCREENSHOTS_ENV)."""
    assert _screenshots is not None, "the screenshots_dir fixture sets the dir"
    _screenshots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(_screenshots / f"{name}.png"), full_page=True)


def online_agent(server, name: str, types: list[str] | None = None, **system_info) -> tuple[dict, FakeAgent]:
    """Create an agent through the user API and connect a fake agent with its token."""
    body = {"name": name}
    if types is not None:
        body["allowed_task_types"] = types
    r = server.admin().post(server.url + "/api/v1/agents", json=body, timeout=10)
    r.raise_for_status()
    created = r.json()
    agent = FakeAgent(server.url, created["token"], created["id"])
    agent.connect(**system_info)
    return created, agent


def create_task(server, agent_id: int, **body) -> dict:
    """POST /api/v1/tasks as the admin (the body as given); the task."""
    r = server.admin().post(server.url + "/api/v1/tasks", json={"agent_id": agent_id, **body}, timeout=10)
    r.raise_for_status()
    return r.json()
