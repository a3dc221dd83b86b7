"""The FastAPI application: `create_app(settings)`."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import logfilter, routes
from server.auth import load_admin_token
from server.core import Core
from server.errors import BodyLimitMiddleware, install_error_handlers
from server.settings import Settings
from server.retention import run_housekeeper
from server.tasks import reap_lost

log = logging.getLogger("sly-server")


async def _reaper(core: Core) -> None:
    """Turn leased tasks of silent agents into `lost`, checking a few times per lease."""
    every = max(0.2, min(5.0, core.settings.lease_s / 4))
    while True:
        await asyncio.sleep(every)
        try:
            lost = reap_lost(core)
            if lost:
                log.warning("tasks lost (agent silent past the lease): %s", lost)
        except Exception:  # noqa: BLE001 - the reaper must outlive a failed round
            log.exception("lease reaper round failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.data_dir = Path(settings.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not settings.admin_token:
        settings.admin_token = load_admin_token(settings.data_dir)
    core = Core(settings)
    logfilter.install()   # here, not in __main__: every worker process builds its own app

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # The agents could not reach a stopped server: give every leased task a full lease to reconnect.
        core.renew_all_leases()
        reaper = asyncio.create_task(_reaper(core))
        housekeeper = asyncio.create_task(run_housekeeper(core))
        try:
            yield
        finally:
            reaper.cancel()
            housekeeper.cancel()
            core.engine.dispose()

    app = FastAPI(title="sly-agent task server", version="1", lifespan=lifespan,
                  description="Protocol v1: agent side (x-token) and user side (Bearer admin token). See docs/protocol.md.")
    app.state.core = core
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"ok": True}

    @app.get("/metrics", tags=["ops"])
    async def metrics(request: Request):
        core.refresh_metrics()
        return Response(generate_latest(core.registry), media_type=CONTENT_TYPE_LATEST)

    routes.include_all(app, settings)
    from server.console import router as console_router
    app.include_router(console_router)
    return app
