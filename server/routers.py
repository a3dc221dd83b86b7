"""Every router of the server, in one list: one per resource package and side.

Agent side (header x-token): `agents.agent_router` (connect, long-poll), `tasks.agent_router`
(state, results, release), `logs.agent_router` (log batches), `telemetry.agent_router`, and the
agent halves of `blobs.router` and `blobs.bulk_router` (many blobs per request). User side (Bearer
admin token or console session): `auth.router` (console sign-in), `agents.router` (nodes),
`projects.router`, `models.router`, `tasks.router`, `logs.router` (reading and following a task's
log), `blobs.thumbs_router` (the console's thumbnails), `files.router` (team files) and the user
halves of `blobs.router` and `blobs.bulk_router`; then the console's pages. `http.echo` holds the
benchmark's echo endpoint, mounted only when the settings ask for it.
"""

from __future__ import annotations

from fastapi import FastAPI

from server.settings import Settings


def include_all(app: FastAPI, settings: Settings) -> None:
    """Mount every router of the protocol on `app` (the echo endpoint only when enabled)."""
    from server.agents import agent_router as agent_poll
    from server.agents import router as agents
    from server.auth import router as sessions
    from server.blobs import bulk_router as bulk_blobs
    from server.blobs import router as blobs
    from server.blobs import thumbs_router
    from server.console import router as console
    from server.files import router as team_files
    from server.http import echo
    from server.http.errors import ERROR_RESPONSES
    from server.logs import agent_router as agent_logs
    from server.logs import router as task_logs
    from server.models import router as models
    from server.projects import router as projects
    from server.public import router as public_api
    from server.tasks import agent_router as agent_tasks
    from server.tasks import router as tasks
    from server.telemetry import agent_router as agent_telemetry

    for module in (
        agent_poll,
        agent_tasks,
        agent_logs,
        agent_telemetry,
        sessions,
        agents,
        projects,
        models,
        tasks,
        task_logs,
        thumbs_router,
        team_files,
    ):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(blobs.agent_router, responses=ERROR_RESPONSES)
    app.include_router(blobs.user_router, responses=ERROR_RESPONSES)
    app.include_router(bulk_blobs.agent_router, responses=ERROR_RESPONSES)
    app.include_router(bulk_blobs.user_router, responses=ERROR_RESPONSES)
    app.include_router(public_api.router)  # the Supervisely public API subset for Apps (server/public/)
    if settings.echo_endpoint:
        app.include_router(echo.router)
    app.include_router(console)  # the web console's pages (server/console/)
