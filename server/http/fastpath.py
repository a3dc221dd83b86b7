"""The telemetry POST's fast path: an ASGI layer that answers a well-formed sample from a known
node itself, before FastAPI's routing, dependency solving and response building.

Telemetry is most of what a fleet sends (every node every 5 s: 400 requests a second at 2,000
nodes), and what the server does with a sample is small (server/agents/contact.py keeps it for the next
batch). FastAPI's layers cost more than that work (docs/benchmarks.md, Fleet). This layer takes
only the ordinary case: a JSON object body (decoded and checked already by
`server.http.errors.BodyLimitMiddleware`, which hands it over in the scope) and an `x-token` of a
node. Anything else (no token, a token of no node, a body that is not a JSON object) goes on to
the FastAPI route (`server/telemetry/agent_router.py`), which gives the documented answer; both
store the sample with the same call (`server.telemetry.service.accept_sample`).
"""

from __future__ import annotations

from protocol import endpoints
from server.auth.service import hash_token
from server.telemetry.service import accept_sample

_TOKEN_HEADER = endpoints.AGENT_TOKEN_HEADER.lower().encode()
_OK_BODY = b'{"ok":true}'
_OK_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_OK_BODY)).encode())]


class TelemetryFastPath:
    """Answers a telemetry POST of a JSON object from a known node; passes everything else on."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != endpoints.TELEMETRY or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        sample = scope.get("sly.json")
        token = next((v for k, v in scope["headers"] if k == _TOKEN_HEADER), None)
        if not isinstance(sample, dict) or not token:
            return await self.app(scope, receive, send)
        try:
            h = hash_token(token.decode("ascii"))
        except UnicodeDecodeError:
            return await self.app(scope, receive, send)
        state = self.state
        agent = await state.agent_rows.get(h)
        if agent is None:
            return await self.app(scope, receive, send)
        state.contacts.seen(agent["id"])
        accept_sample(state, agent, sample)
        await send({"type": "http.response.start", "status": 200, "headers": _OK_HEADERS})
        await send({"type": "http.response.body", "body": _OK_BODY})
