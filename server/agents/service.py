"""Agents (the console's nodes): their rows, whether they are online, the fleet's summary, and the
long-poll's look at the database (the hand-out itself is server/tasks/service.py `hand_out`).

Plain functions on a connection; the routers open the transaction and send the wake-ups.
`shown` is what this process holds and has not written yet (`Contacts.shown()`,
server/agents/contact.py), shown on top of the stored rows."""

from __future__ import annotations

import time

from sqlalchemy import Integer, and_, any_, bindparam, case, delete, exists, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ColumnElement

from protocol.errors import APIError
from protocol.states import FINAL, LEASED, TaskState
from protocol.tasks import TASK_TYPES
from server import db
from server.agents.contact import UnwrittenContacts
from server.agents.schemas import PollIn
from server.tasks.service import LEASED_VALUES, change_state, hand_out
from server.telemetry import service as tele

NODE_DELETED = "node deleted"  # the error of the tasks a node's removal fails

# The nodes list's columns: no token hash, system info or chart bookkeeping (a page has up to 1,000 rows).
LIST_COLUMNS = [c for c in db.agents.c if c.name not in ("token_hash", "system_info", "telemetry_ts")]


# --- rules ---
def check_types(types: list[str] | None) -> list[str]:
    """Allowed task types as given (duplicates dropped), all of them when None; 400 for an unknown one."""
    if types is None:
        return list(TASK_TYPES)
    unknown = [t for t in types if t not in TASK_TYPES]
    if unknown:
        raise APIError(400, "unknown_type", f"unknown task type(s) {unknown}; known: {list(TASK_TYPES)}")
    return list(dict.fromkeys(types))


def agent_status(offline_after: float, polls_open: int, last_seen: float | None, now: float | None = None) -> str:
    """online: a long-poll of it is open (on any replica), or its last contact is within the offline window."""
    now = time.time() if now is None else now
    if polls_open:
        return "online"
    return "online" if last_seen is not None and now - last_seen <= offline_after else "offline"


def agent_out(
    offline_after: float, shown: UnwrittenContacts, row, latest, running: int, polls: int, now: float
) -> dict:
    """An agent as the API shows it; `row` without system_info gives the nodes list's compact row.
    `polls`: the node's long-polls open on the other replicas (`shown` has this one's)."""
    a = {k: v for k, v in dict(row).items() if k not in ("token_hash", "telemetry_ts", "settings_version")}
    aid = a["id"]
    a["last_seen"] = shown.last_seen(aid, a["last_seen"])
    latest = shown.latest_of(aid, latest)
    polls += shown.polls.get(aid, 0)
    a["status"] = agent_status(offline_after, polls, a["last_seen"], now)
    a["running_tasks"] = running
    a["polls_open"] = polls
    a["refusing"] = a.get("refusing") or ""
    a["telemetry"] = tele.public_latest(latest)
    return a


# --- reads ---
def agent_row(conn, agent_id: int):
    """The agent's row, or 404 agent_not_found."""
    row = conn.execute(select(db.agents).where(db.agents.c.id == agent_id)).mappings().first()
    if row is None:
        raise APIError(404, "agent_not_found", f"no agent {agent_id}")
    return row


def polls_open(
    conn, now: float, agent_id: int | None = None, agent_ids=None, elsewhere: str | None = None
) -> dict[int, int]:
    """Agent id -> long-polls open now on every replica (rows of polls that died with a replica
    expire); of one agent, of some, or of all. `elsewhere`: on replicas other than this one
    (whose own open polls `Contacts.shown()` knows exactly)."""
    p = db.polls.c
    q = select(p.agent_id, func.count()).where(p.expires_at > now).group_by(p.agent_id)
    if elsewhere is not None:
        q = q.where(p.replica != elsewhere)
    if agent_id is not None:
        q = q.where(p.agent_id == agent_id)
    if agent_ids is not None:
        q = q.where(p.agent_id.in_(agent_ids))
    return dict(conn.execute(q).all())


def running_counts(conn, agent_ids=None) -> dict[int, int]:
    """Agent id -> its leased tasks."""
    t = db.tasks.c
    q = select(t.agent_id, func.count()).where(t.state.in_([s.value for s in LEASED]))
    if agent_ids is not None:
        q = q.where(t.agent_id.in_(agent_ids))
    return dict(conn.execute(q.group_by(t.agent_id)).all())


def latest_telemetry(conn, agent_ids) -> dict:
    """Agent id -> its stored telemetry_latest row."""
    lt = db.telemetry_latest
    return {r["agent_id"]: r for r in conn.execute(select(lt).where(lt.c.agent_id.in_(agent_ids))).mappings()}


def _among(conn, column, ids: list[int]):
    """`column IN ids` as one parameter on PostgreSQL (an array: a few hundred ids of this
    process's unwritten contacts would be as many parameters); an IN list on SQLite, whose
    parameters cost nothing to pass."""
    if conn.dialect.name == "postgresql":
        return column == any_(literal(ids, postgresql.ARRAY(Integer)))
    return column.in_(ids)


def fleet_summary(conn, offline_after: float, shown: UnwrittenContacts, now: float) -> dict:
    """The whole fleet in a few numbers: nodes online/offline, GPUs on online nodes (free: less
    those held by leased tasks), leased tasks. Counted by the database, two rows back: the
    console asks every few seconds, and a fleet has thousands of nodes."""
    a, lt, t, p = db.agents.c, db.telemetry_latest.c, db.tasks.c, db.polls.c
    since = now - offline_after
    # What `agent_status` says, as SQL: a poll open on any replica, or contact within the
    # window, stored or heard here.
    here = shown.online_here(since)
    polling = select(p.agent_id).where(p.expires_at > now).distinct().subquery()  # one scan, joined
    online = or_(a.last_seen >= since, polling.c.agent_id.is_not(None), *([_among(conn, a.id, here)] if here else []))
    # GPUs of the nodes whose newest sample this process holds: from that sample, not the stored
    # one. A sample is a contact, so such a node is online while its sample is within the window.
    newer = shown.latest
    gpu_count: ColumnElement = func.coalesce(lt.gpu_count, 0)
    if newer:
        gpu_count = case((_among(conn, a.id, sorted(newer)), 0), else_=gpu_count)
    nodes, up, gpus = conn.execute(
        select(
            func.count(), func.sum(case((online, 1), else_=0)), func.sum(case((online, gpu_count), else_=0))
        ).select_from(
            db.agents.outerjoin(db.telemetry_latest, lt.agent_id == a.id).outerjoin(polling, polling.c.agent_id == a.id)
        )
    ).one()
    gpus = int(gpus or 0) + sum(row.get("gpu_count") or 0 for row in newer.values() if row["ts"] >= since)
    leased = conn.execute(
        select(t.resources, online)
        .select_from(db.tasks.outerjoin(db.agents, a.id == t.agent_id).outerjoin(polling, polling.c.agent_id == a.id))
        .where(t.state.in_([s.value for s in LEASED]))
    ).all()
    held = sum(int((res or {}).get("gpus") or 0) for res, on in leased if on)
    up, gpus = int(up or 0), int(gpus or 0)
    return {
        "nodes": nodes,
        "online": up,
        "offline": nodes - up,
        "gpus_total": gpus,
        "gpus_free": max(0, gpus - held),
        "tasks_running": len(leased),
    }


def list_agents(
    conn, offline_after: float, shown: UnwrittenContacts, replica: str, limit: int, after: int | None, now: float
) -> tuple[list[dict], dict]:
    """A page of agents by id after `after` (limit + 1 rows: the last tells that more exist), as
    the API shows them, and the fleet's summary. `replica`: this process's (its own open polls
    are in `shown`)."""
    q = select(*LIST_COLUMNS).order_by(db.agents.c.id).limit(limit + 1)
    if after is not None:
        q = q.where(db.agents.c.id > after)
    rows = conn.execute(q).mappings().all()
    ids = [r["id"] for r in rows[:limit]]
    counts = running_counts(conn, ids)
    latest = latest_telemetry(conn, ids)
    polls = polls_open(conn, now, agent_ids=ids, elsewhere=replica)
    summary = fleet_summary(conn, offline_after, shown, now)
    items = [
        agent_out(offline_after, shown, r, latest.get(r["id"]), counts.get(r["id"], 0), polls.get(r["id"], 0), now)
        for r in rows
    ]
    return items, summary


def read_agent(conn, offline_after: float, shown: UnwrittenContacts, replica: str, agent_id: int, now: float) -> dict:
    """One agent in full (the list's fields and its system_info), or 404 agent_not_found."""
    row = agent_row(conn, agent_id)
    counts = running_counts(conn, [agent_id])
    latest = latest_telemetry(conn, [agent_id])
    polls = polls_open(conn, now, agent_id, elsewhere=replica).get(agent_id, 0)
    return agent_out(offline_after, shown, row, latest.get(agent_id), counts.get(agent_id, 0), polls, now)


def reported_gpus(conn, agent_id: int, shown: UnwrittenContacts) -> int:
    """GPUs the node reported: in its latest telemetry, else in its system info at connect (0 when
    it reported none, or nothing yet)."""
    latest = shown.latest_of(agent_id, latest_telemetry(conn, [agent_id]).get(agent_id))
    if latest is not None and latest.get("gpu_count"):
        return int(latest["gpu_count"])
    info = conn.execute(select(db.agents.c.system_info).where(db.agents.c.id == agent_id)).scalar()
    gpus = info.get("gpus") if isinstance(info, dict) else None
    return len(gpus) if isinstance(gpus, list) else 0


# --- changes (the caller sends the wake-ups once they commit) ---
def create_agent(conn, name: str, token_hash: str, types: list[str], now: float) -> int:
    """A new agent's row; its id."""
    return conn.execute(
        insert(db.agents).values(name=name, token_hash=token_hash, allowed_task_types=types, created_at=now)
    ).inserted_primary_key[0]


def change_agent(conn, agent_id: int, values: dict) -> None:
    """Rename / change allowed task types (404 agent_not_found). The settings version goes up: it
    tells an open poll (on any replica) that the settings changed, and it answers now."""
    agent_row(conn, agent_id)
    conn.execute(
        update(db.agents)
        .where(db.agents.c.id == agent_id)
        .values(settings_version=db.agents.c.settings_version + 1, **values)
    )


def set_token(conn, agent_id: int, token_hash: str):
    """Give the agent a new token hash (the old token stops working); its row as it was, or 404."""
    row = agent_row(conn, agent_id)
    conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(token_hash=token_hash))
    return row


def set_system_info(conn, agent_id: int, info: dict) -> None:
    conn.execute(update(db.agents).where(db.agents.c.id == agent_id).values(system_info=info))


def remove_agent(conn, agent_id: int, now: float) -> tuple[list[int], int]:
    """Remove an agent and its telemetry (404 agent_not_found): its unfinished tasks fail with
    NODE_DELETED, its final ones are kept. (the failed task ids, the kept tasks' count); may
    raise StateRace (server/tasks/service.py: run it under `retry_race`)."""
    agent_row(conn, agent_id)
    rows = (
        conn.execute(
            select(db.tasks).where(db.tasks.c.agent_id == agent_id, db.tasks.c.state.notin_([s.value for s in FINAL]))
        )
        .mappings()
        .all()
    )
    failed = []
    for r in rows:
        change_state(conn, dict(r), TaskState.FAILED, now, error=NODE_DELETED)
        failed.append(r["id"])
    kept = conn.execute(select(func.count()).select_from(db.tasks).where(db.tasks.c.agent_id == agent_id)).scalar()
    conn.execute(delete(db.agents).where(db.agents.c.id == agent_id))
    tele.forget(conn, agent_id)
    return failed, kept


# --- the long-poll ---
# Built once: the poll runs them hundreds of times a second, and a statement made per call costs
# its construction and its cache key every time.
_a = db.agents.c
_t = db.tasks.c
_POLL_AGENT = select(_a.token_hash, _a.refusing, _a.settings_version, _a.name, _a.allowed_task_types).where(
    _a.id == bindparam("aid")
)
# The first look, one statement and no transaction: the agent's row, whether a task waits for it,
# and one row per task it holds (leased, or lost and still to be stopped). Most polls stop there.
_q = db.tasks.alias("queued_task")
PEEK = (
    select(
        _a.token_hash,
        _a.refusing,
        _a.settings_version,
        _a.name,
        _a.allowed_task_types,
        exists().where(_q.c.agent_id == _a.id, _q.c.state == TaskState.QUEUED.value).label("queued"),
        _t.id,
        _t.state,
        _t.stop_requested,
        _t.stop_delivered,
    )
    .select_from(
        db.agents.outerjoin(db.tasks, and_(_t.agent_id == _a.id, _t.state.in_(LEASED_VALUES + [TaskState.LOST.value])))
    )
    .where(_a.id == bindparam("aid"))
    .order_by(_t.id)
)


def peek(conn, agent_id: int) -> list:
    """The poll's first look (`PEEK`): no transaction needed (`ServerState.reader`)."""
    return conn.execute(PEEK, {"aid": agent_id}).mappings().all()


def quiet_answer(rows, body: PollIn, first: bool) -> list[int] | None:
    """From the first look: the stop list when the poll needs no transaction (nothing to hand out,
    claim or mark delivered, no refusal to write), else None. What `hand_out` would decide."""
    head = rows[0]
    if head["queued"] and body.free_slots > 0:
        return None
    if first and (head["refusing"] or "") != body.refusing:
        return None
    running = set(body.running)
    stop = []
    for r in rows:
        if r["id"] is None:
            continue  # the agent holds no task
        if r["id"] not in running:
            return None  # handed out again, or stopped before it ran
        if r["state"] == TaskState.LOST.value or r["stop_requested"]:
            if not r["stop_delivered"]:
                return None
            stop.append(r["id"])
    return stop


def check_token(row, agent: dict) -> None:
    """401 when the polling agent was removed or its token rotated (`row`: its row read now)."""
    if row is None:
        raise APIError(401, "unauthorized", "this agent was removed")
    if row["token_hash"] != agent["token_hash"]:
        raise APIError(401, "unauthorized", "the agent token was rotated")


def quiet_round(rows, agent: dict, body: PollIn, first: bool, last: bool) -> tuple[dict | None, dict] | None:
    """A poll round from the first look (`peek`'s rows) alone: (the answer or None to keep waiting,
    the answer this round would give at the poll's end), or None when it needs `poll_round`."""
    check_token(rows[0] if rows else None, agent)
    stop = quiet_answer(rows, body, first)
    if stop is None:
        return None
    head = rows[0]
    answer = {
        "tasks": [],
        "stop": stop,
        "settings": {"name": head["name"], "allowed_task_types": head["allowed_task_types"]},
    }
    if last or head["settings_version"] != agent["settings_version"]:
        return answer, answer
    return None, answer


def poll_round(conn, state, agent: dict, body: PollIn, first: bool, last: bool) -> tuple[dict | None, dict]:
    """A poll round in a write transaction: the agent's row again (gone or with another token:
    401), its refusal (first round), the hand-out, and stops marked delivered when answering.
    (the answer or None to keep waiting, the answer this round would give at the poll's end).
    `state`: what `hand_out` needs (the lease, task wake-ups)."""
    aid = agent["id"]
    row = conn.execute(_POLL_AGENT, {"aid": aid}).mappings().first()
    check_token(row, agent)
    if first and (row["refusing"] or "") != body.refusing:
        conn.execute(update(db.agents).where(db.agents.c.id == aid).values(refusing=body.refusing or None))
    tasks, stop, new_stop = hand_out(
        state, conn, agent, body.free_slots, len(body.free_gpus), body.running, time.time()
    )
    answer = {
        "tasks": tasks,
        "stop": stop,
        "settings": {"name": row["name"], "allowed_task_types": row["allowed_task_types"]},
    }
    if tasks or new_stop or last or row["settings_version"] != agent["settings_version"]:
        if new_stop:
            conn.execute(update(db.tasks).where(db.tasks.c.id.in_(new_stop)).values(stop_delivered=True))
        return answer, answer
    return None, answer
