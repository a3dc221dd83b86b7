"""A page on another port of the same host (same site, other origin) auto-submits forms to the
server while the browser holds a console session: refused, and the console keeps working."""

from __future__ import annotations

import http.server
import threading

import pytest

from tests.browser.conftest import online_agent
from tests.support.procs import free_port

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api").expect


def _evil_site(html: str):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_forms_from_another_port_cannot_rotate_a_token_or_stop_a_task(console, server):
    created, agent = online_agent(server, "csrf-target")
    task = (
        server.admin()
        .post(
            server.url + "/api/v1/tasks", json={"agent_id": created["id"], "type": "custom", "image": "x:1"}, timeout=10
        )
        .json()
    )
    forms = "".join(
        f'<iframe name="f{i}"></iframe><form id="form{i}" target="f{i}" method="POST" action="{server.url}{path}">'
        f'<input name="x" value="1"></form>'
        for i, path in enumerate([f"/api/v1/agents/{created['id']}/token", f"/api/v1/tasks/{task['id']}/stop"])
    )
    evil = _evil_site(f"<html><body>{forms}<script>for (const f of document.forms) f.submit();</script></body></html>")
    try:
        attacker = console.context.new_page()
        answers = []
        attacker.on("response", lambda r: answers.append((r.url, r.status)) if "/api/v1/" in r.url else None)
        attacker.goto(f"http://127.0.0.1:{evil.server_address[1]}/")
        for _ in range(150):  # poll (15 s at most) for both form answers
            if len(answers) >= 2:
                break
            attacker.wait_for_timeout(100)
        assert sorted(s for _, s in answers) == [403, 403], answers
        attacker.close()
    finally:
        evil.shutdown()
        evil.server_close()
    assert agent.poll()["tasks"][0]["id"] == task["id"]  # the old token works; the task was not stopped
    # The console's own writes still go through (same-origin fetch with the cookie).
    renamed = console.evaluate("(id) => SLY.api('PATCH', '/api/v1/agents/' + id, {name: 'still-works'})", created["id"])
    assert renamed["name"] == "still-works"
    stopped = console.evaluate("(id) => SLY.api('POST', '/api/v1/tasks/' + id + '/stop')", task["id"])
    assert stopped["stop_requested"] is True
