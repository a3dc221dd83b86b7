"""`python -m server --host 127.0.0.1 --port 8700 --data DIR [--db URL] [--lease-s 300]`"""
from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--telemetry-full-s", type=float, default=3600.0, help="telemetry history: every point for this long")
    p.add_argument("--telemetry-keep-s", type=float, default=86400.0,
                   help="telemetry history: one point a minute after --telemetry-full-s, until this age")
    p.add_argument("--telemetry-min-gap-s", type=float, default=None,
                   help="telemetry history: at most one point per node per this (default: half the interval)")
    p.add_argument("--log-retention-days", type=float, default=0.0,
                   help="delete the log lines of tasks that ended this many days ago (0: keep forever)")
    p.add_argument("--housekeeping-s", type=float, default=60.0, help="how often retention and pruning run")
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
                        echo_endpoint=a.echo_endpoint, telemetry_full_s=a.telemetry_full_s,
                        telemetry_keep_s=a.telemetry_keep_s, telemetry_min_gap_s=a.telemetry_min_gap_s,
                        log_retention_days=a.log_retention_days, housekeeping_s=a.housekeeping_s)
    from server.app import create_app
    app = create_app(settings)
    # Access logs are off: they would only repeat paths; tokens never travel in URLs anyway.
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
