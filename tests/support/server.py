"""Run the real reference server on a free loopback port: on a thread of the test process
(ServerThread, the default: no interpreter start, no imports, about 0.1 s) or as a subprocess
(ServerProcess: where a test signals, kills or measures the process itself, or sets its environment).

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
import threading
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
    atexit.register(drop_test_databases)  # what a bench or a crashed fixture did not close()


class ServerProcess:
    """`python -m server` on 127.0.0.1:<port> with its own data dir; stop()/start() keep both."""

    def __init__(
        self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None, env: dict | None = None
    ):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.admin_token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        self.extra_args = extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        self._own_db: str | None = None  # the URL of a database made for this server (SLY_TEST_DB_URL)

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

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SERVER_ADMIN_TOKEN=self.admin_token, PYTHONUNBUFFERED="1", **self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data",
                str(self.data_dir),
                *self._db_args(),
                *self.extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
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


class ServerThread(ServerProcess):
    """The real app (server.app.create_app) served by uvicorn on a thread of this process, with the
    settings `python -m server` would take from the same arguments. stop()/start() keep the port and
    the data. What it cannot do: a separate environment (`env`), signals, a process to kill or to
    measure; use ServerProcess for those."""

    def __init__(
        self, data_dir: Path, port: int | None = None, extra_args: list[str] | None = None, env: dict | None = None
    ):
        if env:
            raise ValueError("ServerThread shares this process's environment: use ServerProcess for env")
        super().__init__(data_dir, port=port, extra_args=extra_args)
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> ServerThread:
        import uvicorn

        from server.__main__ import _Server, parse_args, settings_of
        from server.app import create_app

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = parse_args(
            [
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data",
                str(self.data_dir),
                *self._db_args(),
                *self.extra_args,
            ]
        )
        settings = settings_of(args)
        problems = settings.problems()
        if problems:
            raise ValueError("; ".join(problems))
        settings.admin_token = self.admin_token
        app = create_app(settings)
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=3,
            lifespan="on",
        )
        self._server = _Server(config, app.state.server)
        self._thread = threading.Thread(target=self._server.run, name=f"server-{self.port}", daemon=True)
        self._thread.start()

        def up():
            if not self._thread.is_alive():
                raise RuntimeError("the server thread ended before it served (see the captured log)")
            return self._server.started

        poll_for(up, timeout=timeout, what="server started")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        self._thread = self._server = None

    @property
    def proc(self):
        """No process of its own (ServerProcess's `proc`)."""
        return None

    @proc.setter
    def proc(self, value) -> None:
        if value is not None:
            raise AttributeError("a ServerThread has no process")


# ServerThread unless SLY_TEST_SERVER=process (then every fixture server is a subprocess, as a
# deployment runs it: a check that the thread and the process behave alike).
IN_THREAD = os.environ.get("SLY_TEST_SERVER", "thread") != "process"


def fixture_server(data_dir: Path, *, process: bool = False, **kw) -> ServerProcess:
    """A server for a fixture: a ServerThread, or a ServerProcess where `process` (the test is marked
    `server_process`), an `env` is given, or SLY_TEST_SERVER=process."""
    use_process = process or kw.get("env") or not IN_THREAD
    return (ServerProcess if use_process else ServerThread)(data_dir, **kw)


def dataset_counts(datasets: list[dict]) -> list[dict]:
    """A project's `datasets` summary without the dataset ids: [{name, items_count}]."""
    return [{"name": d["name"], "items_count": d["items_count"]} for d in datasets]
