"""What a busy fleet's transactions may and may not wait for on PostgreSQL.

- A hand-out's token check (`server/tasks/service.py`, FOR KEY SHARE) never waits for the contact
  batch's UPDATE of `last_seen`, nor the batch for it; a token rotation or a removal does wait.
- Wake-ups go to the other replicas after the commit, from a sender of their own
  (`server/wakeups.py`): the changing transaction does not notify, so it does not queue for
  PostgreSQL's cluster-wide notify lock; a rolled-back one sends nothing; a sender that lost its
  connection sends what was pending once it is back.

Skipped on SQLite, which has neither row locks nor LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import json
import time

import psycopg
import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url

from server import db
from server.agents.contact import _PG_SEEN
from server.tasks.service import _VALID_TOKEN
from server.wakeups import AGENT, CHANNEL, TASK, Wakeups


@pytest.fixture
def pg_engine(engine):
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: set SLY_TEST_DB_URL to a postgresql+psycopg:// URL")
    return engine


def _agent(engine, h: str = "a" * 64) -> int:
    with engine.begin() as conn:
        return conn.execute(
            insert(db.agents).values(name="n", token_hash=h, allowed_task_types=[], created_at=time.time())
        ).inserted_primary_key[0]


def _short_lock_wait(conn) -> None:
    conn.execute(text("SET LOCAL lock_timeout = '300ms'"))


def _waits(engine, sql: str, params) -> bool:
    """True if `sql` had to wait for a lock (it gave up after 300 ms), False if it ran at once."""
    with engine.connect() as conn:
        conn.begin()
        _short_lock_wait(conn)
        try:
            conn.execute(text(sql) if isinstance(sql, str) else sql, params)
        except Exception as e:  # noqa: BLE001 - only a lock timeout counts as waiting
            if isinstance(getattr(e, "orig", None), psycopg.errors.LockNotAvailable):
                return True
            raise
        finally:
            conn.rollback()
        return False


def _seen_batch(aid: int) -> tuple[str, tuple]:
    return _PG_SEEN, (json.dumps([{"id": aid, "ts": time.time()}]),)


def test_the_hand_out_token_check_and_the_contact_batch_do_not_wait_for_each_other(pg_engine):
    aid = _agent(pg_engine)
    check = {"aid": aid, "h": "a" * 64}
    # The hand-out's transaction holds its lock; the batch's UPDATE of last_seen goes through.
    with pg_engine.connect() as holder:
        holder.begin()
        assert holder.execute(_VALID_TOKEN, check).first() is not None
        with pg_engine.connect() as batch:
            batch.begin()
            _short_lock_wait(batch)
            sql, params = _seen_batch(aid)
            assert batch.exec_driver_sql(sql, params).rowcount == 1
            batch.rollback()
        # ... but a rotation and a removal wait for it: the hand-out sees the old token to its end.
        assert _waits(pg_engine, "UPDATE agents SET token_hash = :h WHERE id = :i", {"h": "b" * 64, "i": aid})
        assert _waits(pg_engine, "DELETE FROM agents WHERE id = :i", {"i": aid})
        holder.rollback()
    # The batch's transaction holds its row locks; the hand-out's check runs at once.
    with pg_engine.connect() as batch:
        batch.begin()
        sql, params = _seen_batch(aid)
        assert batch.exec_driver_sql(sql, params).rowcount == 1
        assert not _waits(pg_engine, _VALID_TOKEN, check)
        batch.rollback()


class _Listener:
    """A LISTEN connection of the test's own: the payloads that reached it."""

    def __init__(self, engine):
        info = make_url(engine.url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = psycopg.connect(info, autocommit=True)
        self.conn.execute(f"LISTEN {CHANNEL}")

    def heard(self, timeout: float) -> list[tuple[int, str]]:
        """(the notifying backend's pid, the payload) of each notification heard within `timeout` s."""
        return [(n.pid, n.payload) for n in self.conn.notifies(timeout=timeout)]

    def close(self):
        self.conn.close()


async def _in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_wake_ups_are_sent_after_the_commit_and_not_by_the_changing_transaction(pg_engine):
    w = Wakeups(pg_engine)
    listener = _Listener(pg_engine)
    changers = set()  # the backends of the changing transactions

    def change(kind, key, fail=False):
        with w.transaction() as conn:
            changers.add(conn.execute(text("SELECT pg_backend_pid()")).scalar())
            w.notify(conn, kind, key)
            if fail:
                raise RuntimeError("rolled back")

    async def main():
        w.loop = asyncio.get_running_loop()
        sender = asyncio.create_task(w.send())
        try:
            for i in range(20):
                await _in_thread(change, TASK, i)
            with pytest.raises(RuntimeError):
                await _in_thread(change, AGENT, 99, True)
            assert await w.drain(5)
        finally:
            sender.cancel()

    asyncio.run(main())
    try:
        heard = listener.heard(2)
    finally:
        listener.close()
    keys = {item for _, p in heard for item in p.split()[1:]}
    assert keys == {f"t:{i}" for i in range(20)}  # each committed key, none rolled back
    assert all(p.split()[0] == w.replica for _, p in heard)
    senders = {pid for pid, _ in heard}
    assert len(senders) == 1 and not senders & changers  # one sender; no changing transaction notified


def test_a_sender_that_lost_its_connection_sends_the_pending_keys_when_back(pg_engine):
    w = Wakeups(pg_engine)
    listener = _Listener(pg_engine)

    def change(key):
        with w.transaction() as conn:
            w.notify(conn, TASK, key)

    def kill_sender():
        with pg_engine.begin() as conn:
            return conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'SELECT pg_notify%' AND pid <> pg_backend_pid()"
                )
            ).scalar()

    async def main():
        w.loop = asyncio.get_running_loop()
        sender = asyncio.create_task(w.send())
        try:
            await _in_thread(change, 1)
            assert await w.drain(5)
            assert await _in_thread(kill_sender) == 1
            await _in_thread(change, 2)  # the send fails on the dead connection ...
            assert await w.drain(10)  # ... and goes again once it reconnected
        finally:
            sender.cancel()

    asyncio.run(main())
    try:
        keys = {item for _, p in listener.heard(2) for item in p.split()[1:]}
    finally:
        listener.close()
    assert keys == {"t:1", "t:2"}


def test_without_a_server_loop_the_changing_transaction_notifies_at_its_commit(pg_engine):
    """A command-line tool has no loop and no sender: its transaction notifies, at its commit."""
    w = Wakeups(pg_engine)
    listener = _Listener(pg_engine)
    try:
        with w.transaction() as conn:
            changer = conn.execute(text("SELECT pg_backend_pid()")).scalar()
            for i in range(1000):  # past one payload's limit: several notifications
                w.notify(conn, TASK, 10_000 + i)
        heard = listener.heard(2)
    finally:
        listener.close()
    assert {pid for pid, _ in heard} == {changer} and len(heard) >= 2
    assert {item for _, p in heard for item in p.split()[1:]} == {f"t:{10_000 + i}" for i in range(1000)}
