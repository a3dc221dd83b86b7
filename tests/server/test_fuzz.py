"""Schema fuzzing: every operation of /openapi.json, fed by schemathesis, against a real server.

Both kinds of credentials are sent (the admin Bearer for /api, a node's x-token for /agent), so
the requests get past authentication and reach the routes. Checks: no 5xx on any operation, and
every answer conforms to the schema (its status code declared, its body matching the declared
schema and content type). Examples are bounded and derandomized, so a run is repeatable and takes
a few minutes at most; a failure prints the request that caused it.
"""

from __future__ import annotations

import hashlib
import re

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.server import ServerProcess  # noqa: E402

# The bulk blob upload's body is a tar stream (application/x-tar): sent as the bytes generated.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EXAMPLES = 25  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Long-polls and streams would only wait: the fuzzer asks for no waiting and no following.
FIXED_QUERY = {"/agent/v1/poll": {"wait": 0}, "/api/v1/tasks/{task_id}/logs": {"follow": False}}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data").start()
    yield srv
    srv.stop()


def _fresh_objects(srv) -> dict:
    """A node (the fuzzer may rotate or delete the previous one) with a task leased to it, a
    project and a model over one blob: real ids for the path parameters."""
    s = srv.admin()
    agent = s.post(srv.url + "/api/v1/agents", json={"name": "fuzzed"}, timeout=10).json()
    data = b"fuzz"
    sha = hashlib.sha256(data).hexdigest()
    s.put(srv.url + "/api/v1/blobs/" + sha, data=data, timeout=10).raise_for_status()
    project = s.post(
        srv.url + "/api/v1/projects",
        json={"name": "p", "datasets": [{"name": "ds", "items": [{"name": "a.jpg", "sha256": sha, "size": 4}]}]},
        timeout=10,
    ).json()
    model = s.post(
        srv.url + "/api/v1/models",
        json={"name": "m", "files": [{"path": "w.bin", "sha256": sha, "size": 4}]},
        timeout=10,
    ).json()
    task = s.post(
        srv.url + "/api/v1/tasks", json={"agent_id": agent["id"], "type": "custom", "image": "img"}, timeout=10
    ).json()
    requests.post(
        srv.url + "/agent/v1/poll", json={"free_slots": 1}, headers={"x-token": agent["token"]}, timeout=10
    ).raise_for_status()
    return {
        "token": agent["token"],
        "agent_id": agent["id"],
        "task_id": task["id"],
        "project_id": project["id"],
        "model_id": model["id"],
        "sha256": sha,
    }


def test_every_operation_survives_fuzzing(fuzz_server):
    srv = fuzz_server
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    session = requests.Session()
    ops = [result.ok() for result in schemathesis.openapi.from_url(srv.url + "/openapi.json").get_all_operations()]
    assert len(ops) >= 20, [op.label for op in ops]
    # Sign-in last: its wrong tokens make the server throttle this address (429 for every admin
    # request from it, the right token too), which would stop the operations after it.
    ops.sort(key=lambda op: (op.method.upper(), op.path) == ("POST", "/api/v1/session"))

    def fuzzer(op, strategy, headers):
        """A Hypothesis test: send each request that `strategy` makes for `op`, check the answer."""

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case):
            response = case.call(base_url=srv.url, session=session, headers=headers, timeout=30)
            statuses.setdefault(op.label, set()).add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        return run

    for op in ops:
        objects = _fresh_objects(srv)
        headers = (
            {"x-token": objects["token"]}
            if op.path.startswith("/agent/")
            else {"authorization": f"Bearer {srv.admin_token}"}
        )
        names = re.findall(r"\{(\w+)\}", op.path)
        runs = [(schemathesis.GenerationMode.POSITIVE, None), (schemathesis.GenerationMode.NEGATIVE, None)]
        if names:  # and with the path pointing at real objects, so the bodies reach the route's logic
            runs.append((schemathesis.GenerationMode.POSITIVE, {n: objects[n] for n in names}))
        for mode, path_parameters in runs:
            strategy = op.as_strategy(
                generation_mode=mode, query=FIXED_QUERY.get(op.path), path_parameters=path_parameters
            )
            run = fuzzer(op, strategy, headers)
            try:
                run()
            except Unsatisfiable:
                pass  # nothing in this operation can be made invalid (no parameters, or free strings)
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collect every operation's failure
                where = f" at {path_parameters}" if path_parameters else ""
                failures.append(f"{op.label} [{mode.value}{where}]: {type(e).__name__}: {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # The credentials worked: no operation saw only 401s (then the fuzzing would prove nothing).
    assert not [label for label, seen in statuses.items() if seen == {401}], statuses
    assert sum(1 for seen in statuses.values() if any(200 <= s < 300 for s in seen)) >= len(ops) // 2, statuses
    assert requests.get(srv.url + "/healthz", timeout=10).json() == {"ok": True}
