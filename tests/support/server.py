"""Run the real reference server as a subprocess on a free loopback port.

The database: SQLite in the server's data dir, unless `SLY_TEST_DB_URL` names a PostgreSQL
database (`postgresql+psycopg://postgres@127.0.0.1:55432/sly`, as `.ci/pg-up.sh` prints). Then
every ServerProcess gets a fresh database of its own on that cluster, created on its first start
and dropped by close() (or, at the latest, when the process exits).
"""
from __future__ import annotations

import atexit
import itertools
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.procs import free_port, poll_for

REPO = Path(__file__).resolve().parents[2]
TEST_DB_URL = os.environ.get("SLY_TEST_DB_URL", "").strip()
_db_names = itertools.count(1)
_created: set[str] = set()


def db_kind() -> str:
    """'sqlite' or the dialect of SLY_TEST_DB_URL ('postgresql')."""
    return TEST_DB_URL.split(":", 1)[0].split("+", 1)[0] if TEST_DB_URL else "sqlite"


def _admin_engine():
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    # CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(TEST_DB_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _url(name: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(TEST_DB_URL).set(database=name).render_as_string(hide_password=False)


def _drop(conn, name: str) -> None:
    from sqlalchemy import text
    # FORCE: a server killed mid-request may leave a connection behind for a moment.
    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def create_test_database() -> str:
    """A new empty database on the SLY_TEST_DB_URL cluster; its URL."""
    from sqlalchemy import text
    name = f"sly_test_{os.getpid()}_{next(_db_names)}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            _drop(conn, name)
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    _created.add(name)
    return _url(name)


def drop_test_databases(names=None) -> None:
    """Drop the given databases (default: every one this process created and has not dropped yet)."""
    names = list(_created if names is None else names)
    if not names:
        return
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            for name in names:
                _drop(conn, name)
                _created.discard(name)
    finally:
        engine.dispose()


if TEST_DB_URL:
    atexit.register(drop_test_databases)     # what a bench or a crashed fixture did not close()


class ServerProcess:
    """`python -m server` on 127.0.0.1:<port> with its own data dir; stop()/start() keep both."""

    def __init__(self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None,
                 env: dict | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.admin_token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        self._own_db: str | None = None     # the URL of a database made for this server (SLY_TEST_DB_URL)

    @property
    def db_url(self) -> str:
        """The SQLAlchemy URL of this server's database."""
        args = self.extra_args
        if "--db" in args:
            return args[args.index("--db") + 1]
        if TEST_DB_URL:
            if self._own_db is None:
                self._own_db = create_test_database()
            return self._own_db
        return f"sqlite:///{self.data_dir.resolve() / 'server.db'}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SERVER_ADMIN_TOKEN=self.admin_token, PYTHONUNBUFFERED="1", **self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--data", str(self.data_dir), *self._db_args(), *self.extra_args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        poll_for(up, timeout=timeout, what="server /healthz")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _db_args(self) -> list[str]:
        if "--db" in self.extra_args or not TEST_DB_URL:
            return []
        return ["--db", self.db_url]

    def close(self) -> None:
        """stop(), then drop the database made for this server (its data is gone for good)."""
        self.stop()
        if self._own_db is not None:
            from sqlalchemy.engine import make_url
            drop_test_databases([make_url(self._own_db).database])
            self._own_db = None

    def admin(self) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {self.admin_token}"
        return s
