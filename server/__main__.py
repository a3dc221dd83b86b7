"""`python -m server --host 127.0.0.1 --port 8700 --data DIR [--db URL] [--lease-s 300]`"""
from __future__ import annotations

import argparse
import logging
import os
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


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.telemetry_history < 1:
        raise SystemExit("python -m server: --telemetry-history must be at least 1")
    os.umask(0o077)     # every file and directory the server makes is its own user's only
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from setproctitle import setproctitle
        setproctitle(f"sly-server: {a.host}:{a.port}")
    except ImportError:
        pass
    settings = Settings(data_dir=Path(a.data), db_url=a.db, lease_s=a.lease_s, telemetry_interval_s=a.telemetry_interval_s,
                        offline_after_s=a.offline_after_s, agent_image=a.agent_image, public_url=a.public_url,
                        telemetry_history=a.telemetry_history, echo_endpoint=a.echo_endpoint,
                        metrics_token=a.metrics_token, docs=a.docs)
    from server.app import create_app
    app = create_app(settings)
    # Access logs are off: they would only repeat paths; tokens never travel in URLs anyway.
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                            timeout_graceful_shutdown=3)
    _Server(config, app.state.core).run()


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
