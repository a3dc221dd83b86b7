"""Fleet benchmark: N simulated nodes against real server processes, tasks created at a steady rate.

    python bench/bench_fleet.py [--nodes 200] [--tasks 500] [--rate 10] [--db sqlite|pg|URL]
                                [--replicas 1] [--console] [--json FILE]

Each simulated node (one asyncio task group, no agent code) does what the agent does on the wire:
connect, a long-poll `POST /agent/v1/poll?wait=25` (1 s while its 2 slots are full) that lists its
running tasks, telemetry every 5 s (a sample of about 4 KB), and for every task it is handed:
state `running`, 200 log lines in 4 batches spread over --task-s seconds, state `finished`.

Tasks are created through the user API (`POST /api/v1/tasks`) at --rate per second, for the nodes
in turn. Measured, p50 / p99 / max:
- pickup: the task's `created_at` (server clock, same machine) to the poll answer that carries it;
- create, log POST, state POST, telemetry POST, `/healthz` (probed every second), and with
  --console one console tab's `GET /api/v1/agents` every 5 s;
- errors (HTTP status >= 400 or a broken connection) and client timeouts, per kind of request;
- server CPU (% of one core over the load phase) and peak RSS per replica, and PostgreSQL's CPU;
- the simulator itself: its event-loop lag and its CPU, to tell a slow server from a slow simulator.

--db sqlite: a fresh data dir. --db pg: a durable cluster that `.ci/pg-up.sh` starts on port 55433
(SLY_PG_PORT overrides). --db URL: a PostgreSQL server; either way the bench creates a fresh
database on it and drops it at the end.
--replicas N: N separate `python -m server` processes sharing the data dir and the database, no
balancer: node i talks to replica i mod N, and tasks are created on the replicas in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import orjson
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.procs import free_port  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402

TIMEOUT_KINDS = (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)


# ---------------------------------------------------------------- measurements
class Stats:
    def __init__(self):
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.timeouts: dict[str, int] = defaultdict(int)
        self.samples: dict[str, str] = {}  # kind -> one example error message
        self.bytes: dict[str, int] = defaultdict(int)

    def error(self, kind: str, what: str, timeout: bool = False) -> None:
        (self.timeouts if timeout else self.errors)[kind] += 1
        self.samples.setdefault(kind, what)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def fmt_ms(x: float) -> str:
    if x != x:
        return "-"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def telemetry_sample(free_slots: int, per_core: list[float] | None = None) -> dict:
    """About 4 KB, the shape of agent/telemetry.py's sample on an 8-GPU box. A node draws its
    per-core figures once (`per_core`): the server's work does not depend on them."""
    return {
        "ts": time.time(),
        "cpu": {
            "percent": 37.5,
            "count": 128,
            "per_core": per_core or [round(random.random() * 100, 1) for _ in range(128)],
        },
        "memory": {"total": 540_000_000_000, "available": 300_000_000_000, "used": 240_000_000_000, "percent": 44.4},
        "swap": {"total": 0, "used": 0, "percent": 0.0},
        "disks": [
            {
                "path": p,
                "total": 4_000_000_000_000,
                "used": 1_000_000_000_000,
                "free": 3_000_000_000_000,
                "percent": 25.0,
            }
            for p in ("/", "/var/lib/docker", "/data")
        ],
        "network": {"bytes_sent": 123_456_789_012, "bytes_recv": 987_654_321_098},
        "load": [12.1, 11.7, 10.9],
        "gpus": [
            {
                "index": i,
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": f"GPU-{i:08x}-0000-0000-0000-000000000000",
                "memory_total": 85_899_345_920,
                "memory_used": 40_000_000_000,
                "utilization": 87,
                "temperature": 61,
                "power_w": 512.3,
                "processes": [{"pid": 1000 + i, "used_memory": 39_000_000_000}],
            }
            for i in range(8)
        ],
        "docker": {"server_version": "24.0.7", "containers_running": 2, "images": 41},
        "containers": [
            {
                "id": "c" * 64,
                "name": f"sly-task-{i}",
                "status": "running",
                "cpu_percent": 99.0,
                "memory_usage": 20_000_000_000,
            }
            for i in range(2)
        ],
        "free_slots": free_slots,
    }


SYSTEM_INFO = {
    "hostname": "sim",
    "os": "Linux 6.1",
    "cpu_count": 64,
    "memory_total": 540_000_000_000,
    "gpus": [{"index": i, "name": "NVIDIA H100 80GB HBM3"} for i in range(8)],
    "agent_version": "bench",
}


# ---------------------------------------------------------------- the simulated fleet
class Fleet:
    def __init__(self, args, urls: list[str], admin_token: str):
        self.a = args
        self.urls = urls
        self.admin = {"Authorization": f"Bearer {admin_token}"}
        self.st = Stats()
        self.created: dict[int, float] = {}  # task id -> server created_at
        self.delivered: dict[int, float] = {}  # task id -> wall time of the poll answer
        self.handed_twice = 0
        self.finished = 0
        self.all_finished = asyncio.Event()
        self.stopping = False
        self.timeout = aiohttp.ClientTimeout(total=args.req_timeout)
        self.sessions: list[aiohttp.ClientSession] = []
        self.measuring = False
        self.connected = 0

    def session(self, i: int) -> aiohttp.ClientSession:
        return self.sessions[i % len(self.sessions)]

    async def open(self) -> None:
        per = -(-self.a.nodes // len(self.urls))
        for url in self.urls:
            # A node holds a poll, a telemetry POST and up to two task requests at once.
            # Idle connections are closed before uvicorn's 5 s keep-alive ends, so that no request
            # goes out on a connection the server is closing (a reset that is no server fault).
            conn = aiohttp.TCPConnector(limit=per * 4 + 64, limit_per_host=0, keepalive_timeout=3.0)
            self.sessions.append(aiohttp.ClientSession(url, connector=conn, timeout=self.timeout))

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()

    async def call(
        self,
        kind: str,
        sess: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        headers=None,
        json_body=None,
        timeout=None,
        record=True,
    ):
        """One request; its latency recorded under `kind`; None on failure (counted)."""
        t0 = time.perf_counter()
        try:
            # orjson, not aiohttp's json.dumps: the simulator must stay cheaper than the servers it loads.
            data = orjson.dumps(json_body) if json_body is not None else None
            headers = {**(headers or {}), "content-type": "application/json"} if data is not None else headers
            async with sess.request(
                method,
                path,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None,
            ) as r:
                body = await r.read()
                dt = time.perf_counter() - t0
                if r.status >= 400:
                    self.st.error(kind, f"HTTP {r.status}: {body[:200]!r}")
                    return None
                if record and self.measuring:
                    self.st.lat[kind].append(dt)
                    self.st.bytes[kind] += len(body)
                return orjson.loads(body) if body else {}
        except TIMEOUT_KINDS as e:
            if not self.stopping:
                self.st.error(kind, f"timeout {e!r}", timeout=True)
        except (aiohttp.ClientError, OSError) as e:
            if not self.stopping:
                self.st.error(kind, repr(e))
        return None

    async def create_agents(self) -> list[tuple[int, str]]:
        sem = asyncio.Semaphore(16)

        async def one(i):
            async with sem:
                for _ in range(5):
                    r = await self.call(
                        "create agent",
                        self.session(i),
                        "POST",
                        "/api/v1/agents",
                        headers=self.admin,
                        json_body={"name": f"sim-{i}", "allowed_task_types": ["custom"]},
                    )
                    if r:
                        return r["id"], r["token"]
                    await asyncio.sleep(1)
                raise RuntimeError(f"could not create agent {i}: {self.st.samples}")

        return await asyncio.gather(*(one(i) for i in range(self.a.nodes)))

    # --- one node
    async def node(self, i: int, token: str) -> None:
        sess = self.session(i)
        h = {"x-token": token}
        running: dict[int, asyncio.Task] = {}
        await asyncio.sleep(random.random() * 2)  # nodes do not all start in the same millisecond
        while (
            not self.stopping
            and await self.call("connect", sess, "POST", "/agent/v1/connect", headers=h, json_body=SYSTEM_INFO) is None
        ):
            await asyncio.sleep(1)
        self.connected += 1
        tele = asyncio.create_task(self.telemetry(sess, h, running))
        try:
            while not self.stopping:
                free = self.a.slots - len(running)
                wait = self.a.poll_wait if free > 0 else 1.0
                r = await self.call(
                    "poll",
                    sess,
                    "POST",
                    f"/agent/v1/poll?wait={wait:g}",
                    headers=h,
                    json_body={"free_slots": free, "free_gpus": [], "running": sorted(running)},
                    timeout=wait + self.a.req_timeout,
                    record=False,
                )
                now = time.time()
                if r is None:
                    await asyncio.sleep(1)
                    continue
                for t in r.get("tasks", []):
                    tid = t["id"]
                    if tid in self.delivered:
                        self.handed_twice += 1
                    else:
                        self.delivered[tid] = now
                    if tid not in running:
                        running[tid] = asyncio.create_task(self.run_task(sess, h, tid, running))
        finally:
            tele.cancel()
            for t in running.values():
                t.cancel()

    async def telemetry(self, sess, h, running) -> None:
        await asyncio.sleep(random.random() * self.a.telemetry_s)
        # Drawn once: the server's work does not depend on the figures, and the simulator stays cheap.
        base = telemetry_sample(self.a.slots, [round(random.random() * 100, 1) for _ in range(128)])
        while not self.stopping:
            t0 = time.monotonic()
            await self.call(
                "telemetry POST",
                sess,
                "POST",
                "/agent/v1/telemetry",
                headers=h,
                json_body=dict(base, ts=time.time(), free_slots=self.a.slots - len(running)),
            )
            await asyncio.sleep(max(0.0, self.a.telemetry_s - (time.monotonic() - t0)))

    async def must(self, kind, sess, path, h, body) -> bool:
        """A node retries what it must deliver, as the agent does."""
        for _ in range(5):
            if await self.call(kind, sess, "POST", path, headers=h, json_body=body) is not None:
                return True
            if self.stopping:
                return False
            await asyncio.sleep(1)
        return False

    async def run_task(self, sess, h, tid: int, running: dict) -> None:
        try:
            await self.must("state POST", sess, f"/agent/v1/tasks/{tid}/state", h, {"state": "running"})
            per = self.a.lines // self.a.batches
            seq = 0
            for b in range(self.a.batches):
                await asyncio.sleep(self.a.task_s / self.a.batches)
                n = per if b < self.a.batches - 1 else self.a.lines - seq
                lines = [
                    {
                        "ts": time.time(),
                        "level": "info",
                        "stream": "stdout",
                        "message": f"epoch {b} step {seq + j} loss 0.{random.randrange(10**6):06d} " + "x" * 40,
                    }
                    for j in range(n)
                ]
                await self.must("log POST", sess, f"/agent/v1/tasks/{tid}/logs", h, {"first_seq": seq, "lines": lines})
                seq += n
            if await self.must(
                "state POST", sess, f"/agent/v1/tasks/{tid}/state", h, {"state": "finished", "exit_code": 0}
            ):
                self.finished += 1
                if self.finished >= self.a.tasks:
                    self.all_finished.set()
        finally:
            running.pop(tid, None)

    # --- the user side
    async def creator(self, agent_ids: list[int]) -> None:
        start = time.monotonic()
        for k in range(self.a.tasks):
            await asyncio.sleep(max(0.0, start + k / self.a.rate - time.monotonic()))
            asyncio.create_task(self.create_one(k, agent_ids[k % len(agent_ids)]))

    async def create_one(self, k: int, agent_id: int) -> None:
        r = await self.call(
            "create task",
            self.session(k),
            "POST",
            "/api/v1/tasks",
            headers=self.admin,
            json_body={"agent_id": agent_id, "type": "custom", "image": "bench:1"},
        )
        if r is not None:
            self.created[r["id"]] = r["created_at"]

    async def console(self) -> None:
        while not self.stopping:
            t0 = time.monotonic()
            await self.call("console GET /agents", self.sessions[0], "GET", "/api/v1/agents", headers=self.admin)
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))

    async def healthz(self) -> None:
        k = 0
        while not self.stopping:
            await self.call("/healthz", self.session(k), "GET", "/healthz")
            k += 1
            await asyncio.sleep(1.0)


async def server_lag(sess: aiohttp.ClientSession) -> dict[float, float]:
    """The server's event-loop lag histogram (`sly_event_loop_lag_seconds`): upper bound -> count."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with sess.get("/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "sly_event_loop_lag_seconds":
            for smp in fam.samples:
                if smp.name.endswith("_bucket"):
                    out[float(smp.labels["le"])] = smp.value
    return out


def lag_counts(before: dict, after: dict) -> tuple[int, int, int]:
    """(timer checks, checks over 250 ms late, over 1 s late) between two histograms."""

    def above(h, le):
        return h.get(float("inf"), 0) - h.get(le, 0)

    d = lambda h: (h.get(float("inf"), 0), above(h, 0.25), above(h, 1.0))  # noqa: E731
    b, a = d(before), d(after)
    return int(a[0] - b[0]), int(a[1] - b[1]), int(a[2] - b[2])


async def loop_lag(out: list[float], stop: asyncio.Event, every: float = 0.1) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(every)
        out.append(time.perf_counter() - t0 - every)


# ---------------------------------------------------------------- processes: servers, database, CPU
def pg_database(url: str, name: str, drop: bool = False) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            if not drop:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def postmaster(url: str) -> psutil.Process | None:
    """The PostgreSQL server process listening on the URL's port (to count its CPU), if visible."""
    from sqlalchemy.engine import make_url

    port = make_url(url).port or 5432
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                return psutil.Process(c.pid)
    except (psutil.AccessDenied, psutil.Error):
        pass
    return None


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def raise_nofile(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the servers inherit it
        soft = hard
    if soft < need:
        print(f"warning: ulimit -n is {soft}; {need} or more is advised for {need // 5} nodes", file=sys.stderr)
    return soft


# ---------------------------------------------------------------- the run
async def run(args, urls, admin_token, servers: list[ServerProcess], pg: psutil.Process | None) -> dict:
    fleet = Fleet(args, urls, admin_token)
    await fleet.open()
    me = psutil.Process()
    try:
        t0 = time.monotonic()
        agents = await fleet.create_agents()
        print(f"{len(agents)} nodes created in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        # The server's collector settings here too (server/__main__.py): with the default ones a full
        # collection of the simulator's heap stalled its loop for up to a second, which the
        # latencies it measures would include.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        nodes = [asyncio.create_task(fleet.node(i, tok)) for i, (_aid, tok) in enumerate(agents)]
        # Every node connected (the burst of a fleet starting at once is over), then --warmup more:
        # the load phase measures the steady state.
        t1 = time.monotonic()
        while fleet.connected < len(agents) and time.monotonic() - t1 < 120:
            await asyncio.sleep(0.2)
        print(f"{fleet.connected} nodes connected in {time.monotonic() - t1:.1f} s", file=sys.stderr)
        await asyncio.sleep(args.warmup)
        lag: list[float] = []
        stop_lag = asyncio.Event()
        side = [asyncio.create_task(loop_lag(lag, stop_lag)), asyncio.create_task(fleet.healthz())]
        if args.console:
            side.append(asyncio.create_task(fleet.console()))
        srv_procs = [psutil.Process(s.proc.pid) for s in servers]
        pg_procs = ([pg] + pg.children()) if pg else []
        cpu0 = [cpu_seconds([p]) for p in srv_procs]
        pg0, me0 = cpu_seconds(pg_procs), cpu_seconds([me])
        rss_peak = [0] * len(srv_procs)
        lag0 = [await server_lag(sess) for sess in fleet.sessions]
        fleet.measuring = True
        load0 = os.getloadavg()[0]
        w0 = time.monotonic()
        creator = asyncio.create_task(fleet.creator([a for a, _ in agents]))

        async def rss_sampler():
            while True:
                for i, p in enumerate(srv_procs):
                    try:
                        rss_peak[i] = max(rss_peak[i], p.memory_info().rss)
                    except psutil.Error:
                        pass
                await asyncio.sleep(1)

        side.append(asyncio.create_task(rss_sampler()))
        deadline = args.tasks / args.rate + args.drain
        try:
            await asyncio.wait_for(fleet.all_finished.wait(), deadline)
        except TimeoutError:
            print(f"not every task finished within {deadline:.0f} s", file=sys.stderr)
        wall = time.monotonic() - w0
        fleet.measuring = False
        srv_lag = [lag_counts(b, await server_lag(sess)) for b, sess in zip(lag0, fleet.sessions, strict=True)]
        if pg:  # backends that started during the run count from zero
            pg_procs = [pg] + pg.children()
        cpu = [(cpu_seconds([p]) - c) / wall * 100 for p, c in zip(srv_procs, cpu0, strict=True)]
        pg_cpu = (cpu_seconds(pg_procs) - pg0) / wall * 100 if pg else None
        me_cpu = (cpu_seconds([me]) - me0) / wall * 100
        stop_lag.set()
        fleet.stopping = True
        creator.cancel()
        for t in side + nodes:
            t.cancel()
        await asyncio.gather(*side, *nodes, creator, return_exceptions=True)
    finally:
        fleet.stopping = True
        await fleet.close()
    pickup = [fleet.delivered[t] - c for t, c in fleet.created.items() if t in fleet.delivered]
    return {
        "fleet": fleet,
        "pickup": pickup,
        "wall": wall,
        "cpu": cpu,
        "rss": rss_peak,
        "pg_cpu": pg_cpu,
        "me_cpu": me_cpu,
        "lag": lag,
        "srv_lag": srv_lag,
        "load": (load0, os.getloadavg()[0]),
    }


def pickup_windows(f: Fleet, width: float = 10.0) -> list[float]:
    """Pickup p99 of the tasks created in each `width` seconds of the run: a slow start (every
    node's first requests at once) shows apart from a steady state."""
    if not f.created:
        return []
    t0 = min(f.created.values())
    by: dict[int, list[float]] = defaultdict(list)
    for t, c in f.created.items():
        if t in f.delivered:
            by[int((c - t0) // width)].append(f.delivered[t] - c)
    return [pct(by[k], 99) for k in sorted(by)]


def report(args, db_label: str, r: dict) -> dict:
    f: Fleet = r["fleet"]
    st = f.st
    rows = [("pickup", r["pickup"])] + [
        (k, st.lat[k])
        for k in ("create task", "log POST", "state POST", "telemetry POST", "/healthz", "console GET /agents")
        if k in st.lat
    ]
    print(
        f"\nbench_fleet: {args.nodes} nodes, {args.tasks} tasks at {args.rate:g}/s, db {db_label}, "
        f"{args.replicas} replica(s){', one console tab' if args.console else ''}; load phase {r['wall']:.1f} s"
    )
    print(f"{'':22} {'n':>6} {'p50':>9} {'p99':>9} {'max':>9}")
    for name, xs in rows:
        worst = max(xs) if xs else float('nan')
        print(f"{name:22} {len(xs):>6} {fmt_ms(pct(xs, 50)):>9} {fmt_ms(pct(xs, 99)):>9} {fmt_ms(worst):>9}")
    if "console GET /agents" in st.lat:
        n = len(st.lat["console GET /agents"])
        print(f"{'':22} console answer {st.bytes['console GET /agents'] / max(1, n) / 1e6:.2f} MB")
    windows = pickup_windows(f)
    if windows:
        print("pickup p99 by 10 s of task creation: " + ", ".join(fmt_ms(w) for w in windows))
    kinds = sorted(set(st.errors) | set(st.timeouts))
    print(
        f"tasks: {len(f.created)} created, {len(f.delivered)} delivered, {f.finished} finished, "
        f"{f.handed_twice} handed out twice"
    )
    print(
        "errors: " + (", ".join(f"{k} {st.errors.get(k, 0)} + {st.timeouts.get(k, 0)} timeouts" for k in kinds) or "0")
    )
    for k in kinds:
        print(f"  e.g. {k}: {st.samples[k][:160]}")
    for i, (c, m, lg) in enumerate(zip(r["cpu"], r["rss"], r["srv_lag"], strict=True)):
        print(
            f"server {i}: CPU {c:.0f} % of a core, peak RSS {m / 2**20:.0f} MiB, event loop late by over "
            f"250 ms {lg[1]} and over 1 s {lg[2]} of {lg[0]} checks"
        )
    if r["pg_cpu"] is not None:
        print(f"postgresql: CPU {r['pg_cpu']:.0f} % of a core")
    lag = r["lag"]
    ok = pct(lag, 99) < 0.05 and r["me_cpu"] < 70
    print(
        f"simulator: CPU {r['me_cpu']:.0f} % of a core, event-loop lag p50 {fmt_ms(pct(lag, 50))} "
        f"p99 {fmt_ms(pct(lag, 99))} max {fmt_ms(max(lag) if lag else float('nan'))} -> "
        + (
            "not the bottleneck"
            if ok
            else "MAY BE THE BOTTLENECK (lag p99 >= 50 ms or CPU >= 70 %): read the latencies as upper bounds"
        )
    )
    # Other work on the machine takes CPU from the server and the simulator alike.
    print(
        f"machine: {os.cpu_count()} cores, load average {r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end"
    )
    return {
        "nodes": args.nodes,
        "tasks": args.tasks,
        "rate": args.rate,
        "db": db_label,
        "replicas": args.replicas,
        "console": args.console,
        "wall_s": r["wall"],
        "latency": {
            name: {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99), "max": max(xs) if xs else None}
            for name, xs in rows
        },
        "pickup_p99_by_10s": pickup_windows(f),
        "created": len(f.created),
        "delivered": len(f.delivered),
        "finished": f.finished,
        "handed_twice": f.handed_twice,
        "errors": dict(st.errors),
        "timeouts": dict(st.timeouts),
        "server_loop_late": [{"checks": a, "over_250ms": b, "over_1s": c} for a, b, c in r["srv_lag"]],
        "server_cpu_pct": r["cpu"],
        "server_rss_peak": r["rss"],
        "pg_cpu_pct": r["pg_cpu"],
        "sim_cpu_pct": r["me_cpu"],
        "sim_lag_p99": pct(lag, 99),
        "sim_ok": ok,
        "loadavg": r["load"],
    }


def run_loop(coro):
    """uvloop when installed (the server's loop too): the simulator's own cost stays small."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--rate", type=float, default=10.0, help="tasks created per second")
    ap.add_argument("--db", default="sqlite", help="sqlite | pg (.ci/pg-up.sh) | a PostgreSQL SQLAlchemy URL")
    ap.add_argument("--replicas", type=int, default=1, help="separate server processes, nodes spread round-robin")
    ap.add_argument("--console", action="store_true", help="one console tab: GET /api/v1/agents every 5 s")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--poll-wait", type=float, default=25.0)
    ap.add_argument("--telemetry-s", type=float, default=5.0)
    ap.add_argument("--lines", type=int, default=200, help="log lines per task")
    ap.add_argument("--batches", type=int, default=4, help="log POSTs per task")
    ap.add_argument("--task-s", type=float, default=2.0, help="how long a task runs (its log batches spread over it)")
    ap.add_argument(
        "--warmup", type=float, default=5.0, help="seconds between the last node's connect and the first task"
    )
    ap.add_argument("--drain", type=float, default=60.0, help="seconds after the last creation to wait for the rest")
    ap.add_argument(
        "--req-timeout", type=float, default=10.0, help="client timeout of one request (a poll: wait + this)"
    )
    ap.add_argument(
        "--server-arg", action="append", default=[], help="extra argument for python -m server (repeatable)"
    )
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    nofile = raise_nofile(args.nodes * 5 + 200)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        data = Path(tmp) / "data"
        db_url, drop, db_label = None, None, "sqlite"
        if args.db != "sqlite":
            base = bench_cluster() if args.db == "pg" else args.db
            name = f"sly_bench_{os.getpid()}"
            db_url, drop, db_label = pg_database(base, name), (base, name), "postgresql"
        servers: list[ServerProcess] = []
        try:
            extra = (["--db", db_url] if db_url else []) + args.server_arg + ["--log-level", "warning"]
            start_replicas(servers, data, args.replicas, extra)
            token = servers[0].admin_token
            print(f"{len(servers)} server(s) up ({db_label}); ulimit -n {nofile}", file=sys.stderr)
            pg = postmaster(db_url) if db_url else None
            r = run_loop(run(args, [s.url for s in servers], token, servers, pg))
            out = report(args, db_label, r)
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=1))
        finally:
            stop_servers(servers)
            if drop:
                pg_database(drop[0], drop[1], drop=True)


def bench_cluster() -> str:
    """The benchmarks' PostgreSQL cluster (.ci/pg-up.sh on SLY_PG_PORT, default 55433), durable
    (fsync on), unlike the tests' (SLY_PG_FAST=1); its URL."""
    env = dict(os.environ, SLY_PG_PORT=os.environ.get("SLY_PG_PORT", "55433"), SLY_PG_FAST="0")
    return subprocess.run(
        ["bash", str(REPO / ".ci/pg-up.sh")], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def start_replicas(servers: list, data: Path, n: int, extra: list[str]) -> None:
    """Start `n` server processes on one data dir and `extra` arguments, sharing one admin token;
    each is appended to `servers` once up (so that the caller stops what did start)."""
    for _ in range(n):
        s = ServerProcess(data, port=free_port(), extra_args=extra)
        if servers:
            s.admin_token = servers[0].admin_token
        servers.append(s.start(timeout=60))


def stop_servers(servers: list) -> None:
    """Stop them; print the end of the log of any that logged an error."""
    for s in servers:
        s.stop()
        log = s.log_path.read_text(errors="replace") if s.log_path.exists() else ""
        if "Traceback" in log or " ERROR " in log or " CRITICAL " in log:
            print(
                f"--- server {s.port} logged errors; its log's end:\n" + "\n".join(log.splitlines()[-40:]),
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
