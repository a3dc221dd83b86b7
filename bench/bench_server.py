"""Server benchmark: task pickup over the long-poll and log ingest, each against a baseline run in
the same process against the same server.

    python bench/bench_server.py [--tasks 200] [--lines 200000] [--batch 5000] [--idle-polls 1000]

- pickup: an agent thread long-polls; the bench creates a task and times until the waiting poll
  returns it (p50/p99 over --tasks). Baseline: a plain GET /healthz round trip.
- the same pickup with --idle-polls other agents' long-polls open and idle (what they cost).
- ingest: --lines log lines in batches of --batch to POST /agent/v1/tasks/{id}/logs. Baseline: the
  same bytes POSTed to /api/v1/_echo, which reads and discards them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import UserClient  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


def bench_rtt(url: str, n: int) -> list[float]:
    s = requests.Session()
    s.get(url + "/healthz")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.get(url + "/healthz").raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def bench_create(client: UserClient, n: int) -> list[float]:
    """The create request alone (an agent that is not polling): the part of pickup that is not the poll."""
    a = client.create_agent("bench-create", ["custom"])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.create_task(a["id"], "custom", image="x:1")
        out.append(time.perf_counter() - t0)
    return out


def bench_pickup(url: str, client: UserClient, n: int) -> list[float]:
    a = client.create_agent("bench-pickup", ["custom"])
    agent = requests.Session()
    agent.headers["x-token"] = a["token"]
    received: dict[int, float] = {}
    got = threading.Event()
    stop = threading.Event()

    def agent_loop():
        running: list[int] = []  # tasks are finished at once: nothing is running between polls
        while not stop.is_set():
            r = agent.post(
                url + "/agent/v1/poll?wait=30", json={"free_slots": 1, "free_gpus": [], "running": running}, timeout=40
            ).json()
            now = time.perf_counter()
            for t in r["tasks"]:
                received[t["id"]] = now
            if r["tasks"]:
                got.set()
            for t in r["tasks"]:  # finish it, so the agent holds no task between measurements
                for state in ("running", "finished"):
                    agent.post(url + f"/agent/v1/tasks/{t['id']}/state", json={"state": state}).raise_for_status()

    th = threading.Thread(target=agent_loop, daemon=True)
    th.start()
    time.sleep(0.3)
    lat = []
    for _ in range(n):
        got.clear()
        t0 = time.perf_counter()
        tid = client.create_task(a["id"], "custom", image="x:1")["id"]
        if not got.wait(10):
            raise RuntimeError("the waiting poll did not return the task")
        lat.append(received[tid] - t0)
        time.sleep(0.03)  # let the agent finish it and its next poll reach the server and wait
    stop.set()
    client.create_task(a["id"], "custom", image="x:1")  # release the last poll
    th.join(5)
    return lat


class IdlePolls:
    """N agents' long-polls held open from one asyncio thread (raw HTTP/1.1, nothing read)."""

    def __init__(self, url: str, tokens: list[str]):
        self.host, self.port = url.split("//")[1].split(":")
        self.tokens = tokens
        self.loop = asyncio.new_event_loop()
        self.writers = []
        self.opened = threading.Event()

    async def _open(self):
        body = json.dumps({"free_slots": 0, "free_gpus": [], "running": []})
        for tok in self.tokens:
            r, w = await asyncio.open_connection(self.host, int(self.port))
            w.write(
                (
                    f"POST /agent/v1/poll?wait=60 HTTP/1.1\r\nhost: x\r\nx-token: {tok}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
                ).encode()
            )
            self.writers.append(w)
        self.opened.set()

    def start(self):
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop)
        self.opened.wait(120)

    def close(self):
        for w in self.writers:
            self.loop.call_soon_threadsafe(w.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def open_polls(url: str) -> int:
    for line in requests.get(url + "/metrics").text.splitlines():
        if line.startswith("sly_longpolls_open "):
            return int(float(line.split()[1]))
    return -1


def bench_ingest(url: str, client: UserClient, total: int, batch: int) -> tuple[float, float, int]:
    a = client.create_agent("bench-ingest", ["custom"])
    tid = client.create_task(a["id"], "custom", image="x:1")["id"]
    s = requests.Session()
    s.headers.update({"x-token": a["token"], "content-type": "application/json"})
    s.post(url + "/agent/v1/poll", json={"free_slots": 1}).raise_for_status()
    bodies = []
    for first in range(0, total, batch):
        lines = [
            {
                "ts": 1700000000.0 + i / 1000,
                "level": "info",
                "stream": "stdout",
                "message": f"epoch 3 step {i} loss=0.{i % 9973:04d} lr=0.0003 throughput=412.5 img/s",
            }
            for i in range(first, min(total, first + batch))
        ]
        bodies.append(json.dumps({"first_seq": first, "lines": lines}).encode())
    nbytes = sum(len(b) for b in bodies)
    admin = client.session
    t0 = time.perf_counter()
    for b in bodies:
        admin.post(url + "/api/v1/_echo", data=b, headers={"content-type": "application/json"}).raise_for_status()
    echo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acked = -1
    for b in bodies:
        r = s.post(url + f"/agent/v1/tasks/{tid}/logs", data=b)
        r.raise_for_status()
        acked = r.json()["acked"]
    ingest_s = time.perf_counter() - t0
    assert acked == total - 1, acked
    return ingest_s, echo_s, nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--idle-polls", type=int, default=1000)
    args = ap.parse_args()
    srv = ServerProcess(Path(tempfile.mkdtemp(prefix="bench-server-")) / "data", extra_args=["--echo-endpoint"]).start()
    try:
        url = srv.url
        client = UserClient(url, srv.admin_token)
        proc = psutil.Process(srv.proc.pid)
        rtt = bench_rtt(url, args.tasks)
        create = bench_create(client, args.tasks)
        pick = bench_pickup(url, client, args.tasks)
        rows = [
            ("GET /healthz round trip (baseline)", rtt),
            ("POST /api/v1/tasks round trip, no poll waiting", create),
            ("task created -> waiting long-poll returns it", pick),
        ]

        idle_info = ""
        if args.idle_polls:
            tokens = [client.create_agent(f"idle-{i}", ["custom"])["token"] for i in range(args.idle_polls)]
            idle = IdlePolls(url, tokens)
            idle.start()
            deadline = time.time() + 60
            while open_polls(url) < args.idle_polls and time.time() < deadline:
                time.sleep(0.2)
            n_open = open_polls(url)
            c0 = proc.cpu_times()
            time.sleep(3)
            c1 = proc.cpu_times()
            cpu = max(0.0, (c1.user + c1.system - c0.user - c0.system) / 3 * 100)
            rss = proc.memory_info().rss / 2**20
            rtt2 = bench_rtt(url, args.tasks)
            pick2 = bench_pickup(url, client, args.tasks)
            idle.close()
            rows += [
                (f"GET /healthz with {n_open} idle long-polls open", rtt2),
                (f"pickup with {n_open} idle long-polls open", pick2),
            ]
            idle_info = f"{n_open} idle long-polls open: server CPU {cpu:.1f} % of one core, RSS {rss:.0f} MiB"

        ingest_s, echo_s, nbytes = bench_ingest(url, client, args.lines, args.batch)
    finally:
        srv.stop()

    base50 = statistics.median(rtt)
    print(f"\n## pickup over the long-poll ({args.tasks} tasks, loopback)\n")
    print("| what | p50 | p99 | p50 / baseline p50 |")
    print("|---|---|---|---|")
    for name, xs in rows:
        print(f"| {name} | {ms(statistics.median(xs))} | {ms(pct(xs, 99))} | {statistics.median(xs) / base50:.2f}x |")
    if idle_info:
        print(f"\n{idle_info}")
    mib = nbytes / 2**20
    print(f"\n## log ingest ({args.lines} lines in batches of {args.batch}, {mib:.1f} MiB of JSON)\n")
    print("| what | time | lines/s | MiB/s | ratio |")
    print("|---|---|---|---|---|")
    print(
        f"| POST same bytes to /api/v1/_echo (baseline) | {echo_s:.2f} s | {args.lines / echo_s:,.0f} "
        f"| {mib / echo_s:.1f} | 1.00x |"
    )
    print(
        f"| POST /agent/v1/tasks/{{id}}/logs (stored, acked) | {ingest_s:.2f} s | {args.lines / ingest_s:,.0f} "
        f"| {mib / ingest_s:.1f} | {ingest_s / echo_s:.2f}x time |"
    )


if __name__ == "__main__":
    main()
