"""The FastAPI application: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from protocol.endpoints import AUTHORIZATION_HEADER, BEARER
from protocol.errors import APIError
from server import db, routers
from server.auth.service import check_admin_token_length, load_admin_token
from server.blobs import refs as blob_refs
from server.http import logfilter
from server.http.errors import ERROR_RESPONSES, BodyLimitMiddleware, install_error_handlers
from server.http.fastpath import TelemetryFastPath
from server.http.strict import SafeJSONResponse
from server.settings import Settings
from server.state import ServerState
from server.tasks import service as tasks_service
from server.tasks.lost import reap_lost
from server.tasks.retention import run_housekeeper

log = logging.getLogger("sly-server")


async def _reaper(state: ServerState) -> None:
    """Turn leased tasks of silent agents into `lost`, checking a few times per lease."""
    every = max(0.2, min(5.0, state.settings.lease_s / 4))
    while True:
        await asyncio.sleep(every)
        try:
            lost = await state.db.run(reap_lost, state)
            if lost:
                log.warning("tasks lost (agent silent past the lease): %s", lost)
        except Exception:  # noqa: BLE001 - the reaper must outlive a failed round
            log.exception("lease reaper round failed")


def _warm_routes(app) -> None:
    """Have every route built before the first request. FastAPI builds an included router's
    routes (their parameter and body validators) when a request first reaches that router: that
    request waited 60-70 ms longer, among them a fresh replica's first task creation."""
    scope = {"type": "http", "path": "/", "root_path": "", "method": "GET", "headers": [], "query_string": b""}
    for route in app.router.routes:
        route.matches(scope)


async def _contact_writer(state: ServerState) -> None:
    """Write the batched contact, leases, telemetry and poll rows (server/agents/contact.py) every interval."""
    failures = 0
    while True:
        await asyncio.sleep(state.settings.contact_flush_s)
        try:
            await state.db.run(state.contacts.flush)
            failures = 0
        except Exception:  # noqa: BLE001 - the batch is kept and written at a later round
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:  # a database away for long logs now and then
                log.exception("writing the contact batch failed (%d in a row); it is kept and retried", failures)


async def _checkpointer(state: ServerState) -> None:
    """SQLite: checkpoint the WAL every second on the read thread, never at a writer's commit."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await state.db.run_read(db.checkpoint, state.db.engine)
        except Exception:  # noqa: BLE001 - a failed round is retried a second later
            log.exception("WAL checkpoint failed")


def restrict_data_dir(data_dir: Path) -> None:
    """The data dir 0700 and the files in it 0600 (db, WAL, admin_token), also those of older runs.
    Blob files are made 0600 by mkstemp, and the 0700 data dir closes everything under it."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for entry in data_dir.iterdir():
        if entry.is_symlink():
            continue
        os.chmod(entry, 0o700 if entry.is_dir() else 0o600)


def _openapi(app: FastAPI):
    """The schema as the server really answers: errors are 400 {error, detail}, never FastAPI's 422."""

    def build():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return build


LAG_EVERY_S = 0.25
LAG_WARN_S = 1.0


async def _loop_watch(state: ServerState) -> None:
    """How late the event loop runs a timer (`sly_event_loop_lag_seconds`): every request and
    wake-up of this process waits that long too. A lag past LAG_WARN_S is logged, once a minute
    at most, since a stalled loop is what makes pickups and answers slow."""
    loop = asyncio.get_running_loop()
    warned = 0.0
    while True:
        t0 = loop.time()
        await asyncio.sleep(LAG_EVERY_S)
        lag = max(0.0, loop.time() - t0 - LAG_EVERY_S)
        state.metrics.loop_lag.observe(lag)
        if lag >= LAG_WARN_S and loop.time() - warned >= 60:
            warned = loop.time()
            log.warning("the event loop ran %.1f s late (CPU starved, or a blocking call on it)", lag)


async def _blob_collector(state: ServerState) -> None:
    """Delete unreferenced blobs and partial uploads older than the grace period, now and then."""
    while True:
        await asyncio.sleep(state.settings.blob_gc_every_s)
        try:
            await blob_refs.collect(state)
        except Exception:  # noqa: BLE001 - the collector must outlive a failed round
            log.exception("blob collector round failed")


_NO_OTEL = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.data_dir = Path(settings.data_dir)
    restrict_data_dir(settings.data_dir)
    if not settings.admin_token:
        settings.admin_token = load_admin_token(settings.data_dir)
    check_admin_token_length(settings.admin_token, "the admin token")
    state = ServerState(settings)
    restrict_data_dir(settings.data_dir)  # again: the database files exist now
    logfilter.install()  # here, not in __main__: every worker process builds its own app

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # The agents could not reach a stopped server: give every leased task a full lease to reconnect.
        await state.db.run(tasks_service.renew_all_leases, state.db.engine, settings.lease_s)
        _warm_routes(app)
        state.wakeups.loop = asyncio.get_running_loop()
        background = [
            asyncio.create_task(_reaper(state)),
            asyncio.create_task(_blob_collector(state)),
            asyncio.create_task(run_housekeeper(state)),
            asyncio.create_task(_contact_writer(state)),
            asyncio.create_task(_loop_watch(state)),
        ]
        if state.db.engine.dialect.name == "sqlite":
            background.append(asyncio.create_task(_checkpointer(state)))
        if state.wakeups.shared:
            background += [asyncio.create_task(state.wakeups.listen()), asyncio.create_task(state.wakeups.send())]
            # Answer only once other replicas' changes can reach this one (it retries if not yet).
            try:
                await asyncio.wait_for(state.wakeups.listening.wait(), 10)
            except TimeoutError:
                log.warning("the wake-up listener is not connected yet; polls wake at their timeout until it is")
        try:
            yield
        finally:
            if state.wakeups.shared and not await state.wakeups.drain(2.0):
                log.warning(
                    "shutting down with wake-ups not sent to the other replicas; their waiters "
                    "find those changes at their timeout"
                )
            for t in background:
                t.cancel()
            try:
                await state.db.run(state.contacts.flush)  # the last batch: open polls' rows go, contact is kept
            except Exception:  # noqa: BLE001 - a database away at shutdown loses only this batch
                log.exception("writing the last contact batch failed")
            state.db.engine.dispose()

    # /docs (Swagger UI) loads its assets from a CDN: off unless asked for; /openapi.json is always served.
    # FastAPI instruments every request for OpenTelemetry unless told not to; the server exports
    # Prometheus metrics instead.
    app = FastAPI(
        title="sly-agent task server",
        version="1",
        lifespan=lifespan,
        telemetry=_NO_OTEL,
        description="Protocol v1: agent side (x-token) and user side (Bearer admin token). See docs/protocol.md.",
        default_response_class=SafeJSONResponse,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.openapi = _openapi(app)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(TelemetryFastPath, state=state)  # inside the body check: it reads its result
    app.add_middleware(BodyLimitMiddleware, settings=settings)

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"ok": True}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=PlainTextResponse,
        responses={401: ERROR_RESPONSES[401]} if settings.metrics_token else None,
    )
    async def metrics(request: Request):
        """Prometheus text format; with --metrics-token, only for `Authorization: Bearer <that token>`."""
        if settings.metrics_token:
            auth = request.headers.get(AUTHORIZATION_HEADER, "")
            given = auth[len(BEARER) :].strip() if auth[: len(BEARER)].lower() == BEARER.lower() else ""
            if not hmac.compare_digest(given.encode(), settings.metrics_token.encode()):
                raise APIError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <metrics token>'")
        await state.db.run(state.refresh_metrics)
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routers.include_all(app, settings)
    return app
