"""The poll's first look (server/agents/service.py `PEEK` + `quiet_answer`) answers without a
transaction only when the full hand-out (server/tasks/service.py `hand_out`) would decide the same thing
and write nothing. Checked over generated task sets and poll bodies, on the test database.
"""

from __future__ import annotations

import time
import types

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select

from protocol.states import LEASED, TaskState
from server import db
from server.agents.schemas import PollIn
from server.agents.service import PEEK, quiet_answer
from server.tasks.service import hand_out

STATES = [s.value for s in TaskState]
task_st = st.tuples(st.sampled_from(STATES), st.booleans(), st.booleans())  # state, stop requested, delivered


def _state():
    return types.SimpleNamespace(
        settings=types.SimpleNamespace(lease_s=300.0), wakeups=types.SimpleNamespace(notify_task=lambda conn, tid: None)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tasks=st.lists(task_st, max_size=5),
    running_pick=st.lists(st.integers(0, 6), max_size=4),
    free_slots=st.integers(0, 2),
    first=st.booleans(),
    refusing=st.sampled_from(["", "disk full"]),
    stored_refusing=st.sampled_from([None, "disk full"]),
)
def test_the_quiet_answer_is_what_the_hand_out_decides(
    engine, tasks, running_pick, free_slots, first, refusing, stored_refusing
):
    now = time.time()
    with engine.begin() as conn:
        conn.execute(delete(db.tasks))
        conn.execute(delete(db.agents))
        aid = conn.execute(
            insert(db.agents).values(
                name="n", token_hash="h" * 64, allowed_task_types=["custom"], created_at=now, refusing=stored_refusing
            )
        ).inserted_primary_key[0]
        other = conn.execute(
            insert(db.agents).values(name="o", token_hash="o" * 64, allowed_task_types=["custom"], created_at=now)
        ).inserted_primary_key[0]
        ids = []
        for state, req, delivered in tasks:
            ids.append(
                conn.execute(
                    insert(db.tasks).values(
                        agent_id=aid,
                        type="custom",
                        config={},
                        resources={},
                        state=state,
                        stop_requested=req,
                        stop_delivered=delivered,
                        lease_until=now + 300,
                        timeline=[],
                        results={},
                        log_acked=-1,
                        created_at=now,
                        updated_at=now,
                    )
                ).inserted_primary_key[0]
            )
        # Another node's queued task changes nothing for this one.
        conn.execute(
            insert(db.tasks).values(
                agent_id=other,
                type="custom",
                config={},
                resources={},
                state="queued",
                timeline=[],
                results={},
                log_acked=-1,
                created_at=now,
                updated_at=now,
            )
        )
    running = sorted({ids[k] if k < len(ids) else 10_000 + k for k in running_pick})
    body = PollIn(free_slots=free_slots, free_gpus=[], running=running, refusing=refusing)

    with engine.connect() as conn:
        rows = conn.execute(PEEK, {"aid": aid}).mappings().all()
    quiet = quiet_answer(rows, body, first)

    with engine.connect() as conn:
        before = conn.execute(select(db.tasks).order_by(db.tasks.c.id)).all()
        conn.info["sly_wake"] = set()
        out, stop, new_stop = hand_out(_state(), conn, {"id": aid, "token_hash": "h" * 64}, free_slots, 0, running, now)
        after = conn.execute(select(db.tasks).order_by(db.tasks.c.id)).all()
        conn.rollback()
    writes_refusal = first and (stored_refusing or "") != refusing
    full_is_quiet = not out and not new_stop and before == after and not writes_refusal
    if quiet is not None:
        assert full_is_quiet, (tasks, running, free_slots, out, new_stop)
        assert quiet == stop
    else:
        # Conservative is allowed only where the hand-out acts, or may: a queued task it could claim,
        # a held task the node does not list (handed out again when a slot is free).
        held = {s.value for s in LEASED} | {"lost"}
        may_act = (any(s == "queued" for s, _, _ in tasks) and free_slots > 0) or any(
            s in held and i not in running for i, (s, _, _) in zip(ids, tasks, strict=True)
        )
        assert not full_is_quiet or may_act, (tasks, running, free_slots, first, refusing, stored_refusing)
