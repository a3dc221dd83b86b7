"""Batched contact (server/agents/contact.py): one transaction per batch, newest values, nothing written
for deleted agents, a failed batch kept, polls that end before a batch never written; and the
server's kept agent rows (a rotated token or a removed agent is refused at once)."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import DBAPIError

from protocol import endpoints
from server import db
from server.agents.contact import Contacts
from server.settings import Settings


def add_agents(engine, n: int) -> list[int]:
    with engine.begin() as conn:
        return [
            conn.execute(
                db.agents.insert().values(name=f"n{i}", token_hash=f"{i:064d}", allowed_task_types=[], created_at=0.0)
            ).inserted_primary_key[0]
            for i in range(n)
        ]


def commits(engine) -> list[int]:
    seen = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


def sample(cpu: float) -> dict:
    return {
        "cpu": {"percent": cpu},
        "memory": {"percent": 10.0},
        "gpus": [{"index": 0, "utilization": cpu}],
        "free_slots": 1,
    }


def test_a_batch_of_many_nodes_is_one_transaction_with_the_newest_values(engine):
    settings = Settings(telemetry_min_gap_s=2.0, lease_s=300.0)
    ids = add_agents(engine, 50)
    c = Contacts(engine, settings)
    seen = commits(engine)
    for k in range(3):  # three samples each, 1 s apart: two become history points
        for aid in ids:
            c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0 + k, sample(10.0 * k + aid % 7))
    assert seen == []  # nothing written before the flush
    written = c.flush()
    assert len(seen) == 1 and written > 0
    with engine.connect() as conn:
        latest = dict(conn.execute(select(db.telemetry_latest.c.agent_id, db.telemetry_latest.c.cpu)).all())
        points = conn.execute(select(db.telemetry_history.c.agent_id, db.telemetry_history.c.ts)).all()
        agents = {
            r.id: r for r in conn.execute(select(db.agents.c.id, db.agents.c.last_seen, db.agents.c.telemetry_ts))
        }
    assert latest == {aid: 20.0 + aid % 7 for aid in ids}
    assert sorted(points) == sorted((aid, ts) for aid in ids for ts in (1000.0, 1002.0))
    assert all(agents[aid].last_seen == 1002.0 and agents[aid].telemetry_ts == 1002.0 for aid in ids)
    assert c.flush() == 0 and len(seen) == 1  # nothing pending: no transaction at all


def test_contact_never_moves_back_and_renews_leases_each_quarter_lease(engine):
    settings = Settings(lease_s=100.0)
    [aid] = add_agents(engine, 1)
    with engine.begin() as conn:
        tid = conn.execute(
            db.tasks.insert().values(
                agent_id=aid,
                type="custom",
                config={},
                resources={},
                state="running",
                timeline=[],
                results={},
                lease_until=50.0,
                created_at=0.0,
                updated_at=0.0,
            )
        ).inserted_primary_key[0]
        conn.execute(db.agents.update().values(last_seen=500.0))  # another replica saw it later
    c = Contacts(engine, settings)
    c.seen(aid, 400.0)
    c.flush()
    with engine.connect() as conn:
        assert conn.execute(select(db.agents.c.last_seen)).scalar() == 500.0
        assert conn.execute(select(db.tasks.c.lease_until).where(db.tasks.c.id == tid)).scalar() == 500.0
    c.seen(aid, 410.0)  # within a quarter lease of the last renewal: the lease is not written again
    c.seen(aid, 600.0)
    c.flush()
    with engine.connect() as conn:
        assert conn.execute(select(db.agents.c.last_seen)).scalar() == 600.0
        assert conn.execute(select(db.tasks.c.lease_until).where(db.tasks.c.id == tid)).scalar() == 700.0


def test_a_deleted_agents_pending_rows_are_not_written(engine):
    settings = Settings()
    keep, gone = add_agents(engine, 2)
    c = Contacts(engine, settings)
    for aid in (keep, gone):
        c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0, sample(5.0))
        c.poll_open(f"p{aid}", aid, "r1", 2000.0)
    with engine.begin() as conn:  # removed by another replica before this one's batch
        conn.execute(db.agents.delete().where(db.agents.c.id == gone))
    c.flush()
    with engine.connect() as conn:
        for table in (db.telemetry_latest, db.telemetry_history, db.polls):
            assert set(conn.execute(select(table.c.agent_id)).scalars()) == {keep}, table.name


def test_a_failed_batch_is_kept_and_written_by_the_next(engine):
    settings = Settings()
    [aid] = add_agents(engine, 1)
    c = Contacts(engine, settings)
    c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0, sample(1.0))
    c.poll_open("p1", aid, "r1", 2000.0)
    with engine.begin() as conn:  # the table is away: the batch fails
        conn.execute(text("ALTER TABLE telemetry_latest RENAME TO telemetry_latest_away"))
    with pytest.raises(DBAPIError):
        c.flush()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry_latest_away RENAME TO telemetry_latest"))
    c.telemetry({"id": aid, "telemetry_ts": None}, 1001.0, sample(2.0))  # newer than the kept one
    c.flush()
    with engine.connect() as conn:
        assert conn.execute(select(db.telemetry_latest.c.cpu)).scalar() == 2.0
        assert conn.execute(select(db.agents.c.last_seen)).scalar() == 1001.0
        assert conn.execute(select(db.telemetry_history.c.ts)).scalars().all() == [1000.0]
        assert conn.execute(select(db.polls.c.id)).scalars().all() == ["p1"]


def test_a_batch_kept_while_the_database_is_away_is_bounded(engine, monkeypatch):
    monkeypatch.setattr("server.agents.contact.MAX_KEPT", 10)
    [aid] = add_agents(engine, 1)
    c = Contacts(engine, Settings(telemetry_min_gap_s=1.0))
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry_latest RENAME TO telemetry_latest_away"))
    for k in range(30):
        c.telemetry({"id": aid, "telemetry_ts": None}, 1000.0 + k, sample(float(k)))
        with pytest.raises(DBAPIError):
            c.flush()
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry_latest_away RENAME TO telemetry_latest"))
    c.flush()
    with engine.connect() as conn:
        kept = conn.execute(select(db.telemetry_history.c.ts).order_by(db.telemetry_history.c.ts)).scalars().all()
        assert kept == [1000.0 + k for k in range(20, 30)]  # the newest ten points
        assert conn.execute(select(db.telemetry_latest.c.cpu)).scalar() == 29.0


def test_a_poll_over_before_the_batch_writes_nothing_and_a_written_one_goes(engine):
    [aid] = add_agents(engine, 1)
    c = Contacts(engine, Settings())
    seen = commits(engine)
    c.poll_open("short", aid, "r1", 2000.0)
    c.poll_closed("short")
    assert not c.pending and c.flush() == 0 and seen == []
    c.poll_open("long", aid, "r1", 2000.0)
    c.flush()
    with engine.connect() as conn:
        assert conn.execute(select(db.polls.c.id)).scalars().all() == ["long"]
    c.poll_closed("long")
    c.flush()
    with engine.connect() as conn:
        assert conn.execute(select(db.polls.c.id)).scalars().all() == []


def test_shown_holds_what_is_pending_and_what_a_flush_is_writing_and_nothing_once_written(engine, monkeypatch):
    """A read takes `shown()` before it reads the database: a batch being written must be in it
    (it may not be committed yet), the newer value wins, and a written batch leaves it."""
    a, b = add_agents(engine, 2)
    c = Contacts(engine, Settings(telemetry_min_gap_s=0.0))
    c.telemetry({"id": a, "telemetry_ts": None}, 1000.0, sample(1.0))
    c.seen(b, 1001.0)
    c.poll_open("p1", a, "r1", 2000.0)
    c.poll_open("p2", a, "r1", 2000.0)
    during = []
    real = c._write

    def writing(*batch):
        # Mid-write: newer contact arrives; the read sees the batch in flight and the newer values.
        c.telemetry({"id": a, "telemetry_ts": 1000.0}, 1002.0, sample(2.0))
        during.append(c.shown())
        return real(*batch)

    monkeypatch.setattr(c, "_write", writing)
    c.flush()
    [mid] = during
    assert mid.seen == {a: 1002.0, b: 1001.0}
    assert mid.latest[a]["cpu"] == 2.0 and mid.latest[a]["ts"] == 1002.0  # the pending one, newer
    assert [p["ts"] for p in mid.points_of(a, None)] == [1002.0, 1000.0] and mid.points_of(a, 1000.0)[0]["ts"] == 1002.0
    assert mid.polls == {a: 2} and mid.online_here(1001.0) == [a, b] and mid.online_here(1001.5) == [a]
    assert mid.last_seen(a, 999.0) == 1002.0 and mid.last_seen(a, 2000.0) == 2000.0 and mid.last_seen(9, None) is None
    c.poll_closed("p1")
    monkeypatch.setattr(c, "_write", real)
    c.flush()
    after = c.shown()
    assert after.seen == {} and after.latest == {} and after.points == [] and after.polls == {a: 1}


# --- through the server: the kept agent rows ---


def test_a_rotated_token_and_a_removed_agent_are_refused_at_once(server, client, make_agent):
    agent = make_agent("cached")
    assert agent.post_raw(endpoints.TELEMETRY, json=sample(1.0)).status_code == 200  # its row is kept now
    assert agent.post_raw(endpoints.TELEMETRY, json=sample(2.0)).status_code == 200
    r = client.session.post(f"{server.url}/api/v1/agents/{agent.id}/token")
    assert r.status_code == 200
    assert agent.post_raw(endpoints.TELEMETRY, json=sample(3.0)).status_code == 401  # the kept row was dropped
    agent.s.headers["x-token"] = r.json()["token"]
    assert agent.post_raw(endpoints.TELEMETRY, json=sample(4.0)).status_code == 200
    assert client.get_agent(agent.id)["telemetry"]["cpu"] == {"percent": 4.0}
    assert client.session.delete(f"{server.url}/api/v1/agents/{agent.id}").status_code == 200
    assert agent.post_raw(endpoints.TELEMETRY, json=sample(5.0)).status_code == 401


def test_a_renamed_agent_is_told_at_its_next_poll(server, client, make_agent):
    agent = make_agent("before")
    assert agent.poll(free_slots=0)["settings"]["name"] == "before"
    r = client.session.patch(f"{server.url}/api/v1/agents/{agent.id}", json={"name": "after"})
    assert r.status_code == 200
    assert agent.poll(free_slots=0)["settings"]["name"] == "after"
