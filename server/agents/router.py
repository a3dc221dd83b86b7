"""User side: agents (the console's nodes): register, list, read, change, remove, rotate a token, telemetry."""

from __future__ import annotations

import hashlib
import time

from fastapi import APIRouter, Query, Request

from protocol import endpoints
from server.agents import service
from server.agents.schemas import AgentIn, AgentPatch
from server.auth.service import hash_token, new_token
from server.http.deps import AdminDep, StateDep, conditional_json, cursor_id, page
from server.http.strict import RowId
from server.tasks.service import retry_race
from server.telemetry import service as tele

router = APIRouter(tags=["user"])


def run_commands(state, request: Request, agent_id: int, token: str, gpus: bool = False) -> dict:
    """Ready-to-paste lines that start this agent: in a container (`docker`) and bare metal (`run_sh`).

    The container shares the host's network (`--network host`), so a server address that only
    the host can reach (127.0.0.1) works as it is; docs/deployment.md gives the bridge-network
    form. The host dir is named by the agent's id, never its token: a path ends up in
    `docker inspect`, mount tables and shell history. `gpus`: the GPU form, whose container gets
    the host's GPUs (`--gpus all`, through the NVIDIA container toolkit): without it the agent's
    NVML sees none and the node refuses every GPU task. Bare metal sees them as it is.
    """
    url = (state.settings.public_url or str(request.base_url)).rstrip("/")
    # The storage dir is named by a hash of the token, never the token: task containers see it in
    # their mount table (the agent's own default, node.config.hashed_root_name).
    host_dir = f"$HOME/.supervisely-agent/n-{hashlib.sha256(token.encode()).hexdigest()[:16]}"
    docker = (
        f'docker run -d --name sly-agent --restart unless-stopped --network host {"--gpus all " if gpus else ""}'
        f'-v /var/run/docker.sock:/var/run/docker.sock '
        f'-v "{host_dir}":"{host_dir}" -e AGENT_HOST_DIR="{host_dir}" -e SERVER_ADDRESS={url} '
        f'-e ACCESS_TOKEN={token} {state.settings.agent_image}'
    )
    return {"docker": docker, "run_sh": f"SERVER_ADDRESS={url} ACCESS_TOKEN={token} ./run.sh"}


@router.post(endpoints.AGENTS)
async def create_agent(body: AgentIn, request: Request, _: AdminDep, state: StateDep):
    """A new agent; its token (shown only in this answer) and a ready-to-paste run_command (its
    GPU form when `gpus` is true)."""
    types = service.check_types(body.allowed_task_types)
    token = new_token()

    def create():
        with state.db.engine.begin() as conn:
            return service.create_agent(conn, body.name, hash_token(token), types, time.time())

    aid = await state.db.run(create)
    return {
        "id": aid,
        "name": body.name,
        "allowed_task_types": types,
        "token": token,
        "run_command": run_commands(state, request, aid, token, body.gpus),
    }


@router.get(endpoints.AGENTS)
async def list_agents(
    request: Request, _: AdminDep, state: StateDep, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None
):
    """A page of agents by id: compact rows (status, last_seen, running_tasks, latest telemetry, no
    system_info) and the fleet's `summary`. ETag / If-None-Match: 304 when the page is unchanged."""
    now = time.time()
    after = cursor_id(cursor)

    def read():
        shown = state.contacts.shown()  # before the read: a batch written meanwhile is in one or both
        with state.db.engine.connect() as conn:
            items, summary = service.list_agents(
                conn, state.settings.offline_after, shown, state.wakeups.replica, limit, after, now
            )
        body = page(items, limit)
        body["summary"] = summary
        return body

    return conditional_json(request, await state.db.run_read(read))


def _read_one(state, agent_id: int, conn) -> dict:
    shown = state.contacts.shown()  # before the reads: a batch written meanwhile is in one or both
    return service.read_agent(conn, state.settings.offline_after, shown, state.wakeups.replica, agent_id, time.time())


@router.get(endpoints.AGENT_BY_ID)
async def read_agent(agent_id: RowId, _: AdminDep, state: StateDep):
    """One agent in full: the list's fields and its system_info."""

    def read():
        with state.db.engine.connect() as conn:
            return _read_one(state, agent_id, conn)

    return await state.db.run_read(read)


@router.patch(endpoints.AGENT_BY_ID)
async def patch_agent(agent_id: RowId, body: AgentPatch, _: AdminDep, state: StateDep):
    """Rename / change allowed task types; the agent sees it in its next poll answer (woken at once)."""
    values = {}
    if body.name is not None:
        values["name"] = body.name
    if body.allowed_task_types is not None:
        values["allowed_task_types"] = service.check_types(body.allowed_task_types)

    def change():
        with state.db.transaction() as conn:
            service.change_agent(conn, agent_id, values)
            state.wakeups.notify_agent(conn, agent_id, row_changed=True)
            return _read_one(state, agent_id, conn)

    return await state.db.run(change)


@router.delete(endpoints.AGENT_BY_ID)
async def delete_agent(agent_id: RowId, _: AdminDep, state: StateDep):
    """Remove an agent and its telemetry. Its unfinished tasks fail with "node deleted"; its final
    tasks are kept, their agent_id naming a node that no longer exists (the console shows "deleted
    node"). Delete those with DELETE /api/v1/tasks/{id}."""
    now = time.time()

    def remove():
        with state.db.transaction() as conn:
            failed, kept = service.remove_agent(conn, agent_id, now)
            for tid in failed:
                state.wakeups.notify_task(conn, tid)
            state.wakeups.notify_agent(
                conn, agent_id, row_changed=True
            )  # its open polls, on every replica, end with 401
        return failed, kept

    failed, kept = await state.db.run(retry_race, remove)
    state.contacts.forget(agent_id)
    return {
        "ok": True,
        "failed_tasks": failed,
        "kept_tasks": kept,
        "tasks": f"unfinished tasks failed with {service.NODE_DELETED!r}; final tasks are kept and still name "
        f"agent {agent_id}, which no longer exists (DELETE /api/v1/tasks/{{id}} removes them)",
    }


@router.post(endpoints.AGENT_TOKEN)
async def rotate_token(
    agent_id: RowId, request: Request, _: AdminDep, state: StateDep, gpus: bool | None = Query(None)
):
    """A new token for the agent; the old one stops working at once. The run command is the GPU
    form when `gpus` says so, or, without it, when the node has reported GPUs."""
    token = new_token()

    def rotate():
        shown = state.contacts.shown()
        with state.db.transaction() as conn:
            row = service.set_token(conn, agent_id, hash_token(token))
            state.wakeups.notify_agent(
                conn, agent_id, row_changed=True
            )  # its open polls, on every replica, end with 401 now
            return row, service.reported_gpus(conn, agent_id, shown)

    row, reported = await state.db.run(rotate)
    return {
        "id": agent_id,
        "name": row["name"],
        "token": token,
        "run_command": run_commands(state, request, agent_id, token, reported > 0 if gpus is None else gpus),
    }


@router.get(endpoints.AGENT_TELEMETRY)
async def agent_telemetry(
    agent_id: RowId,
    request: Request,
    _: AdminDep,
    state: StateDep,
    since: float | None = Query(None, allow_inf_nan=False),
):
    """The node's telemetry history, oldest first (after `since` when given): compact points
    `{ts, cpu, mem, disks: [%], gpus: [[util %, memory %]]}` and the series' names in `disks`
    and `gpus`. Every point of the last hour, then one a minute (docs/protocol.md)."""

    def read():
        shown = state.contacts.shown()
        with state.db.engine.connect() as conn:
            service.agent_row(conn, agent_id)
            return tele.history(conn, agent_id, since, shown)

    return conditional_json(request, await state.db.run_read(read))
