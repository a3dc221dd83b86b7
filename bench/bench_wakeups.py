"""Wake-up latency across replicas on PostgreSQL, against the same replica in the same run.

    python bench/bench_wakeups.py [--db pg|URL] [--n 30] [--json FILE]

Starts two server replicas A and B (separate `python -m server` processes on one fresh PostgreSQL
database, as `bench_fleet.py --replicas 2`) and times three wake-ups, --n times each, on two sides:

  cross   the waiter on B, the change on A: the wake-up goes A's commit -> A's NOTIFY sender ->
          B's listener -> B's waiter, which reads the database and answers;
  same    the waiter and the change both on A: the in-process wake-up, the baseline.

  task      a node long-polls (`wait=20`, a free slot); a task is created for it through the user
            API; from just before the create request is sent to the poll's answer (with the task);
  stop      a node running a task long-polls (no free slot); the task is stopped through the user
            API; from just before the stop request is sent to the poll's answer (with the stop);
  log line  a user follows a running task's live log (server-sent events); the node posts one log
            line; from just before the log POST is sent to the follower's receiving the line.

Each side has one simulated node (no agent code), which polls on its waiter replica and runs one
task throughout (the task the log rounds write to; its follower stays open). A change is made only
once the node's poll is open on the waiter replica (its `polls_open`, which that replica knows
exactly for its own polls), and the rounds interleave the sides, with random gaps of 0.05-0.3 s,
so that a slow moment of the (shared) machine or a periodic job of the server falls on both.

The first hand-out of the run is timed apart: the servers are fresh, and each compiles its
statements on first use (the cross one is the first create on A and the first hand-out on B; the
same one then is A's first hand-out). Then one untimed round of the stop and the log line on each
side, then the timed rounds.

Printed: p50 and p99 of each side and the ratio of the p50s (cross / same): what a wake-up that
crosses replicas costs over one that does not. Every latency includes the change's own request
(its commit), as a user or node sees it; the change request's own time is printed below the
table, and what is left of each latency once the change's answer is in (the hop, and the
waiter's own work: a hand-out commits a transaction, a follower only reads). With --n under 100,
p99 is the largest sample or nearly. Timestamps are time.perf_counter in this one process: no
clocks are compared. Absolute figures depend on the machine, its load (a shared 2-core box moves
them) and the cluster's commit cost (fsync on: each commit waits for a WAL flush); the ratio is
what to compare between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_fleet import (  # noqa: E402
    SYSTEM_INFO,
    bench_cluster,
    pct,
    pg_database,
    run_loop,
    start_replicas,
    stop_servers,
)
from protocol import endpoints as ep  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

KINDS = ("task", "stop", "log line")
SIDES = ("same", "cross")
POLL_WAIT = 20.0


class Miss(Exception):
    """A round whose waiter answered without the change (counted, not timed)."""


async def call(
    sess: aiohttp.ClientSession, method: str, path: str, headers: dict, body=None, timeout: float = 30.0
) -> dict:
    async with sess.request(
        method, path, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        data = await r.read()
        if r.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:300]!r}")
        return json.loads(data) if data else {}


class Follower:
    """A user's live log stream of one task, on one replica: when each seq arrived."""

    def __init__(self, sess: aiohttp.ClientSession, admin: dict, task_id: int):
        self.arrived: dict[int, float] = {}
        self.wanted: dict[int, asyncio.Future] = {}
        self.runner = asyncio.create_task(self._run(sess, admin, task_id))

    async def _run(self, sess, admin, task_id) -> None:
        path = ep.path(ep.USER_TASK_LOGS, task_id=task_id)
        async with sess.get(
            path,
            params={"after": "-1", "follow": "1"},
            headers=admin,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"follow: HTTP {r.status}: {(await r.read())[:300]!r}")
            event = None
            async for raw in r.content:
                t = time.perf_counter()
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "line":
                    seq = json.loads(line[5:])["seq"]
                    self.arrived[seq] = t
                    fut = self.wanted.pop(seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(t)
                elif line == "":
                    event = None

    def expect(self, seq: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if seq in self.arrived:
            fut.set_result(self.arrived[seq])
        else:
            self.wanted[seq] = fut
        return fut


class Side:
    """One side of the comparison: its node polls on `waiter`; changes are made on `changer`."""

    def __init__(self, name: str, waiter: aiohttp.ClientSession, changer: aiohttp.ClientSession, admin: dict):
        self.name, self.waiter, self.changer, self.admin = name, waiter, changer, admin
        self.agent_id = 0
        self.node: dict = {}
        self.log_task = None  # the task the node runs throughout (log rounds write to it)
        self.follower: Follower | None = None
        self.seq = 0

    def running(self, *more: int) -> list[int]:
        return ([self.log_task] if self.log_task is not None else []) + list(more)

    async def setup_agent(self) -> None:
        info = await call(
            self.changer,
            "POST",
            ep.AGENTS,
            self.admin,
            {"name": f"bench-{self.name}", "allowed_task_types": ["custom"]},
        )
        self.agent_id, self.node = info["id"], {"x-token": info["token"]}
        await call(self.waiter, "POST", ep.CONNECT, self.node, SYSTEM_INFO)

    async def poll(self, wait: float, free_slots: int, running: list[int]) -> tuple[dict, float]:
        """One poll on the waiter replica: (its answer, when it arrived)."""
        async with self.waiter.post(
            f"{ep.POLL}?wait={wait:g}",
            headers=self.node,
            json={"free_slots": free_slots, "free_gpus": [], "running": running},
            timeout=aiohttp.ClientTimeout(total=wait + 20),
        ) as r:
            data = await r.read()
            t = time.perf_counter()
            if r.status != 200:
                raise RuntimeError(f"poll: HTTP {r.status}: {data[:300]!r}")
        return json.loads(data), t

    async def state(self, task_id: int, state: str) -> None:
        await call(self.waiter, "POST", ep.path(ep.TASK_STATE, task_id=task_id), self.node, {"state": state})

    async def poll_open(self) -> None:
        """Until the waiter replica counts the node's poll as open: it is waiting on its wake-up."""
        deadline = time.monotonic() + 10
        while (await call(self.waiter, "GET", ep.path(ep.AGENT_BY_ID, agent_id=self.agent_id), self.admin))[
            "polls_open"
        ] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the node's poll is not open after 10 s")
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)

    async def new_task(self) -> int:
        t = await call(
            self.changer,
            "POST",
            ep.TASKS,
            self.admin,
            {"agent_id": self.agent_id, "type": "custom", "image": "bench:1"},
        )
        return t["id"]

    async def start_running(self) -> int:
        """A task created, handed out to the node at once (the poll does not wait) and running."""
        tid = await self.new_task()
        answer, _ = await self.poll(0, 1, self.running())
        if [t["id"] for t in answer["tasks"]] != [tid]:
            raise RuntimeError(f"{self.name}: expected task {tid} at once, got {answer}")
        await self.state(tid, "running")
        return tid

    async def setup_log_task(self) -> None:
        self.log_task = await self.start_running()
        self.follower = Follower(self.waiter, self.admin, self.log_task)

    # --- the rounds: each returns (wake-up latency, the change request's own time)
    async def round_task(self) -> tuple[float, float]:
        waiter = asyncio.create_task(self.poll(POLL_WAIT, 1, self.running()))
        try:
            await self.poll_open()
            t0 = time.perf_counter()
            tid = await self.new_task()
            t_req = time.perf_counter() - t0
            answer, t1 = await asyncio.wait_for(waiter, POLL_WAIT + 30)
        finally:
            waiter.cancel()
        got = [t["id"] for t in answer["tasks"]]
        for t in got:  # the node runs what it got, and it ends
            await self.state(t, "running")
            await self.state(t, "finished")
        if got != [tid]:
            raise Miss(f"task: the poll answered {got}, not [{tid}]")
        return t1 - t0, t_req

    async def round_stop(self) -> tuple[float, float]:
        tid = await self.start_running()
        waiter = asyncio.create_task(self.poll(POLL_WAIT, 0, self.running(tid)))
        try:
            await self.poll_open()
            t0 = time.perf_counter()
            await call(self.changer, "POST", ep.path(ep.TASK_STOP, task_id=tid), self.admin)
            t_req = time.perf_counter() - t0
            answer, t1 = await asyncio.wait_for(waiter, POLL_WAIT + 30)
        finally:
            waiter.cancel()
        await self.state(tid, "stopped")
        if tid not in answer["stop"]:
            raise Miss(f"stop: the poll answered stop={answer['stop']}, without {tid}")
        return t1 - t0, t_req

    async def round_log(self) -> tuple[float, float]:
        seq, self.seq = self.seq, self.seq + 1
        arrived = self.follower.expect(seq)
        t0 = time.perf_counter()
        # The node posts to the changing replica (a node may reach any replica through a balancer).
        r = await call(
            self.changer,
            "POST",
            ep.path(ep.TASK_LOGS, task_id=self.log_task),
            self.node,
            {"first_seq": seq, "lines": [{"ts": time.time(), "message": f"bench line {seq}"}]},
        )
        t_req = time.perf_counter() - t0
        if r.get("acked") != seq:
            raise RuntimeError(f"log POST acked {r}, expected {seq}")
        try:
            t1 = await asyncio.wait_for(arrived, 10)
        except TimeoutError:
            raise Miss(f"log line: seq {seq} did not reach the follower within 10 s") from None
        return t1 - t0, t_req

    async def round(self, kind: str) -> tuple[float, float]:
        return await {"task": self.round_task, "stop": self.round_stop, "log line": self.round_log}[kind]()


async def run(args, url_a: str, url_b: str, admin_token: str) -> dict:
    admin = {"Authorization": f"Bearer {admin_token}"}
    # Idle connections are closed before uvicorn's 5 s keep-alive ends (as bench_fleet does).
    sess = {
        name: aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(keepalive_timeout=3.0))
        for name, url in (("A", url_a), ("B", url_b))
    }
    sides = {"same": Side("same", sess["A"], sess["A"], admin), "cross": Side("cross", sess["B"], sess["A"], admin)}
    lat = {k: {s: [] for s in SIDES} for k in KINDS}
    req = {k: {s: [] for s in SIDES} for k in KINDS}
    warm: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    misses: list[str] = []
    try:
        for s in sides.values():
            await s.setup_agent()
        # The first hand-out of the run, cross first: A's first create, B's first hand-out; then
        # A's first hand-out (its create now warm). Nothing else has handed a task out before.
        for name in ("cross", "same"):
            warm["task"][name] = (await sides[name].round_task())[0]
        for name in ("cross", "same"):
            await sides[name].setup_log_task()
            await sides[name].round_log()  # seq 0, through the stream just opened
            await asyncio.sleep(0.2)
        for kind in ("stop", "log line"):  # one untimed round of the others, on each side
            for name in ("cross", "same"):
                warm[kind][name] = (await sides[name].round(kind))[0]
                await asyncio.sleep(0.1)
        print(f"warm-up done; {args.n} timed rounds of each kind on each side", file=sys.stderr)
        for i in range(args.n):
            for kind in KINDS:
                order = list(SIDES)
                random.shuffle(order)
                for name in order:
                    await asyncio.sleep(random.uniform(0.05, 0.3))
                    try:
                        dt, t_req = await sides[name].round(kind)
                    except Miss as e:
                        misses.append(f"{name} {e}")
                        continue
                    lat[kind][name].append(dt)
                    req[kind][name].append(t_req)
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{args.n}", file=sys.stderr)
    finally:
        for s in sides.values():
            if s.follower:
                s.follower.runner.cancel()
        await asyncio.gather(*(s.follower.runner for s in sides.values() if s.follower), return_exceptions=True)
        for x in sess.values():
            await x.close()
    return {"lat": lat, "req": req, "warm": warm, "misses": misses}


def ms(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x * 1000:.1f} ms"


def report(args, r: dict) -> dict:
    lat, req, warm = r["lat"], r["req"], r["warm"]
    print(
        f"\nbench_wakeups: 2 replicas on one PostgreSQL database, {args.n} rounds per kind and side; "
        f"same: waiter and change on A; cross: waiter on B, change on A"
    )
    print(f"{'kind':10} {'same p50':>10} {'same p99':>10} {'cross p50':>10} {'cross p99':>10} {'cross/same p50':>15}")
    out = {"n": args.n, "kinds": {}, "misses": r["misses"]}
    for k in KINDS:
        s, c = lat[k]["same"], lat[k]["cross"]
        s50, c50 = pct(s, 50), pct(c, 50)
        ratio = c50 / s50 if s and c and s50 > 0 else float("nan")
        print(f"{k:10} {ms(s50):>10} {ms(pct(s, 99)):>10} {ms(c50):>10} {ms(pct(c, 99)):>10} {ratio:>14.2f}x")
        out["kinds"][k] = {
            side: {
                "n": len(lat[k][side]),
                "p50": pct(lat[k][side], 50),
                "p99": pct(lat[k][side], 99),
                "max": max(lat[k][side]) if lat[k][side] else None,
                "change_request_p50": pct(req[k][side], 50),
                "warmup": warm[k].get(side),
            }
            for side in SIDES
        }
        out["kinds"][k]["ratio_p50"] = ratio
    names = {"task": "create", "stop": "stop", "log line": "log POST"}
    print(
        "the change request alone, p50 same / cross: "
        + ", ".join(f"{names[k]} {ms(pct(req[k]['same'], 50))} / {ms(pct(req[k]['cross'], 50))}" for k in KINDS)
    )
    # What is left once the change's own answer is in (its commit included in both): the hop itself,
    # plus the waiter's own work (a hand-out commits a transaction; a follower only reads).
    after = {
        k: {side: [a - b for a, b in zip(lat[k][side], req[k][side], strict=True)] for side in SIDES} for k in KINDS
    }
    print(
        "the waiter's answer after the change's own answer, p50 same / cross: "
        + ", ".join(f"{k} {ms(pct(after[k]['same'], 50))} / {ms(pct(after[k]['cross'], 50))}" for k in KINDS)
    )
    for k in KINDS:
        for side in SIDES:
            out["kinds"][k][side]["after_change_answer_p50"] = pct(after[k][side], 50)
    print(
        f"first hand-out of the run (cold): cross {ms(warm['task']['cross'])} (A's first create, B's first "
        f"hand-out), then same {ms(warm['task']['same'])} (A's first hand-out)"
    )
    print(
        "first stop and log line (untimed warm-up), same / cross: "
        + ", ".join(f"{k} {ms(warm[k].get('same'))} / {ms(warm[k].get('cross'))}" for k in ("stop", "log line"))
    )
    print(f"misses (the waiter answered without the change): {len(r['misses'])}")
    for m in r["misses"][:10]:
        print(f"  {m}")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.1f}")
    out["cold_first_handout"] = {"cross": warm["task"]["cross"], "same": warm["task"]["same"]}
    out["loadavg"] = load[0]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--db",
        default="pg",
        help="pg (.ci/pg-up.sh's cluster on SLY_PG_PORT, default 55433) "
        "or a PostgreSQL SQLAlchemy URL; a fresh database is made on it",
    )
    ap.add_argument("--n", type=int, default=30, help="timed rounds of each kind on each side")
    ap.add_argument(
        "--server-arg", action="append", default=[], help="extra argument for python -m server (repeatable)"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    base = bench_cluster() if args.db == "pg" else args.db
    if not base.startswith("postgresql"):
        ap.error("--db must be pg or a postgresql URL: replicas share a PostgreSQL database")
    name = f"sly_bench_wake_{os.getpid()}"
    db_url = pg_database(base, name)
    servers: list[ServerProcess] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-wakeups-") as tmp:
            data = Path(tmp) / "data"
            extra = ["--db", db_url, "--log-level", "warning"] + args.server_arg
            try:
                start_replicas(servers, data, 2, extra)
                a, b = servers
                print(f"replicas up: A {a.url}, B {b.url}", file=sys.stderr)
                r = run_loop(run(args, a.url, b.url, a.admin_token))
                out = report(args, r)
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))
            finally:
                stop_servers(servers)
    finally:
        pg_database(base, name, drop=True)


if __name__ == "__main__":
    main()
