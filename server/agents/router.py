"""User side: agents (the console's nodes): register, list, read, change, remove, rotate a token, telemetry."""
from __future__ import annotations

import hashlib
import time

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import Integer, any_, case, delete, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql

from protocol import endpoints
from protocol.errors import APIError
from protocol.states import FINAL, LEASED, TaskState
from protocol.tasks import TASK_TYPES
from server import db
from server.telemetry import service as tele
from server.auth.service import hash_token, new_token, require_admin
from server.http.deps import conditional_json, core_of, cursor_id, page
from server.schemas import AgentIn, AgentPatch
from server.http.strict import RowId
from server.tasks.service import change_state, retry_race

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


def _agent_out(core, shown, row, latest, running: int, polls: int, now: float) -> dict:
    """An agent as the API shows it; `row` without system_info gives the nodes list's compact row.
    `shown`: what this process holds and has not written yet (server/agents/contact.py), on top of the
    stored row; `polls`: the node's long-polls open on the other replicas."""
    a = {k: v for k, v in dict(row).items() if k not in ("token_hash", "telemetry_ts", "settings_version")}
    aid = a["id"]
    a["last_seen"] = shown.last_seen(aid, a["last_seen"])
    latest = shown.latest_of(aid, latest)
    polls += shown.polls.get(aid, 0)
    a["status"] = core.agent_status(polls, a["last_seen"], now)
    a["running_tasks"] = running
    a["polls_open"] = polls
    a["refusing"] = a.get("refusing") or ""
    a["telemetry"] = tele.public_latest(latest)
    return a


def _running_counts(conn, agent_ids=None) -> dict[int, int]:
    t = db.tasks.c
    q = select(t.agent_id, func.count()).where(t.state.in_([s.value for s in LEASED]))
    if agent_ids is not None:
        q = q.where(t.agent_id.in_(agent_ids))
    return dict(conn.execute(q.group_by(t.agent_id)).all())


def _latest(conn, agent_ids) -> dict:
    lt = db.telemetry_latest
    return {r["agent_id"]: r for r in conn.execute(select(lt).where(lt.c.agent_id.in_(agent_ids))).mappings()}


def _among(core, column, ids: list[int]):
    """`column IN ids` as one parameter on PostgreSQL (an array: a few hundred ids of this
    process's unwritten contacts would be as many parameters); an IN list on SQLite, whose
    parameters cost nothing to pass."""
    if core.engine.dialect.name == "postgresql":
        return column == any_(literal(ids, postgresql.ARRAY(Integer)))
    return column.in_(ids)


def _summary(core, conn, shown, now: float) -> dict:
    """The whole fleet in a few numbers: nodes online/offline, GPUs on online nodes (free: less
    those held by leased tasks), leased tasks. Counted by the database, two rows back: the
    console asks every few seconds, and a fleet has thousands of nodes. `shown`: what this
    process holds and has not written yet (server/agents/contact.py)."""
    a, lt, t, p = db.agents.c, db.telemetry_latest.c, db.tasks.c, db.polls.c
    since = now - core.settings.offline_after
    # What Core.agent_status says, as SQL: a poll open on any replica, or contact within the
    # window, stored or heard here.
    here = shown.online_here(since)
    polling = select(p.agent_id).where(p.expires_at > now).distinct().subquery()   # one scan, joined
    online = or_(a.last_seen >= since, polling.c.agent_id.is_not(None), *([_among(core, a.id, here)] if here else []))
    # GPUs of the nodes whose newest sample this process holds: from that sample, not the stored
    # one. A sample is a contact, so such a node is online while its sample is within the window.
    newer = shown.latest
    gpu_count = func.coalesce(lt.gpu_count, 0)
    if newer:
        gpu_count = case((_among(core, a.id, sorted(newer)), 0), else_=gpu_count)
    nodes, up, gpus = conn.execute(
        select(func.count(), func.sum(case((online, 1), else_=0)), func.sum(case((online, gpu_count), else_=0)))
        .select_from(db.agents.outerjoin(db.telemetry_latest, lt.agent_id == a.id)
                     .outerjoin(polling, polling.c.agent_id == a.id))).one()
    gpus = int(gpus or 0) + sum(row.get("gpu_count") or 0 for row in newer.values() if row["ts"] >= since)
    leased = conn.execute(select(t.resources, online)
                          .select_from(db.tasks.outerjoin(db.agents, a.id == t.agent_id)
                                       .outerjoin(polling, polling.c.agent_id == a.id))
                          .where(t.state.in_([s.value for s in LEASED]))).all()
    held = sum(int((res or {}).get("gpus") or 0) for res, on in leased if on)
    up, gpus = int(up or 0), int(gpus or 0)
    return {"nodes": nodes, "online": up, "offline": nodes - up,
            "gpus_total": gpus, "gpus_free": max(0, gpus - held), "tasks_running": len(leased)}


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


LIST_COLUMNS = [c for c in db.agents.c if c.name not in ("token_hash", "system_info", "telemetry_ts")]


@router.get(endpoints.AGENTS)
async def list_agents(request: Request, limit: int = Query(100, ge=1, le=1000), cursor: str | None = None):
    """A page of agents by id: compact rows (status, last_seen, running_tasks, latest telemetry, no
    system_info) and the fleet's `summary`. ETag / If-None-Match: 304 when the page is unchanged."""
    core = core_of(request)
    now = time.time()
    c = cursor_id(cursor)
    q = select(*LIST_COLUMNS).order_by(db.agents.c.id).limit(limit + 1)
    if c is not None:
        q = q.where(db.agents.c.id > c)

    def read():
        shown = core.contacts.shown()   # before the read: a batch written meanwhile is in one or both
        with core.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
            ids = [r["id"] for r in rows[:limit]]
            counts = _running_counts(conn, ids)
            latest = _latest(conn, ids)
            polls = core.polls_open(conn, now, agent_ids=ids, elsewhere=core.wakeups.replica)
            summary = _summary(core, conn, shown, now)
        body = page([_agent_out(core, shown, r, latest.get(r["id"]), counts.get(r["id"], 0), polls.get(r["id"], 0),
                                now) for r in rows], limit)
        body["summary"] = summary
        return body
    return conditional_json(request, await core.run_read(read))


@router.get(endpoints.AGENT)
async def read_agent(agent_id: RowId, request: Request):
    """One agent in full: the list's fields and its system_info."""
    core = core_of(request)
    return await core.run_read(_read_one, core, agent_id)


def _read_one(core, agent_id: int, conn=None) -> dict:
    if conn is None:
        with core.engine.connect() as conn:
            return _read_one(core, agent_id, conn)
    shown = core.contacts.shown()   # before the reads: a batch written meanwhile is in one or both
    now = time.time()
    row = agent_row(conn, agent_id)
    counts = _running_counts(conn, [agent_id])
    latest = _latest(conn, [agent_id])
    polls = core.polls_open(conn, now, agent_id, elsewhere=core.wakeups.replica).get(agent_id, 0)
    return _agent_out(core, shown, row, latest.get(agent_id), counts.get(agent_id, 0), polls, now)


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
            core.notify_agent(conn, agent_id, row_changed=True)
            return _read_one(core, agent_id, conn)
    return await core.run(change)


NODE_DELETED = "node deleted"


@router.delete(endpoints.AGENT)
async def delete_agent(agent_id: RowId, request: Request):
    """Remove an agent and its telemetry. Its unfinished tasks fail with "node deleted"; its final
    tasks are kept, their agent_id naming a node that no longer exists (the console shows "deleted
    node"). Delete those with DELETE /api/v1/tasks/{id}."""
    core = core_of(request)
    now = time.time()

    def remove():
        failed = []
        with core.transaction() as conn:
            agent_row(conn, agent_id)
            rows = conn.execute(select(db.tasks).where(db.tasks.c.agent_id == agent_id,
                                                       db.tasks.c.state.notin_([s.value for s in FINAL]))).mappings().all()
            for r in rows:
                change_state(conn, dict(r), TaskState.FAILED, now, error=NODE_DELETED)
                core.notify_task(conn, r["id"])
                failed.append(r["id"])
            kept = conn.execute(select(func.count()).select_from(db.tasks).where(db.tasks.c.agent_id == agent_id)).scalar()
            conn.execute(delete(db.agents).where(db.agents.c.id == agent_id))
            tele.forget(conn, agent_id)
            core.notify_agent(conn, agent_id, row_changed=True)   # its open polls, on every replica, end with 401
        return failed, kept
    failed, kept = await core.run(retry_race, remove)
    core.contacts.forget(agent_id)
    return {"ok": True, "failed_tasks": failed, "kept_tasks": kept,
            "tasks": f"unfinished tasks failed with {NODE_DELETED!r}; final tasks are kept and still name agent "
                     f"{agent_id}, which no longer exists (DELETE /api/v1/tasks/{{id}} removes them)"}


@router.post(endpoints.AGENT_TOKEN)
async def rotate_token(agent_id: RowId, request: Request):
    """A new token for the agent; the old one stops working at once."""
    core = core_of(request)
    token = new_token()

    def rotate():
        with core.transaction() as conn:
            row = agent_row(conn, agent_id)
            conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(token_hash=hash_token(token)))
            core.notify_agent(conn, agent_id, row_changed=True)   # its open polls, on every replica, end with 401 now
            return row
    row = await core.run(rotate)
    return {"id": agent_id, "name": row["name"], "token": token, "run_command": run_commands(core, request, agent_id, token)}


@router.get(endpoints.AGENT_TELEMETRY)
async def agent_telemetry(agent_id: RowId, request: Request, since: float | None = Query(None, allow_inf_nan=False)):
    """The node's telemetry history, oldest first (after `since` when given): compact points
    `{ts, cpu, mem, disks: [%], gpus: [[util %, memory %]]}` and the series' names in `disks`
    and `gpus`. Every point of the last hour, then one a minute (docs/protocol.md)."""
    core = core_of(request)

    def read():
        shown = core.contacts.shown()
        with core.engine.connect() as conn:
            agent_row(conn, agent_id)
            return tele.history(conn, agent_id, since, shown)
    return conditional_json(request, await core.run_read(read))
