"""App tasks for the public API tests: an `app` task handed to a fake node, and its API token.

app = start_app(server, client, make_agent)        # AppTask(task_id, token, agent, api)
r = app.call("projects.info", {"id": pid})          # POST /public/api/v3/projects.info
app.agent.state(app.task_id, "finished")            # ... and the token is dead
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from tests.support.fake_agent import FakeAgent

PUBLIC = "/public/api/v3/"


@dataclass
class AppTask:
    url: str
    task_id: int
    token: str
    agent: FakeAgent
    task: dict  # as the poll answer gave it
    # Where many calls are made: one keep-alive session for them all (else a connection per call).
    session: requests.Session | None = None

    def call(self, method: str, body: dict | None = None, *, token: str | None = None, **kw) -> requests.Response:
        """POST `method` with a JSON body (or requests' keywords: data=, files=, headers=)."""
        headers = {"x-api-key": self.token if token is None else token, **kw.pop("headers", {})}
        if body is not None:
            kw["json"] = body
        http = self.session or requests
        return http.post(self.url + PUBLIC + method, headers=headers, timeout=kw.pop("timeout", 30), **kw)

    def get(self, method: str, params: dict | None = None, **kw) -> requests.Response:
        headers = {"x-api-key": self.token, **kw.pop("headers", {})}
        http = self.session or requests
        return http.get(self.url + PUBLIC + method, params=params, headers=headers, timeout=30, **kw)

    def json(self, method: str, body: dict | None = None):
        r = self.call(method, body or {})
        assert r.status_code == 200, (method, r.status_code, r.text[:2000])
        return r.json()


def start_app(server, client, make_agent, *, project_id=None, dataset_id=None, config=None, name="apps") -> AppTask:
    """An `app` task on a new fake node, handed out by a poll and reported running: its token is live."""
    agent = make_agent(name, ["app"])
    agent.connect()
    t = client.create_task(
        agent.id, "app", image="sly-test/app:1", project_id=project_id, dataset_id=dataset_id, config=config
    )
    task = next(x for x in agent.poll_until("tasks") if x["id"] == t["id"])
    agent.state(t["id"], "running")
    return AppTask(server.url, t["id"], task["api_token"], agent, task)
