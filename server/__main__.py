"""`python -m server --host 127.0.0.1 --port 8700 --data DIR [--db URL] [--lease-s 300]`"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from server.settings import Settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server", description="sly-agent reference task server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--data", default="server-data", help="data dir: SQLite db, blobs, admin_token (default ./server-data)")
    p.add_argument("--db", default=None, help="SQLAlchemy database URL (default: SQLite in the data dir)")
    p.add_argument("--lease-s", type=float, default=300.0, help="a leased task whose agent is silent this long becomes lost")
    p.add_argument("--telemetry-interval-s", type=float, default=5.0, help="agents' telemetry interval; offline after 3 missed")
    p.add_argument("--offline-after-s", type=float, default=None, help="override: offline after this many silent seconds")
    p.add_argument("--telemetry-history", type=int, default=720, help="telemetry samples kept per agent for charts")
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
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from setproctitle import setproctitle
        setproctitle(f"sly-server: {a.host}:{a.port}")
    except ImportError:
        pass
    settings = Settings(data_dir=Path(a.data), db_url=a.db, lease_s=a.lease_s, telemetry_interval_s=a.telemetry_interval_s,
                        offline_after_s=a.offline_after_s, agent_image=a.agent_image, public_url=a.public_url,
                        telemetry_history=a.telemetry_history, echo_endpoint=a.echo_endpoint,
                        log_quota_bytes=a.log_quota_bytes, blob_quota_bytes=a.blob_quota_bytes,
                        blob_grace_s=a.blob_grace_s)
    from server.app import create_app
    from server.auth import ConfigError
    try:
        app = create_app(settings)
    except ConfigError as e:
        print(f"sly-server: cannot start: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # Access logs are off: they would only repeat paths; tokens never travel in URLs anyway.
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
