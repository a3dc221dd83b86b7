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

from server.settings import Settings

SETTINGS_ENV = "SLY_SERVER_SETTINGS"   # how a --workers parent hands its settings to the worker processes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server", description="sly-agent reference task server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--data", default="server-data", help="data dir: SQLite db, blobs, admin_token (default ./server-data)")
    p.add_argument("--db", default=None, help="SQLAlchemy database URL (default: SQLite in the data dir)")
    p.add_argument("--db-pool-size", type=int, default=None,
                   help="database connections per process, and threads doing database work (default: 1 on SQLite, "
                        "which takes one writer at a time, 10 on PostgreSQL)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes on this port (more than 1 needs PostgreSQL: --db postgresql+psycopg://...)")
    p.add_argument("--log-page-bytes", type=int, default=Settings.log_page_bytes,
                   help="a log page or live-log batch stops past this many bytes (at least one line; default 1 MiB)")
    p.add_argument("--lease-s", type=float, default=300.0, help="a leased task whose agent is silent this long becomes lost")
    p.add_argument("--telemetry-interval-s", type=float, default=5.0, help="agents' telemetry interval; offline after 3 missed")
    p.add_argument("--offline-after-s", type=float, default=None, help="override: offline after this many silent seconds")
    p.add_argument("--telemetry-full-s", type=float, default=3600.0, help="telemetry history: every point for this long")
    p.add_argument("--telemetry-keep-s", type=float, default=86400.0,
                   help="telemetry history: one point a minute after --telemetry-full-s, until this age")
    p.add_argument("--telemetry-min-gap-s", type=float, default=None,
                   help="telemetry history: at most one point per node per this (default: half the interval)")
    p.add_argument("--log-retention-days", type=float, default=0.0,
                   help="delete the log lines of tasks that ended this many days ago (0: keep forever)")
    p.add_argument("--contact-flush-s", type=float, default=1.0,
                   help="nodes' contact, lease renewals, telemetry and open-poll rows are written in one batch this "
                        "often (default 1 s; at most 5 s, or a third of the offline window and of the lease where "
                        "those are longer; a crash loses at most this much of them)")
    p.add_argument("--housekeeping-s", type=float, default=60.0, help="how often retention and pruning run")
    p.add_argument("--log-quota-bytes", type=int, default=256 * 1024 * 1024,
                   help="log bytes stored per task; past it one marker line, later lines dropped (0: none; default 256 MiB)")
    p.add_argument("--blob-quota-bytes", type=int, default=0,
                   help="bytes the blob store may hold; an upload past it gets 507 (default 0: no quota)")
    p.add_argument("--blob-grace-s", type=float, default=24 * 3600.0,
                   help="unreferenced blobs and partial uploads older than this are deleted (default 86400)")
    p.add_argument("--agent-image", default="sly-agent:latest", help="image name in the docker run_command")
    p.add_argument("--public-url", default=None, help="server address for agents (run_command); default: the request's URL")
    p.add_argument("--echo-endpoint", action="store_true",
                   help="mount POST /api/v1/_echo, which reads a body and discards it (benchmarks only)")
    p.add_argument("--metrics-token", default=os.environ.get("SERVER_METRICS_TOKEN") or None,
                   help="/metrics answers only 'Authorization: Bearer <this>' (env SERVER_METRICS_TOKEN); "
                        "default: /metrics is open")
    p.add_argument("--docs", action="store_true",
                   help="serve the Swagger UI at /docs (it loads its assets from a CDN); /openapi.json is always served")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


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
    os.umask(0o077)     # every file and directory the server makes is its own user's only
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from setproctitle import setproctitle
        setproctitle(f"sly-server: {a.host}:{a.port}")
    except ImportError:
        pass
    settings = Settings(data_dir=Path(a.data), db_url=a.db, lease_s=a.lease_s, telemetry_interval_s=a.telemetry_interval_s,
                        offline_after_s=a.offline_after_s, agent_image=a.agent_image, public_url=a.public_url,
                        echo_endpoint=a.echo_endpoint, telemetry_full_s=a.telemetry_full_s,
                        telemetry_keep_s=a.telemetry_keep_s, telemetry_min_gap_s=a.telemetry_min_gap_s,
                        log_retention_days=a.log_retention_days, housekeeping_s=a.housekeeping_s,
                        contact_flush_s=a.contact_flush_s,
                        metrics_token=a.metrics_token, docs=a.docs,
                        db_pool_size=a.db_pool_size, workers=a.workers, log_page_bytes=a.log_page_bytes,
                        log_quota_bytes=a.log_quota_bytes, blob_quota_bytes=a.blob_quota_bytes,
                        blob_grace_s=a.blob_grace_s)
    if (a.db_pool_size is not None and a.db_pool_size < 1) or a.workers < 1 or a.log_page_bytes < 1:
        sys.exit("sly-server: --db-pool-size, --workers and --log-page-bytes must be at least 1")
    most = max(5.0, min(settings.offline_after, settings.lease_s) / 3)   # 5 s with the defaults
    if not 0.01 <= a.contact_flush_s <= most:
        sys.exit(f"sly-server: --contact-flush-s must be between 0.01 and {most:g}: 5 s, or a third of the offline "
                 f"window (--offline-after-s) and of the lease (--lease-s) where those are longer")
    from server.auth import ConfigError
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
        _Server(uvicorn.Config(app, **common), app.state.core).run()
        return
    if settings.database_url.startswith("sqlite"):
        sys.exit("sly-server: --workers above 1 needs PostgreSQL (--db postgresql+psycopg://...); SQLite serves "
                 "one process, and wake-ups between processes go through PostgreSQL's LISTEN/NOTIFY")
    # Once, here, before the workers exist: the admin token (generated on first start) and the schema.
    from server import db, migrate
    from server.auth import load_admin_token
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.admin_token = settings.admin_token or load_admin_token(settings.data_dir)
    engine = db.make_engine(settings.database_url, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    raw = dataclasses.asdict(settings)
    raw.update(data_dir=str(settings.data_dir), migrate=False, admin_token=None)   # each worker reads it as the parent did
    os.environ[SETTINGS_ENV] = json.dumps(raw)
    uvicorn.run("server.__main__:worker_app", factory=True, workers=a.workers, **common)


class _Server(uvicorn.Server):
    """uvicorn's server, which first releases the requests that wait (long-polls, log followers)
    when it shuts down: otherwise they run into the graceful-shutdown timeout and are cancelled."""

    def __init__(self, config: uvicorn.Config, core):
        super().__init__(config)
        self.core = core

    async def shutdown(self, sockets=None) -> None:
        self.core.close_waits()
        await super().shutdown(sockets)


if __name__ == "__main__":
    main()
