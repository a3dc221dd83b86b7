"""End-to-end figures of task execution, each against a baseline measured in the same run.

    python bench/bench_e2e.py [--runs 5] [--lines 1000000] [--files 2000] [--file-kb 16]
                              [--only pickup,life,logs,download] [--timeline]

Starts the real server (`python -m server`) and the real agent (`python -m agent`, real
handlers) on loopback, against the local Docker engine, with the locally built busybox image:

  pickup      task created -> its container started (State.StartedAt), vs `docker run -d`
  whole life  a trivial task (`true`) created -> finished on the server, vs `docker run --rm`
  log lines   a container printing N lines: first line -> all N lines stored on the server, in
              order, vs the same container run with its output to /dev/null
  download    a project of N files: first preparation (handler's downloader, empty cache) vs a
              plain parallel HTTP fetch of the same blobs; then the cached second preparation
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import docker
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client import UserClient  # noqa: E402
from node.api import AgentAPI  # noqa: E402
from node.config import Config  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402
from tools.images import ensure_busybox_image  # noqa: E402
from workers.base import TaskContext  # noqa: E402
from workers.docker_task import prepare  # noqa: E402


def started_at(container) -> float:
    s = container.attrs["State"]["StartedAt"]
    return datetime.fromisoformat(s[:26].rstrip("Z") + "+00:00").timestamp()


def wait(pred, timeout=120.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("bench: condition not met in time")


class Agent:
    def __init__(self, server: ServerProcess, user: UserClient, root: Path):
        body = user.create_agent(f"bench-{os.getpid()}-{root.name}")
        self.id, self.token, self.root = body["id"], body["token"], root
        env = dict(
            os.environ,
            SERVER_ADDRESS=server.url,
            ACCESS_TOKEN=self.token,
            AGENT_HOST_DIR=str(root),
            MIN_FREE_DISK_MB="1",
            MAX_TASKS="2",
            PYTHONUNBUFFERED="1",
            TASK_DIR_CLEANUP="always",
        )
        env.pop("SLY_AGENT_HANDLER", None)
        self.log = open(root.parent / f"{root.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def final(user: UserClient, task_id: int, timeout=300.0) -> dict:
    return wait(
        lambda: (t := user.get_task(task_id))["state"] in ("finished", "failed", "stopped", "lost") and t,
        timeout=timeout,
        interval=0.01,
    )


def bench_pickup(user, agent, dc, image, runs):
    ours, bare = [], []
    for _ in range(runs):
        t0 = time.time()
        task = user.create_task(agent.id, "custom", image=image, command=["sleep", "5"])
        c = wait(lambda task=task: _get(dc, f"sly_task_{task['id']}"), interval=0.002)
        wait(lambda c=c: c.reload() or c.attrs["State"]["StartedAt"][:4] != "0001", interval=0.002)
        ours.append(started_at(c) - t0)
        user.stop_task(task["id"])
        t0 = time.time()
        cid = subprocess.run(
            ["docker", "run", "-d", image, "sleep", "5"], capture_output=True, text=True, check=True
        ).stdout.strip()
        b = dc.containers.get(cid)
        bare.append(started_at(b) - t0)
        b.remove(force=True)
        final(user, task["id"])
    return ours, bare


def _get(dc, name):
    try:
        return dc.containers.get(name)
    except docker.errors.NotFound:
        return None


def bench_life(user, agent, image, runs, timeline=False):
    ours, bare = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        task = user.create_task(agent.id, "custom", image=image, command=["true"])
        done = final(user, task["id"])
        assert done["state"] == "finished"
        ours.append(time.perf_counter() - t0)
        if timeline:
            tl = done["timeline"]
            print(
                "    " + "  ".join(f"{b['state']} +{(b['ts'] - a['ts']) * 1000:.0f}" for a, b in pairwise(tl)),
                flush=True,
            )
        t0 = time.perf_counter()
        subprocess.run(["docker", "run", "--rm", image, "true"], check=True)
        bare.append(time.perf_counter() - t0)
    return ours, bare


def bench_logs(user, agent, dc, image, n, timeline=False):
    cmd = ["seq", "1", str(n)]
    t0 = time.perf_counter()
    task = user.create_task(agent.id, "custom", image=image, command=cmd)
    c = wait(lambda: _get(dc, f"sly_task_{task['id']}"), interval=0.002)
    wait(lambda: c.reload() or c.attrs["State"]["StartedAt"][:4] != "0001", interval=0.002)
    start = started_at(c)
    done = final(user, task["id"], timeout=600)
    assert done["state"] == "finished", done
    # the final state is reported only after every line is acked: the finished timestamp is the end
    end = next(e["ts"] for e in done["timeline"] if e["state"] == "finished")
    if timeline:
        tl = done["timeline"]
        print("    " + "  ".join(f"{b['state']} +{b['ts'] - a['ts']:.2f}s" for a, b in pairwise(tl)), flush=True)
    total = time.perf_counter() - t0
    # verify: all N lines, in order, once
    after, expect, count = -1, 1, 0
    while True:
        page = user.request("GET", f"/api/v1/tasks/{task['id']}/logs", params={"after": after, "limit": 10000}).json()
        lines = page["lines"]
        if not lines:
            break
        for ln in lines:
            if ln["stream"] == "stdout":
                assert ln["message"] == str(expect), (ln, expect)
                expect += 1
                count += 1
        after = lines[-1]["seq"]
    assert count == n, count
    t1 = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", image, *cmd], stdout=subprocess.DEVNULL, check=True)
    bare = time.perf_counter() - t1
    return end - start, total, bare


class BenchContext(TaskContext):
    def __init__(self, task, config):
        self.task, self.config = task, config
        self.api = AgentAPI(config.server_address, config.access_token)
        self.gpus, self.stop_event, self.adopt = [], threading.Event(), False
        self.lines = []

    def emit(self, lines):
        self.lines.extend(lines)

    def set_phase(self, phase):
        pass

    def progress(self, current, total):
        pass

    def last_log_ts_ns(self):
        return None


def bench_download(server, user, tmp: Path, files: int, kb: int, workers: int):
    print(f"uploading a project of {files} files x {kb} KB ...", flush=True)
    blobs = []
    with ThreadPoolExecutor(8) as pool:

        def up(i):
            data = os.urandom(kb * 1024 - 16) + i.to_bytes(16, "big")
            return {"name": f"img_{i:05d}.png", "sha256": user.upload_bytes(data), "size": len(data)}

        items = list(pool.map(up, range(files)))
    blobs = [it["sha256"] for it in items]
    project = user.create_project(f"bench-{os.getpid()}", [{"name": "ds", "items": items}])
    agent = user.create_agent(f"bench-dl-{os.getpid()}")
    # baseline: plain parallel GET of the same blobs into files, by the node whose leased task names
    # them (a node reads only its tasks' blobs)
    session = requests.Session()
    session.headers["x-token"] = agent["token"]
    user.create_task(agent["id"], "custom", image="bench:1", project_id=project["id"])
    r = session.post(f"{server.url}/agent/v1/poll?wait=0", json={"free_slots": 1, "free_gpus": [], "running": []})
    r.raise_for_status()
    adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=16)
    session.mount("http://", adapter)
    out = tmp / "plain"
    out.mkdir(parents=True)

    def get(sha):
        r = session.get(f"{server.url}/agent/v1/blobs/{sha}", stream=True)
        r.raise_for_status()
        with open(out / sha, "wb") as f:
            for chunk in r.iter_content(1 << 20):
                f.write(chunk)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, blobs))
    plain = time.perf_counter() - t0
    # ours: the handler's preparation (verify, atomic rename, hard links), cold then warm cache
    root = tmp / "agent"
    cfg = Config(
        server_address=server.url,
        access_token=agent["token"],
        host_dir=str(root),
        agent_dir=str(root),
        min_free_disk_mb=1,
        download_workers=workers,
    )
    api = AgentAPI(server.url, agent["token"])
    task1 = user.create_task(agent["id"], "custom", image="x", project_id=project["id"])
    task2 = user.create_task(agent["id"], "custom", image="x", project_id=project["id"])
    leased = {t["id"]: t for t in api.poll(8, [], [], 1)["tasks"]}
    times = []
    for tid in (task1["id"], task2["id"]):
        ctx = BenchContext(leased[tid], cfg)
        t0 = time.perf_counter()
        summary = prepare(ctx)
        times.append(time.perf_counter() - t0)
        assert summary["files"] == files
    return plain, times[0], times[1], files * kb / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kb", type=int, default=16)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--only", default="pickup,life,logs,download", help="comma-separated parts to run")
    ap.add_argument("--timeline", action="store_true", help="print each trivial task's state timeline (ms)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    dc = docker.from_env()
    image = ensure_busybox_image(dc)
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    server = ServerProcess(tmp / "server").start()
    user = UserClient(server.url, server.admin_token)
    agent = Agent(server, user, tmp / "agent")
    rows = []

    class Rows(list):
        def append(self, row):
            print("  " + " | ".join(row), flush=True)
            super().append(row)

    rows = Rows()
    try:
        wait(lambda: user.get_agent(agent.id).get("status") == "online", timeout=30, interval=0.1)
        time.sleep(1.0)  # let the agent finish its start-up (orphan reaping, first telemetry)
        if "pickup" in only:
            print("pickup ...", flush=True)
            ours, bare = bench_pickup(user, agent, dc, image, args.runs)
            po, pb = statistics.median(ours), statistics.median(bare)
            rows.append(
                (
                    "pickup: task created -> container started (median)",
                    f"{po * 1000:.0f} ms",
                    f"`docker run -d`: {pb * 1000:.0f} ms",
                    f"{po / pb:.2f}x (+{(po - pb) * 1000:.0f} ms)",
                )
            )
        if "life" in only:
            print("whole life ...", flush=True)
            ours, bare = bench_life(user, agent, image, args.runs, args.timeline)
            lo, lb = statistics.median(ours), statistics.median(bare)
            rows.append(
                (
                    "trivial task `true`: created -> finished on the server (median)",
                    f"{lo * 1000:.0f} ms",
                    f"`docker run --rm`: {lb * 1000:.0f} ms",
                    f"{lo / lb:.2f}x",
                )
            )
        if "logs" in only:
            print("log throughput ...", flush=True)
            run_s, total_s, bare_s = bench_logs(user, agent, dc, image, args.lines, args.timeline)
            rows.append(
                (
                    f"{args.lines:,} log lines: container start -> all stored on the server, in order",
                    f"{run_s:.2f} s = {args.lines / run_s:,.0f} lines/s",
                    f"`docker run --rm ... > /dev/null`: {bare_s:.2f} s = {args.lines / bare_s:,.0f} lines/s",
                    f"{run_s / bare_s:.2f}x time",
                )
            )
        if "download" in only:
            print("download ...", flush=True)
            plain, first, second, mb = bench_download(server, user, tmp / "dl", args.files, args.file_kb, args.workers)
            rows.append(
                (
                    f"{args.files} files ({mb:.0f} MB): first preparation (fetch, verify, cache, link)",
                    f"{first:.2f} s = {mb / first:.1f} MB/s",
                    f"plain parallel GET: {plain:.2f} s = {mb / plain:.1f} MB/s",
                    f"{plain / first:.2f} of the plain fetch's speed",
                )
            )
            rows.append(
                (
                    f"{args.files} files: cached second preparation (links only)",
                    f"{second * 1000:.0f} ms",
                    "",
                    f"{0 if second == 0 else first / second:.0f}x faster than the first",
                )
            )
    finally:
        agent.stop()
        server.stop()
    print()
    print("| what | ours | baseline | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
