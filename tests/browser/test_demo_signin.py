"""The demo's welcome, in a browser: the printed one-time link opens the nodes page, once."""

from __future__ import annotations

import re
import signal

import pytest

from tests.deploy.test_demo import DemoRun
from tests.support.procs import free_port

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]


@pytest.mark.slow
def test_the_printed_link_signs_in_to_the_nodes_page_once(browser, docker_client, tmp_path):
    from playwright.sync_api import expect

    run = DemoRun(tmp_path / "demo-data", free_port())
    try:
        link = run.wait_line(r"sign in once with this link.*: (http://\S+/signin/\S+)", timeout=120).group(1)
        run.wait_line(r"node demo-node \(id \d+\)", timeout=120)
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.goto(link)
        page.wait_for_url("**/nodes")
        expect(page.get_by_text("demo-node")).to_be_visible()
        assert any(c["name"] == "sly_session" and c["httpOnly"] for c in ctx.cookies())
        ctx.close()
        # The same link again, in another browser: spent, so the sign-in form.
        other = browser.new_context()
        page = other.new_page()
        page.goto(link)
        page.wait_for_url(re.compile(r"/signin\?link=spent$"))
        expect(page.get_by_label("Admin token")).to_be_visible()
        expect(page.locator("#signin-link-spent")).to_contain_text("was used or has expired")
        assert not other.cookies()
        other.close()
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(timeout=120) == 0, run.out[-3000:]
    finally:
        run.stop()
