"""`python -m server --host 127.0.0.1 --port 8700 --data DIR [--db URL] [--workers N]`"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
from pathlib import Path

import uvicorn

from server.settings import Settings, options

SETTINGS_ENV = "SLY_SERVER_SETTINGS"  # how a --workers parent hands its settings to the worker processes


_TYPES = {"int": int, "float": float, "str": str, "Path": Path}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: --host, --port and --log-level, then one option per setting (server.settings)."""
    p = argparse.ArgumentParser(prog="python -m server", description="sly-agent reference task server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    for f in options():
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        env = f.metadata["env"]
        default = (os.environ.get(env) if env else None) or f.default
        kind = f.type.split(" | ")[0]  # "int | None" -> "int" (annotations are strings here)
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(
                flag,
                dest=f.name,
                type=_TYPES[kind],
                default=default,
                help=f.metadata["help"],
                metavar=flag[2:].upper().replace("-", "_"),
            )
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def settings_of(a: argparse.Namespace) -> Settings:
    """The settings a parsed command line gives."""
    return Settings(**{f.name: getattr(a, f.name) for f in options()})


def tune_runtime() -> None:
    """The interpreter's settings for a server under load (measured: docs/benchmarks.md, Fleet).

    - The garbage collector's first generation is collected every 50,000 allocations instead of
      700: a request allocates thousands of short-lived objects, and each collection also walks
      the long-lived ones promoted so far. `freeze_heap()` moves what exists once the app is
      built (modules, routes, schemas) out of the collector's sight for good.
    - The GIL is handed over every 0.5 ms instead of 5 ms: the database threads release it at
      every statement and otherwise wait up to 5 ms to get it back from a busy event loop.
    """
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(0.0005)


def freeze_heap() -> None:
    gc.collect()
    gc.freeze()


def worker_app():
    """The app of one `--workers` process, made from the settings its parent put in the environment."""
    tune_runtime()
    raw = json.loads(os.environ[SETTINGS_ENV])
    raw["data_dir"] = Path(raw["data_dir"])
    from server.app import create_app

    app = create_app(Settings(**raw))
    freeze_heap()
    return app


def main(argv=None) -> None:
    a = parse_args(argv)
    tune_runtime()
    os.umask(0o077)  # every file and directory the server makes is its own user's only
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from setproctitle import setproctitle

        setproctitle(f"sly-server: {a.host}:{a.port}")
    except ImportError:
        pass
    settings = settings_of(a)
    for problem in settings.problems():
        sys.exit(f"sly-server: {problem}")
    from protocol.errors import ConfigError

    try:
        serve(a, settings)
    except ConfigError as e:
        print(f"sly-server: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def serve(a, settings: Settings) -> None:
    """Run the app in this process, or in `--workers` uvicorn processes (PostgreSQL only)."""
    # Access logs are off: they would only repeat paths; tokens never travel in URLs anyway.
    common = dict(host=a.host, port=a.port, log_level=a.log_level, access_log=False, timeout_graceful_shutdown=3)
    if a.workers == 1:
        from server.app import create_app

        app = create_app(settings)
        freeze_heap()
        _Server(uvicorn.Config(app, **common), app.state.server).run()
        return
    if settings.database_url.startswith("sqlite"):
        sys.exit(
            "sly-server: --workers above 1 needs PostgreSQL (--db postgresql+psycopg://...); SQLite serves "
            "one process, and wake-ups between processes go through PostgreSQL's LISTEN/NOTIFY"
        )
    # Once, here, before the workers exist: the admin token (generated on first start) and the schema.
    from server import db
    from server.auth.service import load_admin_token
    from server.db import migrate

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.admin_token = settings.admin_token or load_admin_token(settings.data_dir)
    engine = db.make_engine(settings.database_url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    raw = dataclasses.asdict(settings)
    raw.update(
        data_dir=str(settings.data_dir), migrate=False, admin_token=None
    )  # each worker reads it as the parent did
    os.environ[SETTINGS_ENV] = json.dumps(raw)
    uvicorn.run("server.__main__:worker_app", factory=True, workers=a.workers, **common)


class _Server(uvicorn.Server):
    """uvicorn's server, which first releases the requests that wait (long-polls, log followers)
    when it shuts down: otherwise they run into the graceful-shutdown timeout and are cancelled."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None) -> None:
        self.state.close_waits()
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
