"""PostgreSQL connections are pinged at checkout only after sitting idle (server/db/__init__.py).

Runs on the database SLY_TEST_DB_URL names; skipped on SQLite, which has no connection to lose.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from server import db


@pytest.fixture
def pg_engine(engine):
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: set SLY_TEST_DB_URL to a postgresql+psycopg:// URL")
    return engine


def _count_pings(engine, monkeypatch) -> list:
    pings = []
    real = engine.dialect.do_ping

    def counting(dbapi_conn):
        pings.append(time.monotonic())
        return real(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", counting)
    return pings


def test_a_connection_used_a_moment_ago_is_not_pinged(pg_engine, monkeypatch):
    pings = _count_pings(pg_engine, monkeypatch)
    pg_engine.dispose()
    for _ in range(20):  # a new connection, then a busy server's back-to-back checkouts
        with pg_engine.connect() as conn:
            assert conn.execute(text("SELECT 2")).scalar() == 2
    assert pings == []
    time.sleep(db.PING_IDLE_S + 0.1)
    with pg_engine.connect() as conn:  # idle a while: pinged first
        conn.execute(text("SELECT 1"))
    assert len(pings) == 1


def test_an_idle_connection_killed_by_the_database_is_replaced_before_use(pg_engine, monkeypatch):
    pings = _count_pings(pg_engine, monkeypatch)
    with pg_engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    # The database restarts, or an idle-connection reaper ends the session, while it sits in the pool.
    killer = db.make_engine(str(pg_engine.url.render_as_string(hide_password=False)), pool_size=1)
    try:
        with killer.connect() as k:
            assert k.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar() is True
            k.commit()
    finally:
        killer.dispose()
    time.sleep(db.PING_IDLE_S + 0.1)
    with pg_engine.connect() as conn:  # no error: the dead one failed its ping and was replaced
        new_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    assert new_pid != pid
    assert len(pings) >= 1
