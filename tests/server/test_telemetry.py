"""Telemetry storage: the small latest row, the downsampled history bounded per node, the nodes
list (pages, summary, ETag, gzip) and the node page's history answer."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import pytest
import requests
from sqlalchemy import func, select, text

from server import db
from server.agents.contact import Contacts
from server.settings import Settings
from server.telemetry import service as telemetry
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for

HOUR, DAY = 3600.0, 86400.0


def big_sample(free_slots: int = 1) -> dict:
    """About 4 KB, the shape agent/telemetry.py posts from an 8-GPU box."""
    return {
        "ts": 0,
        "cpu": {"percent": 37.5, "per_core": [round(random.random() * 100, 1) for _ in range(128)], "count": 128},
        "memory": {"total": 540_000_000_000, "available": 300_000_000_000, "used": 240_000_000_000, "percent": 44.4},
        "swap": {"total": 0, "used": 0, "percent": 0.0},
        "disks": [
            {
                "path": p,
                "total": 4_000_000_000_000,
                "used": 1_000_000_000_000,
                "free": 3_000_000_000_000,
                "percent": 25.0,
            }
            for p in ("/", "/data")
        ],
        "network": {"bytes_sent": 123_456_789_012, "bytes_recv": 987_654_321_098},
        "load": [12.1, 11.7, 10.9],
        "gpus": [
            {
                "index": i,
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000",
                "memory_total": 80 << 30,
                "memory_used": 20 << 30,
                "utilization": 10 * i,
                "temperature": 61,
                "processes": [{"pid": 1000 + i, "used_memory": 39_000_000_000}],
            }
            for i in range(8)
        ],
        "docker": {"server_version": "24.0.7", "containers_running": 2, "images": 41},
        "containers": [{"id": "c" * 64, "name": f"sly-task-{i}", "status": "running"} for i in range(2)],
        "free_slots": free_slots,
    }


def simulate(engine, settings, agent_id: int, start: float, end: float, every: float, prune_every: float = 60.0):
    """Post a sample every `every` seconds of simulated time from start to end, through the
    server's batches (server/agents/contact.py), pruning as the job would."""
    contacts = Contacts(engine, settings)
    next_prune, ts = start + prune_every, start
    with engine.begin() as conn:
        conn.execute(
            db.agents.insert().values(
                id=agent_id, name=f"n{agent_id}", token_hash=f"{agent_id:064d}", allowed_task_types=[], created_at=start
            )
        )
    agent = {"id": agent_id, "telemetry_ts": None}
    while ts < end:
        contacts.telemetry(
            agent,
            ts,
            {"cpu": ts % 100, "memory": 50, "disks": [{"path": "/", "percent": 1}], "gpus": [{"utilization": 5}]},
        )
        if ts >= next_prune:
            contacts.flush()
            with engine.begin() as conn:
                telemetry.prune(conn, settings, ts)
            next_prune += prune_every
        ts += every
    contacts.flush()
    return ts - every


def points(engine, agent_id: int) -> list[tuple[float, bool]]:
    h = db.telemetry_history.c
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(h.ts, h.minute).where(h.agent_id == agent_id).order_by(h.ts))]


@pytest.mark.slow
def test_history_keeps_every_point_for_an_hour_then_one_a_minute_then_none_per_node(engine):
    s = Settings(telemetry_interval_s=20.0)  # min gap 10 s, full 1 h, kept 24 h
    t0 = 1_700_000_000.0
    end_a = simulate(engine, s, 1, t0, t0 + 26 * HOUR, every=20.0)
    end_b = simulate(engine, s, 2, t0 + 24.8 * HOUR, t0 + 26 * HOUR, every=4.0)  # posts 5x too often
    now = max(end_a, end_b)
    with engine.begin() as conn:
        telemetry.prune(conn, s, now)

    a = points(engine, 1)
    assert a[0][0] >= now - s.telemetry_keep_s  # nothing past a day
    recent = [ts for ts, _ in a if ts >= now - s.telemetry_full_s]
    assert 178 <= len(recent) <= 181  # every 20 s point of the last hour
    older = [(ts, minute) for ts, minute in a if ts < now - s.telemetry_full_s]
    assert all(minute for _, minute in older)
    assert 23 * 60 - 2 <= len(older) <= 23 * 60 + 1  # one a minute for 23 hours
    gaps = [b[0] - a_[0] for a_, b in pairwise(older)]
    assert min(gaps) >= 50 and max(gaps) <= 70, (min(gaps), max(gaps))
    assert len({int(ts // 60) for ts, _ in older}) == len(older)  # one per minute, never two

    b = points(engine, 2)  # 4 s samples, min gap 10 s: a point every 12 s
    recent_b = [ts for ts, _ in b if ts >= now - s.telemetry_full_s]
    assert 297 <= len(recent_b) <= 301
    assert min(y - x for (x, _), (y, _) in pairwise(b)) >= s.telemetry_min_gap
    bound = s.telemetry_full_s / s.telemetry_min_gap + s.telemetry_keep_s / 60 + 2
    assert len(a) <= bound and len(b) <= bound
    with engine.connect() as conn:  # the latest row is one per node, with the newest sample
        lt = db.telemetry_latest.c
        assert conn.execute(select(func.count()).select_from(db.telemetry_latest)).scalar() == 2
        assert conn.execute(select(lt.ts).where(lt.agent_id == 1)).scalar() == end_a


def test_stored_bytes_per_sample_are_a_small_fraction_of_the_posted_sample(engine):
    s = Settings(telemetry_interval_s=5.0)
    sample = big_sample()
    posted = len(json.dumps(sample))
    n, t0 = 2000, 1_700_000_000.0
    with engine.begin() as conn:
        for agent_id in (1, 2):
            conn.execute(
                db.agents.insert().values(
                    id=agent_id, name="n", token_hash=f"{agent_id:064d}", allowed_task_types=[], created_at=t0
                )
            )
    contacts = Contacts(engine, s)
    for i in range(n):
        contacts.telemetry({"id": 1 + i % 2, "telemetry_ts": None}, t0 + 5 * i, sample)
        if i % 500 == 499:
            contacts.flush()
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(db.telemetry_history)).scalar()
        assert rows == n
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            size = conn.exec_driver_sql(
                "SELECT sum(pgsize) FROM dbstat WHERE name IN ('telemetry_history', 'ix_telemetry_history_ts')"
            ).scalar()
        else:
            size = conn.execute(text("SELECT pg_total_relation_size('telemetry_history')")).scalar()
        per_point = size / rows
        latest = conn.execute(select(db.telemetry_latest).where(db.telemetry_latest.c.agent_id == 1)).mappings().one()
    # A point with 2 disks and 8 GPUs, indexes and page overhead included (SQLite about 150 bytes,
    # PostgreSQL about 260 with its 24-byte tuple headers), against the 4 KB sample it came from.
    print(f"posted {posted} bytes; stored {per_point:.0f} bytes per history point")
    assert posted > 3500 and per_point < 300, per_point
    assert len(json.dumps(dict(latest), default=str)) < 1500  # 8 GPUs, 2 disks
    assert latest["gpu_count"] == 8 and latest["containers"] == 2 and latest["cpu"] == 37.5


def test_latest_row_and_history_answer_carry_what_the_console_shows(server, client, make_agent):
    agent = make_agent("compact")
    info = {"hostname": "h", "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3"}]}
    assert agent.post_raw("/agent/v1/connect", json=info).status_code == 200
    for _ in range(2):
        assert agent.post_raw("/agent/v1/telemetry", json=big_sample()).status_code == 200
    a = client.get_agent(agent.id)
    t = a["telemetry"]
    assert a["system_info"] == info
    assert t["cpu"] == {"percent": 37.5} and t["memory"] == {
        "percent": 44.4,
        "used": 240_000_000_000,
        "total": 540_000_000_000,
    }
    assert t["disks"][1] == {"path": "/data", "used": 1_000_000_000_000, "total": 4_000_000_000_000, "percent": 25.0}
    assert t["gpus"][3] == {
        "index": 3,
        "name": "NVIDIA H100 80GB HBM3",
        "utilization": 30.0,
        "memory_used": 20 << 30,
        "memory_total": 80 << 30,
    }
    assert t["containers"] == 2 and t["free_slots"] == 1
    assert "per_core" not in json.dumps(t) and len(json.dumps(t)) < 1500  # 8 GPUs, 2 disks

    h = requests.get(
        f"{server.url}/api/v1/agents/{agent.id}/telemetry",
        headers={"Authorization": f"Bearer {server.admin_token}"},
        timeout=10,
    ).json()
    assert h["disks"] == ["/", "/data"] and [g["index"] for g in h["gpus"]] == list(range(8))
    assert len(h["items"]) == 2
    p = h["items"][-1]
    assert (p["cpu"], p["mem"], p["disks"]) == (37.5, 44.4, [25, 25])
    assert p["gpus"][3] == [30, 25]  # utilisation %, memory %
    assert len(json.dumps(p)) < 200

    changed = dict(info, hostname="h2")  # a changed system info is stored
    agent.post_raw("/agent/v1/connect", json=changed)
    assert client.get_agent(agent.id)["system_info"]["hostname"] == "h2"


def test_history_is_pruned_by_the_periodic_job(own_server):
    from sqlalchemy import create_engine

    srv, client, agent = own_server("--housekeeping-s", "0.2", "--telemetry-min-gap-s", "0")
    for cpu in (1, 2, 3):
        assert agent.post_raw("/agent/v1/telemetry", json={"cpu": cpu}).status_code == 200
    assert [p["cpu"] for p in client.agent_telemetry(agent.id)] == [1, 2, 3]
    eng = create_engine(srv.db_url)
    try:

        def written():  # the chart shows the batch at once; it is written within --contact-flush-s
            with eng.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM telemetry_history")).scalar() == 3

        poll_for(written, timeout=10, what="the contact batch written")
        with eng.begin() as conn:  # two hours ago: only the minute's first point stays
            conn.execute(text("UPDATE telemetry_history SET ts = ts - 7200"))
        poll_for(
            lambda: [p["cpu"] for p in client.agent_telemetry(agent.id)] == [1],
            timeout=20,
            what="the per-second points pruned past the hour",
        )
        with eng.begin() as conn:  # past the day: none
            conn.execute(text("UPDATE telemetry_history SET ts = ts - 86400"))
        poll_for(lambda: client.agent_telemetry(agent.id) == [], timeout=20, what="history pruned past the day")
    finally:
        eng.dispose()


def test_nodes_list_is_paged_summarised_and_answers_304_when_unchanged(own_server):
    srv, client, first = own_server()
    agents = [first]
    for i in range(4):
        a = client.create_agent(f"n{i}")
        agents.append(FakeAgent(srv.url, a["token"], a["id"]))
    gpus = [{"index": i, "name": "A100", "utilization": 0, "memory_total": 1, "memory_used": 0} for i in range(2)]
    for a in agents[:3]:  # three online with 2 GPUs each, two never seen
        a.post_raw("/agent/v1/connect", json={"hostname": "h", "big": "x" * 3000})
        a.post_raw("/agent/v1/telemetry", json={"cpu": 5, "gpus": gpus})
    client.create_task(agents[0].id, "custom", image="x:1", resources={"gpus": 1})
    agents[0].poll(free_slots=1, free_gpus=[0, 1])

    admin = srv.admin()
    url = srv.url + "/api/v1/agents"
    pages, cursor = [], None
    while True:
        r = admin.get(url, params={"limit": 2, **({"cursor": cursor} if cursor else {})}, timeout=10)
        assert r.status_code == 200 and r.headers["etag"].startswith('W/"')
        body = r.json()
        pages.append([a["id"] for a in body["items"]])
        assert all("system_info" not in a and "token_hash" not in a for a in body["items"])
        assert body["summary"] == {
            "nodes": 5,
            "online": 3,
            "offline": 2,
            "gpus_total": 6,
            "gpus_free": 5,
            "tasks_running": 1,
        }
        cursor = body["next"]
        if not cursor:
            break
    assert pages == [[a.id for a in agents[:2]], [a.id for a in agents[2:4]], [agents[4].id]]
    row = admin.get(url, params={"limit": 1}, timeout=10).json()["items"][0]
    assert (
        row["running_tasks"] == 1 and row["telemetry"]["cpu"] == {"percent": 5} and len(row["telemetry"]["gpus"]) == 2
    )

    r = admin.get(url, params={"limit": 2, "cursor": pages[0][-1]}, timeout=10)
    again = admin.get(
        url, params={"limit": 2, "cursor": pages[0][-1]}, headers={"If-None-Match": r.headers["etag"]}, timeout=10
    )
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == r.headers["etag"]
    client.patch_agent(agents[3].id, name="renamed")  # on that page: a change, a new answer
    changed = admin.get(
        url, params={"limit": 2, "cursor": pages[0][-1]}, headers={"If-None-Match": r.headers["etag"]}, timeout=10
    )
    assert changed.status_code == 200 and changed.headers["etag"] != r.headers["etag"]
    assert changed.json()["items"][1]["name"] == "renamed"

    raw = admin.get(url, headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    assert raw.headers.get("content-encoding") == "gzip" and "Accept-Encoding" in raw.headers["vary"]
    assert admin.get(url, params={"cursor": "x"}, timeout=10).status_code == 400
    assert admin.get(url, params={"limit": 0}, timeout=10).status_code in (400, 422)


@pytest.mark.slow
def test_a_read_shows_the_unwritten_batch_writes_nothing_and_answers_the_same_once_written(own_server):
    """The nodes list, a node's page and its chart show what this process holds and has not
    written yet (server/agents/contact.py, `shown()`), and the read writes none of it: the console
    costs the fleet a read. Once the batch is written, every answer is the same."""
    import threading

    from sqlalchemy import create_engine

    srv, client, node = own_server("--offline-after-s", "900", "--contact-flush-s", "90", "--telemetry-min-gap-s", "0")
    client.create_agent("never seen")
    gpus = [{"index": i, "name": "A100", "utilization": 10 * i, "memory_total": 4, "memory_used": 1} for i in range(2)]
    for cpu in (7, 8):
        assert node.post_raw("/agent/v1/telemetry", json={"cpu": cpu, "gpus": gpus}).status_code == 200
    poll = threading.Thread(target=node.poll, kwargs={"wait": 4})  # a long-poll open on this process
    poll.start()
    admin, url = srv.admin(), f"{srv.url}/api/v1/agents"

    def answers():
        return (
            admin.get(url, timeout=10).json(),
            admin.get(f"{url}/{node.id}", timeout=10).json(),
            admin.get(f"{url}/{node.id}/telemetry", timeout=10).json(),
        )

    eng = create_engine(srv.db_url)
    try:
        poll_for(lambda: answers()[1]["polls_open"] == 1, timeout=5, what="the open poll shown")
        listed, page, chart = answers()
        assert listed["summary"] == {
            "nodes": 2,
            "online": 1,
            "offline": 1,
            "gpus_total": 2,
            "gpus_free": 2,
            "tasks_running": 0,
        }
        [row] = [a for a in listed["items"] if a["id"] == node.id]
        assert row["status"] == "online" and row["telemetry"]["cpu"] == {"percent": 8} and row["polls_open"] == 1
        assert page["telemetry"] == row["telemetry"] and page["last_seen"] == row["last_seen"] is not None
        assert [p["cpu"] for p in chart["items"]] == [7, 8] and len(chart["gpus"]) == 2
        with eng.connect() as conn:  # the reads wrote nothing
            assert conn.execute(text("SELECT count(*) FROM telemetry_latest")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM telemetry_history")).scalar() == 0
            assert conn.execute(text("SELECT count(*) FROM polls")).scalar() == 0
        assert admin.get(f"{srv.url}/metrics", timeout=10).status_code == 200  # /metrics writes the batch
        with eng.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM telemetry_history")).scalar() == 2
            assert conn.execute(text("SELECT count(*) FROM polls")).scalar() == 1
        assert answers() == (listed, page, chart)
    finally:
        poll.join()
        eng.dispose()
