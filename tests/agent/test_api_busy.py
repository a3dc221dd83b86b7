"""A results post waits out a server busy with the node's other project check, and only that."""

from __future__ import annotations

import pytest

from node import api as node_api
from protocol.errors import APIError


class _Answer:
    def json(self):
        return {"results": {}, "id": 7}


def _api(monkeypatch, failures):
    a = node_api.AgentAPI("http://127.0.0.1:9", "t" * 32)
    calls, slept = [], []

    def request(method, path, **kw):
        calls.append(path)
        if failures:
            raise failures.pop(0)
        return _Answer()

    monkeypatch.setattr(a, "request", request)
    monkeypatch.setattr(node_api.time, "sleep", slept.append)
    return a, calls, slept


def test_a_busy_server_is_asked_again_until_it_takes_the_results(monkeypatch):
    busy = [APIError(429, "too_many_checks", "one check per node"), APIError(503, "server_busy", "large bodies")]
    a, calls, slept = _api(monkeypatch, busy)
    assert a.post_results(3, "project", "p", [])["id"] == 7
    assert len(calls) == 3 and len(slept) == 2 and all(0 < s <= 30 for s in slept)


def test_other_refusals_and_a_server_busy_past_the_deadline_are_raised(monkeypatch):
    a, calls, slept = _api(monkeypatch, [APIError(413, "results_limit", "over")])
    with pytest.raises(APIError, match="results_limit"):
        a.post_results(3, "artifacts", "a", [])
    assert len(calls) == 1 and not slept
    monkeypatch.setattr(node_api, "RESULTS_BUSY_WAIT_S", 0.0)
    a, calls, slept = _api(monkeypatch, [APIError(429, "too_many_checks", "one check per node")])
    with pytest.raises(APIError, match="too_many_checks"):
        a.post_results(3, "project", "p", [])
    assert len(calls) == 1 and not slept
