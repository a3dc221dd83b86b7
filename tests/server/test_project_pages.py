"""Projects filled a page at a time (POST /api/v1/projects/{id}/items), their items read a page at a
time by users and by the agent of a task (GET /agent/v1/tasks/{id}/project/items), and a poll answer
that names a project without reading its items.

The same checks as creation (names, blobs, annotations against the stored meta); a page is stored
whole or not at all; appends to one project, at once, keep every item and every count.
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from sqlalchemy import event

from protocol import endpoints
from server.projects.schemas import PAGE_MAX
from tests.support.server import dataset_counts

META = {
    "classes": [{"title": "car", "shape": "rectangle", "color": "#FF0000"}],
    "tags": [{"name": "weather", "value_type": "any_string", "color": "#8A0F59"}],
}


def _png(w: int, h: int, color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _car(n: int = 1) -> dict:
    box = {"classTitle": "car", "geometryType": "rectangle", "tags": []}
    objects = [dict(box, points={"exterior": [[k, k], [k + 5, k + 5]], "interior": []}) for k in range(n)]
    return {"size": {"height": 40, "width": 60}, "tags": [], "objects": objects}


class Admin:
    """The user API as plain HTTP: the answers whatever their status."""

    def __init__(self, server):
        self.url, self.s = server.url, server.admin()

    def create(self, name: str, datasets: list[dict], meta: dict | None = META) -> dict:
        body = {"name": name, "datasets": datasets, **({"meta": meta} if meta is not None else {})}
        r = self.s.post(self.url + endpoints.PROJECTS, json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def add(self, pid: int, dataset: str, items: list[dict]):
        path = endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid)
        return self.s.post(self.url + path, json={"dataset": dataset, "items": items}, timeout=60)

    def project(self, pid: int) -> dict:
        return self.s.get(self.url + endpoints.path(endpoints.PROJECT, project_id=pid), timeout=30).json()

    def page(self, pid: int, **params):
        return self.s.get(self.url + endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid), params=params, timeout=30)

    def items(self, pid: int, **params) -> list[dict]:
        out, cursor = [], ""
        while True:
            r = self.page(pid, cursor=cursor, **params)
            assert r.status_code == 200, r.text
            out += r.json()["items"]
            cursor = r.json()["next"]
            if cursor is None:
                return out

    def stats(self, pid: int) -> dict:
        path = endpoints.path(endpoints.PROJECT_STATS, project_id=pid)
        return self.s.get(self.url + path, timeout=30).json()


@pytest.fixture
def admin(server) -> Admin:
    return Admin(server)


@pytest.fixture
def image(client) -> dict:
    """One uploaded 60x40 PNG: {sha256, size}; pages name it under many item names."""
    data = _png(60, 40)
    return {"sha256": client.upload_bytes(data), "size": len(data)}


def _items(image: dict, names, ann=None) -> list[dict]:
    return [dict(image, name=n, **({"ann": ann} if ann is not None else {})) for n in names]


def _names(items: list[dict]) -> list[str]:
    return [i["name"] for i in items]


def test_a_project_made_of_pages_keeps_each_datasets_order_and_counts(admin, image):
    made = admin.create("pages", [{"name": "a", "items": []}, {"name": "b", "items": _items(image, ["b0.png"])}])
    pid = made["id"]
    assert dataset_counts(made["datasets"]) == [
        {"name": "a", "items_count": 0},
        {"name": "b", "items_count": 1},
    ]  # no items inline

    r = admin.add(pid, "a", _items(image, [f"a{i}.png" for i in range(3)], ann=_car()))
    assert r.status_code == 200, r.text
    assert r.json() == {"dataset": "a", "added": 3, "items_count": 3}
    assert admin.add(pid, "c", _items(image, ["sub/c0.png"])).json() == {"dataset": "c", "added": 1, "items_count": 1}
    assert admin.add(pid, "a", _items(image, ["a3.png", "a4.png"])).json() == {
        "dataset": "a",
        "added": 2,
        "items_count": 5,
    }

    p = admin.project(pid)
    assert dataset_counts(p["datasets"]) == [
        {"name": "a", "items_count": 5},
        {"name": "b", "items_count": 1},
        {"name": "c", "items_count": 1},
    ]
    assert _names(admin.items(pid, dataset="a", limit=2)) == [f"a{i}.png" for i in range(5)]  # pages and pages
    assert _names(admin.items(pid)) == ["b0.png", "a0.png", "a1.png", "a2.png", "sub/c0.png", "a3.png", "a4.png"]
    first = admin.page(pid, dataset="a", limit=3).json()
    assert _names(first["items"]) == ["a0.png", "a1.png", "a2.png"] and first["next"] is not None
    rest = admin.page(pid, dataset="a", limit=3, cursor=first["next"]).json()
    assert _names(rest["items"]) == ["a3.png", "a4.png"] and rest["next"] is None

    items = {i["name"]: i for i in admin.items(pid)}
    assert items["a0.png"]["ann"] == _car()  # as posted
    assert items["a3.png"]["ann"]["size"] == {"height": 40, "width": 60}  # none posted: sized from the image
    listed = admin.s.get(admin.url + endpoints.PROJECTS, timeout=30).json()["items"]
    assert next(x for x in listed if x["id"] == pid)["datasets"] == p["datasets"]


@pytest.mark.slow
def test_the_items_listing_gives_up_to_5000_a_page(admin, image):
    pid = admin.create("big page", [])["id"]
    assert (
        admin.add(pid, "ds", _items(image, [f"{i:05}.png" for i in range(PAGE_MAX)])).json()["items_count"] == PAGE_MAX
    )
    r = admin.page(pid, limit=PAGE_MAX)
    assert r.status_code == 200 and len(r.json()["items"]) == PAGE_MAX and r.json()["next"] is None
    assert admin.page(pid, limit=PAGE_MAX + 1).status_code == 400


@pytest.mark.slow
def test_a_page_over_the_json_limit_is_taken_up_to_the_project_body_limit(admin, image):
    ann = dict(_car(), description="d" * 300)  # 5,000 items of ~400 bytes: a 2 MB body, over the 1 MiB of JSON routes
    pid = admin.create("heavy page", [])["id"]
    r = admin.add(pid, "ds", _items(image, [f"{i}.png" for i in range(PAGE_MAX)], ann=ann))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["items_count"] == PAGE_MAX


def test_a_duplicate_name_refuses_the_whole_page(admin, image):
    pid = admin.create("dups", [{"name": "ds", "items": _items(image, ["x.png"])}])["id"]

    r = admin.add(pid, "ds", _items(image, ["n1.png", "n2.png", "n1.png"]))
    assert r.status_code == 400 and r.json()["error"] == "duplicate_path" and "n1.png" in r.json()["detail"]
    r = admin.add(pid, "ds", _items(image, ["new.png", "x.png"]))  # x.png is stored already
    assert r.status_code == 400 and r.json()["error"] == "duplicate_path" and "'x.png'" in r.json()["detail"]

    assert _names(admin.items(pid)) == ["x.png"]  # nothing of either page
    assert dataset_counts(admin.project(pid)["datasets"]) == [{"name": "ds", "items_count": 1}]
    assert admin.add(pid, "other", _items(image, ["x.png"])).status_code == 200  # another dataset may hold it


def test_a_page_is_checked_as_creation_checks_it(admin, image, client):
    pid = admin.create("checked", [])["id"]
    bad = _car()
    bad["objects"][0]["classTitle"] = "dog"
    r = admin.add(pid, "ds", _items(image, ["ok.png"], ann=_car()) + _items(image, ["bad.png"], ann=bad))
    assert r.status_code == 400
    assert "dataset ds, item bad.png" in r.json()["detail"] and "'dog'" in r.json()["detail"]

    absent = "0" * 64
    r = admin.add(pid, "ds", _items(image, ["ok.png"]) + [{"name": "gone.png", "sha256": absent, "size": 3}])
    assert r.status_code == 400 and r.json()["error"] == "missing_blobs" and r.json()["missing"] == [absent]
    r = admin.add(pid, "ds", [dict(image, name="short.png", size=image["size"] - 1)])
    assert r.status_code == 400 and r.json()["error"] == "size_mismatch"
    r = admin.add(pid, "ds", _items(image, ["../up.png"]))
    assert r.status_code == 400 and r.json()["error"] == "bad_name"
    r = admin.add(pid, "a/b", _items(image, ["ok.png"]))
    assert r.status_code == 400 and r.json()["error"] == "bad_name"
    r = admin.add(pid, "ds", [])
    assert r.status_code == 400
    r = admin.add(pid, "ds", [dict(image, name="x.png", nmae="typo")])
    assert r.status_code == 400 and r.json()["error"] == "unknown_field"
    assert admin.items(pid) == [] and dataset_counts(admin.project(pid)["datasets"]) == []

    r = admin.add(999_999, "ds", _items(image, ["ok.png"]))
    assert r.status_code == 404 and r.json()["error"] == "project_not_found"
    # The meta the page is checked against is the stored one: none given, the empty meta knows no class.
    plain = admin.create("plain", [], meta=None)["id"]
    r = admin.add(plain, "ds", _items(image, ["a.png"], ann=_car()))
    assert r.status_code == 400 and "dataset ds, item a.png" in r.json()["detail"]


def test_the_stats_count_again_after_an_append(admin, image):
    pid = admin.create("stats", [{"name": "ds", "items": _items(image, ["a.png"], ann=_car(2))}])["id"]
    before = admin.stats(pid)
    assert (before["items"], before["objects"], before["classes"]["car"]) == (1, 2, {"objects": 2, "items": 1})
    assert admin.stats(pid) == before  # kept
    assert admin.add(pid, "ds", _items(image, ["b.png", "c.png"], ann=_car(3))).status_code == 200
    after = admin.stats(pid)
    assert (after["items"], after["objects"], after["classes"]["car"]) == (3, 8, {"objects": 8, "items": 3})


def test_appends_at_once_to_one_project_keep_every_item_and_count(admin, image):
    pid = admin.create("at once", [])["id"]

    def fill(k: int) -> list[int]:
        codes = []
        for page in range(4):
            names = [f"t{k}-p{page}-{i}.png" for i in range(25)]
            codes.append(admin.add(pid, f"ds{k % 2}", _items(image, names)).status_code)
        return codes

    with ThreadPoolExecutor(6) as pool:
        codes = [c for got in pool.map(fill, range(6)) for c in got]
    assert codes == [200] * 24
    counts = {d["name"]: d["items_count"] for d in admin.project(pid)["datasets"]}
    assert counts == {"ds0": 300, "ds1": 300}
    for ds in ("ds0", "ds1"):
        names = _names(admin.items(pid, dataset=ds, limit=1000))
        assert len(names) == len(set(names)) == 300
        for k in range(int(ds[-1]), 6, 2):  # each thread's pages in the order it posted them
            mine = [n for n in names if n.startswith(f"t{k}-")]
            assert mine == [f"t{k}-p{page}-{i}.png" for page in range(4) for i in range(25)]

    # The same page posted at once by several: stored once, the others are refused.
    same = _items(image, [f"same{i}.png" for i in range(50)])
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: admin.add(pid, "ds0", same), range(4)))
    assert sorted(r.status_code for r in answers) == [200, 400, 400, 400]
    assert {r.json()["error"] for r in answers if r.status_code == 400} == {"duplicate_path"}
    assert {d["name"]: d["items_count"] for d in admin.project(pid)["datasets"]} == {"ds0": 350, "ds1": 300}


def test_appends_in_threads_on_the_database_lose_no_count(engine):
    """The service under real concurrency (several connections, PostgreSQL or SQLite): each append
    sees the one before it."""
    from server.projects import service

    with engine.begin() as conn:
        pid = service.insert_project(conn, "p", {"classes": [], "tags": []}, [], time.time())
    item = {"sha256": "a" * 64, "size": 1, "ann": {}}
    start = threading.Barrier(8)

    def append(k: int) -> str:
        start.wait()
        try:
            with engine.begin() as conn:
                service.append_items(conn, pid, "ds", [dict(item, name=f"{k % 4}-{i}") for i in range(30)])
        except Exception as e:  # noqa: BLE001 - the refusal is what is counted
            return getattr(e, "code", type(e).__name__)
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        got = sorted(pool.map(append, range(8)))
    assert got == ["duplicate_path"] * 4 + ["ok"] * 4  # threads k and k + 4 post the same names
    with engine.connect() as conn:
        assert dataset_counts(service.get_project(conn, pid)["datasets"]) == [{"name": "ds", "items_count": 120}]
        names = [r["name"] for r in service.items_page(conn, pid, "ds", None, 1000)]
    assert sorted(names) == sorted(f"{k}-{i}" for k in range(4) for i in range(30))


def _leased(client, agent, project_id: int | None) -> int:
    tid = client.create_task(agent.id, "train", image="img:1", project_id=project_id)["id"]
    assert [t["id"] for t in agent.poll(free_slots=1)["tasks"]] == [tid]
    return tid


def test_the_agent_pages_the_items_of_its_leased_tasks_project_only(admin, client, image, make_agent):
    pid = admin.create("for agents", [{"name": "ds", "items": _items(image, ["a.png", "b.png"], ann=_car())}])["id"]
    agent, other = make_agent("pager"), make_agent("other")
    tid = _leased(client, agent, pid)
    path = endpoints.path(endpoints.TASK_PROJECT_ITEMS, task_id=tid)

    first = agent.request("GET", path, params={"limit": 1})
    assert first.status_code == 200, first.text
    [a] = first.json()["items"]
    assert set(a) == {"id", "dataset", "name", "sha256", "size", "ann"}
    assert (a["dataset"], a["name"], a["sha256"], a["size"], a["ann"]) == (
        "ds",
        "a.png",
        image["sha256"],
        image["size"],
        _car(),
    )
    rest = agent.request("GET", path, params={"limit": 1, "cursor": first.json()["next"]}).json()
    assert _names(rest["items"]) == ["b.png"] and rest["next"] is None

    r = other.request("GET", path)
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    assert agent.request("GET", path, params={"cursor": "x"}).json()["error"] == "bad_cursor"
    assert agent.request("GET", path, params={"limit": PAGE_MAX + 1}).status_code == 400
    assert agent.request("GET", endpoints.path(endpoints.TASK_PROJECT_ITEMS, task_id=999_999)).status_code == 404

    agent.state(tid, "running")
    assert agent.request("GET", path).status_code == 200  # leased while it runs
    agent.state(tid, "finished")
    r = agent.request("GET", path)
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"

    queued = client.create_task(other.id, "train", image="img:1", project_id=pid)["id"]  # not handed out yet
    r = other.request("GET", endpoints.path(endpoints.TASK_PROJECT_ITEMS, task_id=queued))
    assert r.status_code == 404 and r.json()["error"] == "task_not_found"
    third = make_agent("third")
    bare = _leased(client, third, None)
    r = third.request("GET", endpoints.path(endpoints.TASK_PROJECT_ITEMS, task_id=bare))
    assert r.status_code == 404 and r.json()["error"] == "project_not_found"


@pytest.mark.slow
def test_the_agent_pages_2500_items_1000_at_a_time(admin, client, image, make_agent):
    pid = admin.create("2500", [])["id"]
    names = [f"{i:04}.png" for i in range(2500)]
    for ds, chunk in (("x", names[:1200]), ("y", names[1200:])):
        assert admin.add(pid, ds, _items(image, chunk)).status_code == 200
    agent = make_agent("bulk")
    tid = _leased(client, agent, pid)
    path = endpoints.path(endpoints.TASK_PROJECT_ITEMS, task_id=tid)
    pages, cursor = [], ""
    while cursor is not None:
        r = agent.request("GET", path, params={"cursor": cursor, "limit": 1000})
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        cursor = r.json()["next"]
    assert [len(p) for p in pages] == [1000, 1000, 500]
    items = [i for p in pages for i in p]
    assert _names(items) == names and [i["dataset"] for i in items] == ["x"] * 1200 + ["y"] * 1300
    assert agent.project_items(tid) == items  # the default page (1,000) reads the same
    assert len(agent.request("GET", path).json()["items"]) == 1000


def test_the_poll_answer_names_the_project_without_its_items(admin, client, image, make_agent):
    pid = admin.create("polled", [{"name": "ds", "items": _items(image, ["a.png"], ann=_car())}])["id"]
    agent = make_agent("poller")
    tid = client.create_task(agent.id, "train", image="img:1", project_id=pid)["id"]
    [task] = agent.poll(free_slots=1)["tasks"]
    assert task["id"] == tid
    assert task["project"] == {
        "id": pid,
        "name": "polled",
        "meta": META,
        "datasets": [{"name": "ds", "items_count": 1, "id": task["project"]["datasets"][0]["id"]}],
    }


def test_a_poll_answer_reads_no_project_item(engine):
    """A task's poll answer costs the same for a project of a million items as for one of one."""
    from server.projects import service as projects
    from server.tasks import service as tasks

    with engine.begin() as conn:
        pid = projects.insert_project(
            conn,
            "p",
            {"classes": [], "tags": []},
            [{"name": "ds", "items": [{"name": "a", "sha256": "a" * 64, "size": 1, "ann": {}}]}],
            time.time(),
        )
    task = {"id": 1, "type": "train", "image": "i", "config": {}, "resources": {}, "command": None, "timeout_s": None}
    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with engine.connect() as conn:
            out = tasks.agent_task(conn, dict(task, project_id=pid, model_id=None))
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert dataset_counts(out["project"]["datasets"]) == [{"name": "ds", "items_count": 1}]
    assert statements and not [s for s in statements if "project_items" in s]
