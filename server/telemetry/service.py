"""Telemetry: an agent's sample kept as its node's small latest row and a downsampled, bounded history.

An agent's sample (agent/telemetry.py, about 4 KB) is cut to what the console shows:

- `telemetry_latest`, one row per node: cpu %, memory, a disks summary, a GPUs summary, the
  containers count, free slots and the time. The nodes list reads only this.
- `telemetry_history`, a few numbers per point (cpu %, memory %, each disk's %, each GPU's
  utilisation and memory %). Every point is kept for `telemetry_full_s`, then only the first of
  each minute until `telemetry_keep_s`; a node adds points no faster than `telemetry_min_gap_s`,
  so it holds at most full_s / min_gap + keep_s / 60 of them, whatever it sends.

A sample is the node's word: a number that is not finite or does not fit its column's type
(Integer is int4 on PostgreSQL, BigInteger int8) is dropped (null) and the rest kept, so no
sample can fail the contact batch it is written in (server/agents/contact.py).
"""

from __future__ import annotations

import math
import time

from sqlalchemy import and_, delete, or_, select

from server import db
from server.http.strict import INT64_MAX, INT64_MIN

INT4 = (-(1 << 31), (1 << 31) - 1)  # an Integer column on PostgreSQL


def accept_sample(state, agent: dict, sample: dict) -> None:
    """A node's telemetry sample, kept for the next contact batch (which writes it with the
    node's contact: server/agents/contact.py)."""
    state.contacts.telemetry(agent, time.time(), sample)


def _num(x) -> float | None:
    t = type(x)
    if t is float:  # the usual case first: a sample holds hundreds of numbers
        return x if x - x == 0.0 else None  # inf - inf and nan - nan are nan
    if t is int:
        return float(x) if -1e308 < x < 1e308 else None  # float() of a longer one raises
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None


def _pct(x) -> float | None:
    """A percentage from a number or a dict (percent, or used/total), as the agent may send either."""
    v = _num(x)
    if v is not None:
        return v
    if isinstance(x, dict):
        for k in ("percent", "usage_percent", "used_percent", "util", "utilization"):
            v = _num(x.get(k))
            if v is not None:
                return v
        used, total = _num(x.get("used")), _num(x.get("total"))
        if used is not None and total:
            return _num(100.0 * used / total)  # overflows to inf for used=1e308, total=1e-308
    return None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _int(x, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int | None:
    """`x` as a whole number for a column of [lo, hi] (BigInteger unless told), else None."""
    if type(x) is not int:
        f = _num(x)
        if f is None or not lo <= f <= hi:  # float against int compares exactly: 2.0**63 is out
            return None
        x = int(f)
    return x if lo <= x <= hi else None


def _disks(sample: dict) -> list[dict]:
    d = sample.get("disks")
    if isinstance(d, dict):
        d = [dict(v, path=k) if isinstance(v, dict) else {"path": k, "percent": v} for k, v in d.items()]
    out = []
    for x in d if isinstance(d, list) else []:
        if not isinstance(x, dict):
            continue
        name = x.get("path") or x.get("mount") or x.get("mountpoint") or x.get("name") or "disk"
        row = {
            "path": str(name)[:200],
            "used": _int(x.get("used")),
            "total": _int(x.get("total")),
            "percent": _r(_pct(x)),
        }
        out.append({k: v for k, v in row.items() if v is not None})
    return out[:32]


_UTIL_KEYS = ("utilization_percent", "util_percent", "gpu_util", "utilization", "util")


def _gpus(sample: dict) -> list[dict]:
    out: list[dict] = []
    gpus = sample.get("gpus")
    for i, g in enumerate(gpus if isinstance(gpus, list) else []):
        if _num(g) is not None:
            out.append({"index": i, "utilization": _r(float(g))})
            continue
        if not isinstance(g, dict):
            continue
        util = None
        for k in _UTIL_KEYS:
            util = _num(g.get(k))
            if util is not None:
                break
        memory = g.get("memory")
        mem = memory if isinstance(memory, dict) else {}
        index = _int(g.get("index"), *INT4)
        row = {
            "index": index if index is not None else i,
            "name": str(g["name"])[:100] if g.get("name") else None,
            "utilization": _r(util),
            "memory_used": _int(g.get("memory_used", mem.get("used"))),
            "memory_total": _int(g.get("memory_total", mem.get("total"))),
            "memory_percent": _r(_num(g.get("memory_percent"))),
        }
        out.append({k: v for k, v in row.items() if v is not None})
    return out[:64]


def latest_values(sample: dict) -> dict:
    """The columns of a node's telemetry_latest row, taken from an agent's sample of any size."""
    mem = sample.get("memory", sample.get("memory_percent"))
    containers = sample.get("containers")
    gpus = _gpus(sample)
    return {
        "cpu": _r(_pct(sample.get("cpu", sample.get("cpu_percent")))),
        "mem": _r(_pct(mem)),
        "mem_used": _int(mem.get("used")) if isinstance(mem, dict) else None,
        "mem_total": _int(mem.get("total")) if isinstance(mem, dict) else None,
        "disks": _disks(sample),
        "gpus": gpus,
        "gpu_count": len(gpus),
        "containers": _int(len(containers) if isinstance(containers, list) else containers, *INT4),
        "free_slots": _int(sample.get("free_slots"), *INT4),
        # A helper the agent gave up on (FATAL): kept whole, small, for the nodes page to show.
        "fatal": sample.get("fatal") if isinstance(sample.get("fatal"), (dict, str)) else None,
    }


def _gpu_mem_pct(g: dict) -> float | None:
    if "memory_percent" in g:
        return g["memory_percent"]
    if g.get("memory_total"):
        return _r(_num(100.0 * g.get("memory_used", 0) / g["memory_total"]))
    return None


def _whole(x: float | None) -> int | None:
    return None if x is None else _int(round(x))


def point_values(latest: dict) -> dict:
    """The numbers a history point keeps: cpu, mem (0.1 %), [disk %], [[gpu util %, gpu mem %]] (whole %:
    a chart's pixel is coarser, and a node with 8 GPUs writes 16 of them per point)."""
    return {
        "cpu": latest["cpu"],
        "mem": latest["mem"],
        "disks": [_whole(d.get("percent")) for d in latest["disks"]],
        "gpus": [[_whole(g.get("utilization")), _whole(_gpu_mem_pct(g))] for g in latest["gpus"]],
    }


def public_latest(row) -> dict | None:
    """A telemetry_latest row as the API shows it: the shape of an agent's sample, only smaller."""
    if row is None or row["ts"] is None:
        return None
    memory = {
        k: v
        for k, v in (("percent", row["mem"]), ("used", row["mem_used"]), ("total", row["mem_total"]))
        if v is not None
    }
    out = {
        "ts": row["ts"],
        "cpu": {"percent": row["cpu"]} if row["cpu"] is not None else None,
        "memory": memory or None,
        "disks": row["disks"] or [],
        "gpus": row["gpus"] or [],
        "containers": row["containers"],
        "free_slots": row["free_slots"],
        "fatal": row["fatal"],
    }
    return {k: v for k, v in out.items() if v is not None}


def history_point(settings, agent_id: int, last_point: float | None, now: float, latest: dict) -> dict | None:
    """The telemetry_history row a sample taken at `now` becomes, or None when the node's newest
    point (`last_point`) is nearer than the minimum gap (the latest row has the sample then)."""
    if last_point is not None and now - last_point < settings.telemetry_min_gap:
        return None
    minute = last_point is None or int(last_point // 60) != int(now // 60)  # first point of its minute: kept longer
    return dict(agent_id=agent_id, ts=now, minute=minute, **point_values(latest))


def prune(conn, settings, now: float) -> int:
    """Drop the points past their resolution's window, every node at once, and the telemetry of
    nodes deleted while a batch of theirs was being written (server/agents/contact.py); the number of
    points dropped."""
    h = db.telemetry_history.c
    n = conn.execute(
        delete(db.telemetry_history).where(
            or_(
                and_(h.minute.is_(False), h.ts < now - settings.telemetry_full_s),
                h.ts < now - settings.telemetry_keep_s,
            )
        )
    ).rowcount
    lt = db.telemetry_latest.c
    # The latest row is written with every batch of points: an orphan point has an orphan latest row.
    orphans = list(conn.execute(select(lt.agent_id).where(lt.agent_id.not_in(select(db.agents.c.id)))).scalars())
    if orphans:
        conn.execute(delete(db.telemetry_latest).where(lt.agent_id.in_(orphans)))
        n += conn.execute(delete(db.telemetry_history).where(h.agent_id.in_(orphans))).rowcount
    return n


def history(conn, agent_id: int, since: float | None, shown) -> dict:
    """The node's points, oldest first (after `since` when given), with the names of their series;
    `shown`: what this process holds and has not written yet (server/agents/contact.py), on top."""
    h = db.telemetry_history.c
    q = select(h.ts, h.cpu, h.mem, h.disks, h.gpus).where(h.agent_id == agent_id)
    if since is not None:
        q = q.where(h.ts > since)
    points = {ts: (cpu, mem, disks, gpus) for ts, cpu, mem, disks, gpus in conn.execute(q)}
    for p in shown.points_of(agent_id, since):  # one written meanwhile is in both: kept once
        points.setdefault(p["ts"], (p["cpu"], p["mem"], p["disks"], p["gpus"]))
    items = [
        {"ts": ts, "cpu": cpu, "mem": mem, "disks": disks or [], "gpus": gpus or []}
        for ts, (cpu, mem, disks, gpus) in sorted(points.items())
    ]
    latest = shown.latest.get(agent_id)
    if latest is not None:  # the series' names from the unwritten sample: no read
        disks, gpus = latest["disks"], latest["gpus"]
    else:
        lt = db.telemetry_latest.c
        row = conn.execute(select(lt.disks, lt.gpus).where(lt.agent_id == agent_id)).first()
        disks, gpus = row if row is not None else ([], [])
    return {
        "items": items,
        "next": None,
        "disks": [d.get("path", "disk") for d in disks or []],
        "gpus": [
            {"index": g.get("index", i), "name": g.get("name") or f"GPU {g.get('index', i)}"}
            for i, g in enumerate(gpus or [])
        ],
    }


def forget(conn, agent_id: int) -> None:
    """Remove a node's telemetry (the node is being deleted)."""
    conn.execute(delete(db.telemetry_history).where(db.telemetry_history.c.agent_id == agent_id))
    conn.execute(delete(db.telemetry_latest).where(db.telemetry_latest.c.agent_id == agent_id))
