"""Server CPU per request, by kind of request, against GET /healthz in the same run.

    python bench/bench_request_cpu.py [--n 300] [--db sqlite|URL]

One client sends N requests of a kind one after another to a real `python -m server`; the
server process's CPU time (user + system, all its threads) over those N, divided by N, is the
figure. /healthz (no database, no body) is the baseline: the ratio says what a request costs
beyond the HTTP server and the framework. Kinds: a 4 KB telemetry sample, a poll answered at
once, a state post (progress), a 50-line log batch, a task created by the user API, and the
nodes list.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_fleet import pg_database, telemetry_sample  # noqa: E402

from tests.support.server import ServerProcess  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--db", default="sqlite", help="sqlite, or a PostgreSQL SQLAlchemy URL (a database is made on it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        extra, drop = ["--log-level", "warning"], None
        if args.db != "sqlite":
            name = f"sly_cpu_{os.getpid()}"
            extra += ["--db", pg_database(args.db, name)]
            drop = (args.db, name)
        s = ServerProcess(Path(tmp) / "data", extra_args=extra).start()
        try:
            run(s, args.n, "sqlite" if drop is None else "postgresql")
        finally:
            s.stop()
            if drop:
                pg_database(*drop, drop=True)


def run(s: ServerProcess, n: int, label: str) -> None:
    admin = s.admin()
    a = admin.post(s.url + "/api/v1/agents", json={"name": "n1"}).json()
    node = requests.Session()
    node.headers["x-token"] = a["token"]
    node.post(s.url + "/agent/v1/connect", json={"hostname": "bench"}).raise_for_status()
    tid = admin.post(s.url + "/api/v1/tasks", json={"agent_id": a["id"], "type": "custom", "image": "x:1"}).json()["id"]
    node.post(
        s.url + "/agent/v1/poll?wait=0", json={"free_slots": 1, "free_gpus": [], "running": []}
    ).raise_for_status()
    node.post(s.url + f"/agent/v1/tasks/{tid}/state", json={"state": "running"}).raise_for_status()
    sample = json.dumps(telemetry_sample(1)).encode()
    seq = [0]

    def logs():
        lines = [
            {
                "ts": time.time(),
                "level": "info",
                "stream": "stdout",
                "message": f"step {seq[0] + j} loss 0.{random.randrange(10**6):06d} " + "x" * 40,
            }
            for j in range(50)
        ]
        node.post(s.url + f"/agent/v1/tasks/{tid}/logs", json={"first_seq": seq[0], "lines": lines}).raise_for_status()
        seq[0] += 50

    kinds = [
        ("GET /healthz", lambda: node.get(s.url + "/healthz").raise_for_status()),
        (
            "telemetry (4 KB)",
            lambda: node.post(
                s.url + "/agent/v1/telemetry", data=sample, headers={"content-type": "application/json"}
            ).raise_for_status(),
        ),
        (
            "poll, answered at once",
            lambda: node.post(
                s.url + "/agent/v1/poll?wait=0", json={"free_slots": 0, "free_gpus": [], "running": [tid]}
            ).raise_for_status(),
        ),
        (
            "state (progress)",
            lambda: node.post(
                s.url + f"/agent/v1/tasks/{tid}/state",
                json={"state": "running", "progress": {"current": 1, "total": 10}},
            ).raise_for_status(),
        ),
        ("log batch (50 lines)", logs),
        (
            "create task (user)",
            lambda: admin.post(
                s.url + "/api/v1/tasks", json={"agent_id": a["id"], "type": "custom", "image": "x:1"}
            ).raise_for_status(),
        ),
        ("nodes list (user)", lambda: admin.get(s.url + "/api/v1/agents").raise_for_status()),
    ]
    proc = psutil.Process(s.proc.pid)

    def measure(fn) -> tuple[float, float]:
        for _ in range(20):
            fn()
        c0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
        for _ in range(n):
            fn()
        return (sum(proc.cpu_times()[:2]) - c0) / n, (time.perf_counter() - t0) / n

    results = [(name, *measure(fn)) for name, fn in kinds]
    results.append(("GET /healthz (again)", *measure(kinds[0][1])))
    base = min(results[0][1], results[-1][1])  # the baseline measured before and after the rest
    print(f"server CPU per request, {label}, {n} requests each, one client")
    print(f"{'':26} {'CPU ms':>8} {'wall ms':>8} {'x healthz':>10}")
    for name, cpu, wall in results:
        print(f"{name:26} {cpu * 1000:8.2f} {wall * 1000:8.2f} {cpu / base:9.1f}x")


if __name__ == "__main__":
    main()
