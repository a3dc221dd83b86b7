"""Endpoint paths and headers of protocol v1 (docs/protocol.md)."""

from __future__ import annotations

AGENT_TOKEN_HEADER = "x-token"
AUTHORIZATION_HEADER = "authorization"  # "Bearer <admin token>"
BEARER = "Bearer "

AGENT_PREFIX = "/agent/v1"
USER_PREFIX = "/api/v1"

# Agent side (header x-token).
CONNECT = AGENT_PREFIX + "/connect"
POLL = AGENT_PREFIX + "/poll"
TELEMETRY = AGENT_PREFIX + "/telemetry"
AGENT_BLOB = AGENT_PREFIX + "/blobs/{sha256}"
AGENT_BLOBS_CHECK = AGENT_PREFIX + "/blobs/check"  # POST {sha256: [...]}: those the node lacks or may not read
AGENT_BLOBS_UPLOAD = AGENT_PREFIX + "/blobs/upload"  # POST a tar of blobs (protocol/bulk.py)
AGENT_BLOBS_DOWNLOAD = AGENT_PREFIX + "/blobs/download"  # POST {sha256: [...]} -> a tar of blobs
TASK_PROJECT_ITEMS = AGENT_PREFIX + "/tasks/{task_id}/project/items"  # GET ?cursor=&limit=: the task's items
TASK_STATE = AGENT_PREFIX + "/tasks/{task_id}/state"
TASK_LOGS = AGENT_PREFIX + "/tasks/{task_id}/logs"
TASK_RESULTS = AGENT_PREFIX + "/tasks/{task_id}/results"
TASK_RELEASE = AGENT_PREFIX + "/tasks/{task_id}/release"

# User side (Bearer admin token or console session).
SESSION = USER_PREFIX + "/session"  # console sign-in (POST) / sign-out (DELETE)
SESSION_LINKS = USER_PREFIX + "/session/links"  # POST (admin): a one-time sign-in link
SIGNIN_LINK = "/signin/{token}"  # GET: spend a one-time link, set the session cookie
AGENTS = USER_PREFIX + "/agents"
AGENT_BY_ID = USER_PREFIX + "/agents/{agent_id}"  # GET, PATCH, DELETE: one node
AGENT_TOKEN = USER_PREFIX + "/agents/{agent_id}/token"
AGENT_TELEMETRY = USER_PREFIX + "/agents/{agent_id}/telemetry"
USER_BLOB = USER_PREFIX + "/blobs/{sha256}"
USER_BLOBS_CHECK = USER_PREFIX + "/blobs/check"  # POST {sha256: [...]} -> {missing: [...]}
USER_BLOBS_UPLOAD = USER_PREFIX + "/blobs/upload"  # POST a tar of blobs (protocol/bulk.py)
USER_BLOBS_DOWNLOAD = USER_PREFIX + "/blobs/download"  # POST {sha256: [...]} -> a tar of blobs
USER_BLOB_THUMB = USER_PREFIX + "/blobs/{sha256}/thumb"  # ?size=256|1024|...: an image blob scaled down (JPEG)
PROJECTS = USER_PREFIX + "/projects"
PROJECT = USER_PREFIX + "/projects/{project_id}"
PROJECT_ITEMS = USER_PREFIX + "/projects/{project_id}/items"  # GET ?dataset=&cursor=&limit=; POST: add a page
PROJECT_STATS = USER_PREFIX + "/projects/{project_id}/stats"  # objects per class, tags per name
MODELS = USER_PREFIX + "/models"
MODEL = USER_PREFIX + "/models/{model_id}"
TASKS = USER_PREFIX + "/tasks"
TASK = USER_PREFIX + "/tasks/{task_id}"
TASK_STOP = USER_PREFIX + "/tasks/{task_id}/stop"
TASK_METRICS = USER_PREFIX + "/tasks/{task_id}/metrics"
TASK_ARTIFACTS = USER_PREFIX + "/tasks/{task_id}/artifacts"
USER_TASK_LOGS = USER_PREFIX + "/tasks/{task_id}/logs"
FILES = USER_PREFIX + "/files"  # GET ?path=&recursive=&limit=&cursor=: team files, a folder's entries
FILES_DOWNLOAD = USER_PREFIX + "/files/download"  # GET ?path=: one team file's bytes (Range works)
ECHO = USER_PREFIX + "/_echo"  # benchmark baseline; only on a server started with --echo-endpoint


def path(template: str, **params) -> str:
    """Fill a path template: path(TASK_STATE, task_id=3) -> '/agent/v1/tasks/3/state'."""
    return template.format(**params)
