"""User side: agents (the console's nodes): register, list, read, change, remove, rotate a token, telemetry."""
from __future__ import annotations

import hashlib
import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import delete, func, insert, select, update

from protocol import endpoints
from protocol.errors import APIError
from protocol.states import FINAL, LEASED, TaskState
from protocol.tasks import TASK_TYPES
from server import db
from server.auth import hash_token, new_token, require_admin
from server.routes.common import core_of
from server.schemas import AgentIn, AgentPatch
from server.strict import RowId
from server.tasks import change_state, retry_race

router = APIRouter(tags=["user"], dependencies=[Depends(require_admin)])


def check_types(types: list[str] | None) -> list[str]:
    """Allowed task types as given (duplicates dropped), all of them when None; 400 for an unknown one."""
    if types is None:
        return list(TASK_TYPES)
    unknown = [t for t in types if t not in TASK_TYPES]
    if unknown:
        raise APIError(400, "unknown_type", f"unknown task type(s) {unknown}; known: {list(TASK_TYPES)}")
    return list(dict.fromkeys(types))


def run_commands(core, request: Request, agent_id: int, token: str) -> dict:
    """Ready-to-paste lines that start this agent: in a container (`docker`) and bare metal (`run_sh`).

    The container shares the host's network (`--network host`), so a server address that only
    the host can reach (127.0.0.1) works as it is; docs/deployment.md gives the bridge-network
    form. The host dir is named by the agent's id, never its token: a path ends up in
    `docker inspect`, mount tables and shell history.
    """
    url = (core.settings.public_url or str(request.base_url)).rstrip("/")
    # The storage dir is named by a hash of the token, never the token: task containers see it in
    # their mount table (the agent's own default, node.config.hashed_root_name).
    host_dir = f"$HOME/.supervisely-agent/n-{hashlib.sha256(token.encode()).hexdigest()[:16]}"
    docker = (f'docker run -d --name sly-agent --restart unless-stopped --network host '
              f'-v /var/run/docker.sock:/var/run/docker.sock '
              f'-v "{host_dir}":"{host_dir}" -e AGENT_HOST_DIR="{host_dir}" -e SERVER_ADDRESS={url} '
              f'-e ACCESS_TOKEN={token} {core.settings.agent_image}')
    return {"docker": docker, "run_sh": f"SERVER_ADDRESS={url} ACCESS_TOKEN={token} ./run.sh"}


def _agent_out(core, row, running: int, polls: int, now: float) -> dict:
    a = dict(row)
    a.pop("token_hash", None)
    a.pop("settings_version", None)
    a["status"] = core.agent_status(polls, a["last_seen"], now)
    a["running_tasks"] = running
    a["polls_open"] = polls
    a["refusing"] = a["refusing"] or ""
    return a


def _running_counts(conn) -> dict[int, int]:
    t = db.tasks.c
    return dict(conn.execute(select(t.agent_id, func.count()).where(t.state.in_([s.value for s in LEASED]))
                             .group_by(t.agent_id)).all())


def agent_row(conn, agent_id: int):
    """The agent's row, or 404 agent_not_found."""
    row = conn.execute(select(db.agents).where(db.agents.c.id == agent_id)).mappings().first()
    if row is None:
        raise APIError(404, "agent_not_found", f"no agent {agent_id}")
    return row


@router.post(endpoints.AGENTS)
async def create_agent(body: AgentIn, request: Request):
    """A new agent; its token (shown only in this answer) and a ready-to-paste run_command."""
    core = core_of(request)
    types = check_types(body.allowed_task_types)
    token = new_token()

    def create():
        with core.engine.begin() as conn:
            return conn.execute(insert(db.agents).values(name=body.name, token_hash=hash_token(token),
                                                         allowed_task_types=types, created_at=time.time())
                                ).inserted_primary_key[0]
    aid = await core.run(create)
    return {"id": aid, "name": body.name, "allowed_task_types": types, "token": token,
            "run_command": run_commands(core, request, aid, token)}


@router.get(endpoints.AGENTS)
async def list_agents(request: Request):
    """Every agent with status online/offline, last_seen, running_tasks, latest telemetry, system_info."""
    core = core_of(request)
    now = time.time()

    def read():
        with core.engine.connect() as conn:
            counts = _running_counts(conn)
            polls = core.polls_open(conn, now)
            rows = conn.execute(select(db.agents).order_by(db.agents.c.id)).mappings().all()
        return [_agent_out(core, r, counts.get(r["id"], 0), polls.get(r["id"], 0), now) for r in rows]
    return {"items": await core.run(read), "next": None}


@router.get(endpoints.AGENT)
async def read_agent(agent_id: RowId, request: Request):
    core = core_of(request)
    return await core.run(_read_one, core, agent_id)


def _read_one(core, agent_id: int, conn=None) -> dict:
    if conn is None:
        with core.engine.connect() as conn:
            return _read_one(core, agent_id, conn)
    now = time.time()
    row = agent_row(conn, agent_id)
    running = _running_counts(conn).get(agent_id, 0)
    return _agent_out(core, row, running, core.polls_open(conn, now, agent_id).get(agent_id, 0), now)


@router.patch(endpoints.AGENT)
async def patch_agent(agent_id: RowId, body: AgentPatch, request: Request):
    """Rename / change allowed task types; the agent sees it in its next poll answer (woken at once)."""
    core = core_of(request)
    values = {}
    if body.name is not None:
        values["name"] = body.name
    if body.allowed_task_types is not None:
        values["allowed_task_types"] = check_types(body.allowed_task_types)

    def change():
        with core.transaction() as conn:
            agent_row(conn, agent_id)
            # The version tells an open poll (on any replica) that the settings changed: it answers now.
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id)
                         .values(settings_version=db.agents.c.settings_version + 1, **values))
            core.notify_agent(conn, agent_id)
            return _read_one(core, agent_id, conn)
    return await core.run(change)


@router.delete(endpoints.AGENT)
async def delete_agent(agent_id: RowId, request: Request):
    """Remove an agent; its unfinished tasks fail with 'agent removed'."""
    core = core_of(request)
    now = time.time()

    def remove():
        failed = []
        with core.transaction() as conn:
            agent_row(conn, agent_id)
            rows = conn.execute(select(db.tasks).where(db.tasks.c.agent_id == agent_id,
                                                       db.tasks.c.state.notin_([s.value for s in FINAL]))).mappings().all()
            for r in rows:
                change_state(conn, dict(r), TaskState.FAILED, now, error="its agent was removed")
                core.notify_task(conn, r["id"])
                failed.append(r["id"])
            conn.execute(delete(db.agents).where(db.agents.c.id == agent_id))
            conn.execute(delete(db.telemetry).where(db.telemetry.c.agent_id == agent_id))
            core.notify_agent(conn, agent_id)   # its open polls, on every replica, end with 401
        return failed
    return {"ok": True, "failed_tasks": await core.run(retry_race, remove)}


@router.post(endpoints.AGENT_TOKEN)
async def rotate_token(agent_id: RowId, request: Request):
    """A new token for the agent; the old one stops working at once."""
    core = core_of(request)
    token = new_token()

    def rotate():
        with core.transaction() as conn:
            row = agent_row(conn, agent_id)
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(token_hash=hash_token(token)))
            core.notify_agent(conn, agent_id)   # its open polls, on every replica, end with 401 now
            return row
    row = await core.run(rotate)
    return {"id": agent_id, "name": row["name"], "token": token, "run_command": run_commands(core, request, agent_id, token)}


@router.get(endpoints.AGENT_TELEMETRY)
async def agent_telemetry(agent_id: RowId, request: Request, since: float | None = Query(None, allow_inf_nan=False)):
    """Recent telemetry samples `{ts, sample}` (oldest first), those after `since` when given."""
    core = core_of(request)

    def read():
        with core.engine.connect() as conn:
            agent_row(conn, agent_id)
            return core.telemetry_history(conn, agent_id, since)
    return {"items": await core.run(read), "next": None}
