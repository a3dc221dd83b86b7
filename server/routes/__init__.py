"""The HTTP routes, one module per resource.

Agent side (header x-token): `agent_poll` (connect, long-poll), `agent_tasks` (state, logs,
results, release), `agent_telemetry`. User side (Bearer admin token or console session):
`sessions` (console sign-in), `agents` (nodes), `projects`, `models`, `tasks`, `task_logs`
(reading and following a task's log), `thumbs` (image thumbnails for the console). `blobs` serves both sides; `debug` holds the benchmark's
echo endpoint, mounted only when the settings ask for it.
"""
from __future__ import annotations

from fastapi import FastAPI

from server.settings import Settings


def include_all(app: FastAPI, settings: Settings) -> None:
    """Mount every router of the protocol on `app` (the echo endpoint only when enabled)."""
    from server.routes import (agent_poll, agent_tasks, agent_telemetry, agents, blobs, debug, models, projects,
                               sessions, task_logs, tasks, thumbs)
    from server.errors import ERROR_RESPONSES
    for module in (agent_poll, agent_tasks, agent_telemetry, sessions, agents, projects, models, tasks, task_logs, thumbs):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(blobs.agent_router, responses=ERROR_RESPONSES)
    app.include_router(blobs.user_router, responses=ERROR_RESPONSES)
    if settings.echo_endpoint:
        app.include_router(debug.router)
