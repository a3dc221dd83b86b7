"""A result project in pages (POST /agent/v1/tasks/{id}/results): the first page (`paged: true`,
with the meta) makes the project, each further page (`project_id`) adds to it, checked against
the stored meta. A page posted again after a restart adds nothing; only the task's own result
project takes pages. The agent's paging (workers.results.project_pages) is checked at the end.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from workers.results import project_pages

META = {"classes": [{"title": "car", "shape": "rectangle", "color": "#FF0000"}], "tags": []}


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (i % 256, 7, 9)).save(buf, format="PNG")
    return buf.getvalue()


def _ann(k: int = 1) -> dict:
    box = {"classTitle": "car", "geometryType": "rectangle", "tags": []}
    return {
        "size": {"height": 6, "width": 8},
        "tags": [],
        "objects": [dict(box, points={"exterior": [[0, 0], [k, k]], "interior": []})],
    }


@pytest.fixture
def task(make_agent, client):
    agent = make_agent("pager", ["inference"])
    t = client.create_task(agent.id, "inference", image="img:1")
    agent.poll_until("tasks")
    agent.state(t["id"], "running")
    return agent, t["id"]


def _entries(agent, names: list[str], ann: dict | None = None) -> list[dict]:
    out = []
    for i, n in enumerate(names):
        data = _png(i + len(n))
        out.append({"path": n, "sha256": agent.upload(data), "size": len(data), "ann": ann or _ann()})
    return out


def _post(agent, tid, **body):
    return agent.post_raw(f"/agent/v1/tasks/{tid}/results", json={"kind": "project", **body})


def test_pages_make_one_project_and_a_replay_adds_nothing(task, client):
    agent, tid = task
    first = _entries(agent, ["a/0.png", "a/1.png"])
    rest = _entries(agent, ["a/2.png", "b/0.png"])
    r = _post(agent, tid, name="preds", meta=META, files=first, paged=True)
    assert r.status_code == 200, r.text
    pid = r.json()["id"]
    r = _post(agent, tid, files=rest, project_id=pid)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == pid and r.json()["results"]["project_id"] == pid
    p = client.get_project(pid)
    assert [(d["name"], d["items_count"]) for d in p["datasets"]] == [("a", 3), ("b", 1)]
    files_before = client.get_task(tid)["results"]["result_files"]
    # the agent restarted while uploading: it posts the first page and the others again
    again = _post(agent, tid, name="preds", meta=META, files=first, paged=True)
    assert again.status_code == 200 and again.json()["id"] == pid
    assert _post(agent, tid, files=rest, project_id=pid).status_code == 200
    p = client.get_project(pid)
    assert [(d["name"], d["items_count"]) for d in p["datasets"]] == [("a", 3), ("b", 1)]
    assert client.get_task(tid)["results"]["result_files"] == files_before


def test_a_page_is_checked_against_the_stored_meta_and_names(task, client):
    agent, tid = task
    pid = _post(agent, tid, name="p", meta=META, files=_entries(agent, ["a/0.png"]), paged=True).json()["id"]
    bad = _entries(agent, ["a/9.png"], ann={**_ann(), "objects": [{**_ann()["objects"][0], "classTitle": "bus"}]})
    r = _post(agent, tid, files=bad, project_id=pid)
    assert r.status_code == 400 and "bus" in r.text
    # the same name with another image
    other = _entries(agent, ["a/0.png"])
    other[0]["sha256"], other[0]["size"] = agent.upload(b"\x89PNG other"), len(b"\x89PNG other")
    r = _post(agent, tid, files=other, project_id=pid)
    assert r.status_code == 400 and r.json()["error"] == "duplicate_path"
    assert [d["items_count"] for d in client.get_project(pid)["datasets"]] == [1]


def test_only_the_task_s_own_result_project_takes_pages(task, make_agent, client):
    agent, tid = task
    pid = _post(agent, tid, name="mine", meta=META, files=_entries(agent, ["a/0.png"]), paged=True).json()["id"]
    other = make_agent("pager-2", ["inference"])
    t2 = client.create_task(other.id, "inference", image="img:1")
    other.poll_until("tasks")
    other.state(t2["id"], "running")
    r = _post(other, t2["id"], files=_entries(other, ["a/5.png"]), project_id=pid)
    assert r.status_code == 404 and r.json()["error"] == "project_not_found"
    # a project that is not a result of this task (one a user made)
    up = client.create_project("users", [{"name": "ds", "items": []}])
    r = _post(agent, tid, files=_entries(agent, ["a/6.png"]), project_id=up["id"])
    assert r.status_code == 404
    # a further page carries no meta, and the fields belong to projects only
    assert _post(agent, tid, files=[], project_id=pid, meta=META).status_code == 400
    r = agent.post_raw(f"/agent/v1/tasks/{tid}/results", json={"kind": "artifacts", "files": [], "project_id": pid})
    assert r.status_code == 400


def test_the_agent_pages_by_items_and_by_annotation_bytes():
    entries = [
        {"path": f"d/{i}.png", "sha256": "0" * 64, "size": 1, "ann": {"objects": ["x" * 100]}} for i in range(10)
    ]
    assert [len(p) for p in project_pages(entries, max_items=4, max_bytes=10**9)] == [4, 4, 2]
    by_bytes = list(project_pages(entries, max_items=100, max_bytes=700))
    assert all(len(p) >= 1 for p in by_bytes) and sum(len(p) for p in by_bytes) == 10 and len(by_bytes) > 2
    huge = [{"path": "d/x", "sha256": "0" * 64, "size": 1, "ann": {"o": "y" * 5000}}]
    assert [len(p) for p in project_pages(huge, max_items=100, max_bytes=10)] == [1]
    assert [p[0]["path"] for p in project_pages(entries, max_items=3, max_bytes=10**9)] == [
        "d/0.png",
        "d/3.png",
        "d/6.png",
        "d/9.png",
    ]
