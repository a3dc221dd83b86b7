"""Schema migrations: head matches the tables the server queries, and a database made before
migrations existed is adopted (stamped, upgraded) by a starting server with its rows kept."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from server import db
from server.auth.service import hash_token
from server.db import migrate
from tests.support.fake_agent import FakeAgent
from tests.support.server import ServerProcess, dataset_counts

PRE_ALEMBIC_SQL = Path(__file__).parent / "data" / "pre_alembic_schema.sql"


def _engine(path: Path):
    return db.make_engine(f"sqlite:///{path}")


def _schema(path: Path) -> dict:
    """The parts of a SQLite schema that matter: per table its columns, keys, indexes and rowid-ness."""
    engine = _engine(path)
    try:
        with engine.connect() as conn:
            insp = inspect(conn)
            out = {}
            for t in sorted(set(insp.get_table_names()) - {"alembic_version"}):
                sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = ?", (t,)).scalar()
                out[t] = {
                    "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
                    "pk": insp.get_pk_constraint(t)["constrained_columns"],
                    "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(t)),
                    "indexes": sorted(
                        (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(t)
                    ),
                    "without_rowid": "WITHOUT ROWID" in sql.upper(),
                }
            return out
    finally:
        engine.dispose()


def _pre_alembic_db(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript(PRE_ALEMBIC_SQL.read_text())


def test_head_matches_the_tables_the_server_queries(tmp_path):
    engine = _engine(tmp_path / "head.db")
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.metadata) == []
    engine.dispose()


def test_revision_0001_is_the_schema_create_all_made_before_migrations(tmp_path):
    _pre_alembic_db(tmp_path / "old.db")
    engine = _engine(tmp_path / "new.db")
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), migrate.INITIAL)
    engine.dispose()
    old, new = _schema(tmp_path / "old.db"), _schema(tmp_path / "new.db")
    assert set(old) == migrate.INITIAL_TABLES
    assert new == old
    assert old["log_lines"]["without_rowid"] and old["tasks"]["indexes"]


def test_upgrade_is_idempotent_and_refuses_a_database_it_did_not_make(tmp_path):
    engine = _engine(tmp_path / "twice.db")
    migrate.upgrade(engine)
    migrate.upgrade(engine)
    engine.dispose()
    with sqlite3.connect(tmp_path / "twice.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head(),)]

    with sqlite3.connect(tmp_path / "half.db") as conn:
        conn.execute("CREATE TABLE agents (id INTEGER PRIMARY KEY)")
    engine = _engine(tmp_path / "half.db")
    with pytest.raises(migrate.SchemaError):
        migrate.upgrade(engine)
    engine.dispose()


def test_postgresql_sql_renders(tmp_path):
    out = io.StringIO()
    cfg = migrate.alembic_config()
    cfg.output_buffer = out
    cfg.set_main_option("sqlalchemy.url", "postgresql://sly@db.invalid/sly")
    command.upgrade(cfg, "head", sql=True)
    sql = out.getvalue()
    for table in migrate.INITIAL_TABLES:
        assert f"CREATE TABLE {table} " in sql
    assert "CREATE INDEX ix_tasks_state ON tasks (state)" in sql
    assert (
        f"UPDATE alembic_version SET version_num='{migrate.head()}'" in sql
        or f"INSERT INTO alembic_version (version_num) VALUES ('{migrate.head()}')" in sql
    )


@pytest.mark.slow
@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_server_adopts_a_pre_migration_database_and_keeps_its_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    dbfile = data / "server.db"
    _pre_alembic_db(dbfile)
    now = time.time()
    token = "A" * 32
    j = json.dumps
    with sqlite3.connect(dbfile) as conn:
        conn.execute(
            "INSERT INTO agents (id, name, token_hash, allowed_task_types, created_at, last_seen, system_info,"
            " telemetry, telemetry_ts) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                1,
                "old-node",
                hash_token(token),
                j(["train", "custom"]),
                now - 100,
                now - 5,
                j({"hostname": "h1"}),
                j({"cpu": 12.5}),
                now - 5,
            ),
        )
        conn.execute(
            "INSERT INTO projects (id, name, datasets, task_id, created_at) VALUES (?,?,?,?,?)",
            (
                1,
                "old-project",
                j([{"name": "ds0", "items": [{"name": "a.jpg", "sha256": "0" * 64, "size": 3}]}]),
                None,
                now - 90,
            ),
        )
        conn.execute(
            "INSERT INTO models (id, name, hash, files, task_id, created_at) VALUES (?,?,?,?,?,?)",
            (1, "old-model", "f" * 64, j([{"path": "w.bin", "sha256": "1" * 64, "size": 4}]), None, now - 80),
        )
        timeline = [
            {"state": "queued", "ts": now - 60},
            {"state": "assigned", "ts": now - 59},
            {"state": "running", "ts": now - 58},
        ]
        conn.execute(
            "INSERT INTO tasks (id, agent_id, type, image, command, config, project_id, model_id, resources,"
            " timeout_s, state, progress, exit_code, error, stop_requested, lease_until, timeline, results,"
            " log_acked, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                7,
                1,
                "train",
                "img:1",
                j(["python", "t.py"]),
                j({"epochs": 3}),
                1,
                1,
                j({"gpus": 0, "cpus": None, "memory": None, "shm_size": None}),
                None,
                "running",
                j({"current": 1, "total": 3}),
                None,
                None,
                0,
                now - 1,
                j(timeline),
                j({"artifacts": []}),
                2,
                now - 60,
                now - 58,
            ),
        )
        conn.executemany(
            "INSERT INTO log_lines (task_id, seq, ts, level, stream, message, extra) VALUES (?,?,?,?,?,?,?)",
            [(7, s, now - 50 + s, "info", "stdout", f"old line {s}", j({"cts": s})) for s in range(3)],
        )
        conn.execute("INSERT INTO telemetry (agent_id, ts, sample) VALUES (?,?,?)", (1, now - 5, j({"cpu": 12.5})))

    srv = ServerProcess(data).start()
    try:
        admin = srv.admin()
        agents = admin.get(srv.url + "/api/v1/agents", timeout=10).json()["items"]
        assert [(a["id"], a["name"], a["running_tasks"]) for a in agents] == [(1, "old-node", 1)]
        assert admin.get(srv.url + "/api/v1/agents/1", timeout=10).json()["system_info"] == {"hostname": "h1"}
        task = admin.get(srv.url + "/api/v1/tasks/7", timeout=10).json()
        assert task["state"] == "running" and task["config"] == {"epochs": 3}
        assert [s["state"] for s in task["timeline"]] == ["queued", "assigned", "running"]
        lines = admin.get(srv.url + "/api/v1/tasks/7/logs", timeout=10).json()["lines"]
        assert [(ln["seq"], ln["message"], ln["cts"]) for ln in lines] == [(s, f"old line {s}", s) for s in range(3)]
        assert admin.get(srv.url + "/api/v1/projects/1", timeout=10).json()["name"] == "old-project"
        assert admin.get(srv.url + "/api/v1/models/1", timeout=10).json()["name"] == "old-model"
        # 0005_telemetry drops the old whole samples; the next one the node posts refills them.
        assert admin.get(srv.url + "/api/v1/agents/1/telemetry", timeout=10).json()["items"] == []

        agent = FakeAgent(srv.url, token, 1)  # the stored token hash still works
        assert agent.poll(free_slots=1, running=[7])["tasks"] == []
        assert agent.logs_raw(7, 3, [{"message": "new line"}]).json() == {"acked": 3}
        assert agent.post_raw("/agent/v1/telemetry", json={"cpu": 12.5}).status_code == 200
        assert [p["cpu"] for p in admin.get(srv.url + "/api/v1/agents/1/telemetry", timeout=10).json()["items"]] == [
            12.5
        ]
        new_task = admin.post(
            srv.url + "/api/v1/tasks", json={"agent_id": 1, "type": "custom", "image": "x"}, timeout=10
        ).json()
        assert new_task["id"] == 8  # ids continue after the old rows
    finally:
        srv.stop()
    with sqlite3.connect(dbfile) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(migrate.head(),)]
        assert conn.execute("SELECT count(*) FROM log_lines WHERE task_id = 7").fetchone() == (4,)

    srv.start()  # a second start has nothing to do
    try:
        r = requests.get(
            srv.url + "/api/v1/tasks/7", headers={"Authorization": f"Bearer {srv.admin_token}"}, timeout=10
        )
        assert r.json()["log_acked"] == 3
    finally:
        srv.stop()


@pytest.mark.slow  # over 2 s: outside the fast lane
@pytest.mark.sqlite_only("it reads or writes the SQLite file in the data dir directly")
def test_0002_moves_existing_project_items_into_project_items_with_empty_annotations(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    engine = _engine(data / "server.db")
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), migrate.INITIAL)
    j = json.dumps
    datasets = [
        {
            "name": "ds0",
            "items": [
                {"name": "a.jpg", "sha256": "0" * 64, "size": 3},
                {"name": "b.jpg", "sha256": "1" * 64, "size": 5},
            ],
        },
        {"name": "empty", "items": []},
        {"name": "ds1", "items": [{"name": "c.jpg", "sha256": "2" * 64, "size": 7}]},
    ]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO projects (id, name, datasets, task_id, created_at) VALUES (?,?,?,?,?)",
            (4, "old-project", j(datasets), None, 1.0),
        )
        conn.exec_driver_sql(
            "INSERT INTO models (id, name, hash, files, task_id, created_at) VALUES (?,?,?,?,?,?)",
            (2, "old-model", "f" * 64, j([{"path": "w.bin", "sha256": "3" * 64, "size": 4}]), 9, 2.0),
        )
    migrate.upgrade(engine)
    empty_ann = {
        "description": "",
        "size": {"height": None, "width": None},
        "tags": [],
        "objects": [],
        "customBigData": {},
    }
    with engine.connect() as conn:
        assert migrate.current(conn) == migrate.head()
        row = conn.exec_driver_sql("SELECT datasets, meta FROM projects WHERE id = 4").one()
        # revision 0008 gave every dataset an id, in order
        assert json.loads(row[0]) == [
            {"name": "ds0", "items_count": 2, "id": 1},
            {"name": "empty", "items_count": 0, "id": 2},
            {"name": "ds1", "items_count": 1, "id": 3},
        ]
        assert conn.exec_driver_sql("SELECT id, project_id, name FROM datasets ORDER BY id").all() == [
            (1, 4, "ds0"),
            (2, 4, "empty"),
            (3, 4, "ds1"),
        ]
        assert json.loads(row[1]) == {"classes": [], "tags": [], "projectType": "images"}
        items = conn.exec_driver_sql(
            "SELECT project_id, dataset, name, sha256, size, ann FROM project_items ORDER BY id"
        ).all()
        assert [tuple(r[:5]) for r in items] == [
            (4, "ds0", "a.jpg", "0" * 64, 3),
            (4, "ds0", "b.jpg", "1" * 64, 5),
            (4, "ds1", "c.jpg", "2" * 64, 7),
        ]
        assert all(json.loads(r[5]) == empty_ann for r in items)
        assert conn.exec_driver_sql("SELECT checkpoint, task_id FROM models WHERE id = 2").one() == (None, 9)
    engine.dispose()

    srv = ServerProcess(data).start()  # the API reads the moved rows
    try:
        admin = srv.admin()
        p = admin.get(srv.url + "/api/v1/projects/4", timeout=10).json()
        assert dataset_counts(p["datasets"]) == [{"name": d["name"], "items_count": len(d["items"])} for d in datasets]
        assert p["meta"]["classes"] == []
        page = admin.get(srv.url + "/api/v1/projects/4/items", params={"limit": 2}, timeout=10).json()
        assert [i["name"] for i in page["items"]] == ["a.jpg", "b.jpg"] and page["next"] is not None
        m = admin.get(srv.url + "/api/v1/models/2", timeout=10).json()
        assert m["checkpoint"] is None and m["task"] is None and m["config"] is None
    finally:
        srv.stop()

    engine = _engine(data / "server.db")  # and back: downgrade restores the old form
    with engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), migrate.INITIAL)
    with engine.connect() as conn:
        assert json.loads(conn.exec_driver_sql("SELECT datasets FROM projects WHERE id = 4").scalar()) == datasets
        assert "project_items" not in inspect(conn).get_table_names()
    engine.dispose()


def test_0006_moves_each_tasks_artifacts_into_rows_and_totals_its_results(tmp_path):
    from server.blobs import refs as blob_refs
    from tests.support.server import TEST_DB_URL, create_test_database, drop_test_databases

    url = create_test_database() if TEST_DB_URL else f"sqlite:///{tmp_path / 'old.db'}"
    engine = db.make_engine(url)
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), "0005_telemetry")
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    arts = [{"path": "x.txt", "sha256": a, "size": 3}, {"path": "y/z.bin", "sha256": b, "size": 5}]
    task = dict(
        agent_id=1,
        type="train",
        config={},
        resources={},
        state="running",
        stop_requested=False,
        timeline=[],
        log_acked=-1,
        created_at=1.0,
        updated_at=1.0,
    )
    with engine.begin() as conn:
        conn.execute(
            db.tasks.insert(),
            [
                dict(task, id=1, results={"model_id": 4, "artifacts": arts}),
                dict(task, id=2, results={"artifacts": []}),
                dict(task, id=3, results={}),
            ],
        )
        conn.execute(
            db.models.insert().values(
                id=4, name="m", hash="f" * 64, task_id=1, created_at=1.0, files=[{"path": "w", "sha256": c, "size": 7}]
            )
        )
        conn.execute(db.projects.insert().values(id=5, name="p", datasets=[], meta={}, task_id=1, created_at=1.0))
        conn.execute(
            db.project_items.insert(),
            [dict(project_id=5, dataset="ds", name=f"{i}.jpg", sha256=c, size=11, ann={}) for i in range(2)],
        )
    try:
        migrate.upgrade(engine)
        t = db.task_artifacts.c
        with engine.begin() as conn:
            assert [tuple(r) for r in conn.execute(db.task_artifacts.select().order_by(t.task_id, t.path))] == [
                (1, "x.txt", a, 3),
                (1, "y/z.bin", b, 5),
            ]
            results = dict(conn.execute(db.tasks.select().order_by(db.tasks.c.id)).mappings().all()[0])["results"]
            assert results == {
                "model_id": 4,
                "artifacts_count": 2,
                "artifacts_bytes": 8,
                "result_files": 5,
                "result_bytes": 8 + 7 + 22,
            }
            empty = {"artifacts_count": 0, "artifacts_bytes": 0, "result_files": 0, "result_bytes": 0}
            assert [
                r
                for (r,) in conn.execute(
                    db.tasks.select()
                    .with_only_columns(db.tasks.c.results)
                    .where(db.tasks.c.id > 1)
                    .order_by(db.tasks.c.id)
                )
            ] == [empty, empty]
            conn.execute(db.blob_refs.delete())  # a database from before blob_refs: filled from the rows
            blob_refs.fill_if_empty(conn)
            assert blob_refs.readable(conn, 1, [a, b, c]) == {a, b}  # task 1 is agent 1's
        with engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), "0005_telemetry")
        with engine.connect() as conn:
            back = conn.execute(
                db.tasks.select().with_only_columns(db.tasks.c.results).where(db.tasks.c.id == 1)
            ).scalar()
            assert back == {"model_id": 4, "artifacts": arts}
            assert "task_artifacts" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()
        if TEST_DB_URL:
            from sqlalchemy.engine import make_url

            drop_test_databases([make_url(url).database])
