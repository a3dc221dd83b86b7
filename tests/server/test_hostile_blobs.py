"""A node may read only the blobs of its own tasks and its own uploads: neither an upload without
the bytes nor a result naming a blob makes another blob readable, and a forbidden blob is
answered exactly as a missing one (no size, no hint that it exists)."""

from __future__ import annotations

import hashlib
import json

from tests.support.fake_agent import FakeAgent


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put(agent: FakeAgent, sha: str, data: bytes):
    return agent.s.put(f"{agent.url}/agent/v1/blobs/{sha}", data=data, timeout=30)


def _get(agent: FakeAgent, sha: str) -> int:
    return agent.s.get(f"{agent.url}/agent/v1/blobs/{sha}", timeout=30).status_code


def _head(agent: FakeAgent, sha: str) -> int:
    return agent.s.head(f"{agent.url}/agent/v1/blobs/{sha}", timeout=30).status_code


def _running_task(client, agent: FakeAgent, ttype="custom", **kw) -> int:
    tid = client.create_task(agent.id, ttype, image="x:1", **kw)["id"]
    agent.poll()
    assert agent.state_raw(tid, "running").status_code == 200
    return tid


def _answer(r, *hashes: str) -> tuple[int, str]:
    """A refusal as a comparable text: the hashes it names blanked out."""
    text = r.text
    for i, h in enumerate(hashes):
        text = text.replace(h, f"<sha{i}>")
    return r.status_code, text


def test_an_upload_without_the_bytes_does_not_make_a_stored_blob_readable(client, make_agent):
    secret = b"another tenant's weights " * 100
    sha = client.upload_bytes(secret)
    never = _sha(b"a blob nobody stored")
    agent = make_agent("thief")
    for body in (b"", b"guess"):
        r = _put(agent, sha, body)
        assert r.status_code == 400 and r.json()["error"] == "hash_mismatch", r.text
        # ... exactly as for a blob that is not stored: the answer tells nothing of it
        assert _answer(r, sha) == _answer(_put(agent, never, body), never)
        assert _head(agent, sha) == _get(agent, sha) == 404
    # Sending the bytes themselves proves the agent holds them: then it may read them back.
    r = _put(agent, sha, secret)
    assert r.status_code == 200 and r.json() == {"sha256": sha, "size": len(secret), "created": False}
    assert _head(agent, sha) == _get(agent, sha) == 200


def test_results_name_only_blobs_the_node_may_read_and_a_forbidden_one_is_answered_as_missing(client, make_agent):
    secret = b"a blob of someone else"
    sha = client.upload_bytes(secret)
    never = _sha(b"not stored at all")
    agent = make_agent("namer")
    tid = _running_task(client, agent)
    url = f"/agent/v1/tasks/{tid}/results"
    bodies = [
        {"kind": "artifacts", "files": [{"path": "x.bin", "sha256": "{h}", "size": 1}]},  # a wrong size
        {"kind": "artifacts", "files": [{"path": "x.bin", "sha256": "{h}", "size": len(secret)}]},
        {"kind": "model", "files": [{"path": "w.bin", "sha256": "{h}", "size": 7}]},
        {"kind": "project", "files": [{"path": "ds/a.jpg", "sha256": "{h}", "size": 3}]},
        {"kind": "project", "datasets": [{"name": "ds", "items": [{"name": "a.jpg", "sha256": "{h}", "size": 3}]}]},
    ]
    for body in bodies:
        forbidden = agent.post_raw(url, json=_fill(body, sha))
        missing = agent.post_raw(url, json=_fill(body, never))
        assert forbidden.status_code == 400 and forbidden.json()["error"] == "missing_blobs", forbidden.text
        assert forbidden.json()["missing"] == [sha]
        assert str(len(secret)) not in forbidden.json()["detail"]
        assert _answer(forbidden, sha) == _answer(missing, never), body  # the same answer, word for word
        assert _head(agent, sha) == _get(agent, sha) == 404
    task = client.get_task(tid)
    assert (
        task["results"]["artifacts_count"] == 0
        and "model_id" not in task["results"]
        and "project_id" not in task["results"]
    )


def test_another_nodes_results_stay_out_of_reach(client, make_agent):
    owner, other = make_agent("owner"), make_agent("other")
    mine = _running_task(client, owner)
    data = b"owner's result"
    sha = _sha(data)
    assert _put(owner, sha, data).status_code == 200
    r = owner.post_raw(
        f"/agent/v1/tasks/{mine}/results",
        json={"kind": "artifacts", "files": [{"path": "out.txt", "sha256": sha, "size": len(data)}]},
    )
    assert r.status_code == 200, r.text
    theirs = _running_task(client, other)
    r = other.post_raw(
        f"/agent/v1/tasks/{theirs}/results",
        json={"kind": "artifacts", "files": [{"path": "stolen.txt", "sha256": sha, "size": len(data)}]},
    )
    assert r.status_code == 400 and r.json()["error"] == "missing_blobs"
    assert _get(other, sha) == 404 and _get(owner, sha) == 200


def test_results_may_name_the_blobs_of_the_tasks_inputs_and_of_the_nodes_earlier_results(client, make_agent):
    agent = make_agent("reuser")
    img, w = client.upload_bytes(b"input image"), client.upload_bytes(b"input weights")
    project = client.create_project("in", [{"name": "ds", "items": [{"name": "a.jpg", "sha256": img, "size": 11}]}])
    model = client.create_model("in", [{"path": "w.bin", "sha256": w, "size": 13}])
    tid = _running_task(client, agent, "train", project_id=project["id"], model_id=model["id"])
    url = f"/agent/v1/tasks/{tid}/results"
    r = agent.post_raw(
        url,
        json={
            "kind": "artifacts",
            "files": [
                {"path": "copy/a.jpg", "sha256": img, "size": 11},
                {"path": "copy/w.bin", "sha256": w, "size": 13},
            ],
        },
    )
    assert r.status_code == 200, r.text
    r = agent.post_raw(url, json={"kind": "model", "files": [{"path": "w.bin", "sha256": w, "size": 13}]})
    assert r.status_code == 200, r.text
    # A readable blob's size is no secret to the node (HEAD says it): a wrong one is told as before.
    r = agent.post_raw(url, json={"kind": "artifacts", "files": [{"path": "b.jpg", "sha256": img, "size": 1}]})
    assert r.status_code == 400 and r.json()["error"] == "size_mismatch"


def _fill(body: dict, h: str) -> dict:
    return json.loads(json.dumps(body).replace("{h}", h))


def test_a_wrong_body_does_not_keep_an_unreferenced_blob_young(tmp_path):
    """Only the right bytes refresh a stored blob's age: a node that merely knows a sha256 cannot
    keep an unreferenced blob from the collector with empty PUTs."""
    import asyncio
    import os
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    from protocol.errors import APIError
    from server.blobs.store import BlobStore

    store = BlobStore(tmp_path / "blobs")
    data = b"someone else's bytes"
    h = _sha(data)

    async def put_async(body: bytes):
        async def chunks():
            yield body

        return await store.put_stream(h, chunks())

    def put(body: bytes):
        # A loop of its own on a thread of its own: a browser test may leave one running on this thread.
        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, put_async(body)).result()

    assert put(data) == (len(data), True)
    os.utime(store.path(h), (1000, 1000))
    with pytest.raises(APIError) as e:
        put(b"")
    assert e.value.code == "hash_mismatch"
    assert store.path(h).stat().st_mtime == 1000, "a wrong body made the blob young again"
    assert put(data) == (len(data), False)
    assert store.path(h).stat().st_mtime > 1000
