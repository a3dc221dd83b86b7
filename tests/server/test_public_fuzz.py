"""Every public API method (server/public/registry.METHODS) against hostile bodies: extreme
numbers, wrong types, missing and unknown fields, huge lists and strings. No answer is a 500, every
refusal is in the SDK's error shape, and the server goes on serving the App.

The public API is left out of /openapi.json (the SDK's method names are not paths of ours), so the
schema-driven fuzzing of tests/server/test_fuzz.py does not reach it: this walks it instead.
"""

from __future__ import annotations

import pytest
import requests

from server.public import router as _router  # noqa: F401  (imports every method module)
from server.public.registry import METHODS
from tests.support.apps import start_app

pytestmark = pytest.mark.slow  # each method: about 500 bodies, 3-6 s

EXTREMES = [None, True, -1, 0, 2**31, 2**63, -(2**63), 1e308, float("-0"), "1", "", "x" * 10_000, [], {}, [1] * 20_000]
FIELDS = [
    "id",
    "ids",
    "projectId",
    "datasetId",
    "imageId",
    "teamId",
    "workspaceId",
    "taskId",
    "page",
    "per_page",
    "filter",
    "sort",
    "name",
    "path",
    "meta",
    "images",
    "annotations",
    "hashes",
    "output",
]


@pytest.fixture(scope="module")
def app(server):
    from client import UserClient
    from tests.support.fake_agent import FakeAgent

    client = UserClient(server.url, server.admin_token)

    def make_agent(name="node", types=None):
        a = client.create_agent(name, types)
        return FakeAgent(server.url, a["token"], a["id"])

    app = start_app(server, client, make_agent, name="public-fuzz")
    # About 500 bodies a method: sent on one keep-alive connection (the public API sets no cookie).
    app.session = requests.Session()
    yield app
    app.session.close()


# Lists of records the SDK sends, with a hostile value in each place of a record.
NESTED = {
    "filter": {"field": "id", "operator": "=", "value": 1},
    "images": {"title": "a.png", "hash": "A" * 43 + "=", "imageId": 1},
    "annotations": {"imageId": 1, "annotation": {"size": {"height": 1, "width": 1}, "objects": [], "tags": []}},
    "output": {"general": {"type": "project", "id": 1}},
}


def _bodies():
    yield {}
    yield {"unknown_field": 1}
    for field in FIELDS:
        for x in EXTREMES:
            yield {field: x}
    for field in ("ids", "hashes", "imageIds", "srcImageIds", "destImageIds"):
        for x in EXTREMES:
            yield {field: [x], "datasetId": 1, "projectId": 1}
    for field, record in NESTED.items():
        for key in record:
            for x in EXTREMES:
                yield {field: [{**record, key: x}], "id": 1, "datasetId": 1, "projectId": 1, "taskId": 1}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_hostile_bodies_never_break_a_method(app, method):
    verb = METHODS[method][0]
    bad = []
    for body in _bodies():
        if verb == "GET":
            params = {k: (v if isinstance(v, str) else repr(v))[:2000] for k, v in body.items()}
            r = app.get(method, params)
        else:
            r = app.call(method, body)
        if r.status_code >= 500:
            bad.append((body if len(repr(body)) < 200 else repr(body)[:200], r.status_code, r.text[:300]))
        elif r.status_code >= 400:
            err = r.json()
            assert isinstance(err.get("error"), str) and err["error"], (method, body, err)
    assert not bad, (method, bad[:5])
    # the App is still served
    assert app.call("instance.version", {}).status_code == 200
