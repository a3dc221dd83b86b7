"""Bulk transfer figures: a project of N tiny images sent up, prepared by the agent, prepared again
from the cache and fetched back, each against a baseline measured in the same run.

    python bench/bench_data.py [--items 20000,100000] [--repo DIR] [--dataset-size 5000]
                               [--threads 16] [--keep]

For each N (a fresh server and agent each time) it writes a Supervisely project folder of N
distinct 8x8 PNGs (about 80 bytes each, every one a different blob) with a meta and an
annotation of two rectangles per image, in datasets of at most --dataset-size items, and times:

  baseline     16 threads, one requests.Session each, of plain GET /api/v1/blobs/<sha> of all N
               blobs once they are on the server, each written to a file
  upload       `sly projects upload DIR` (python -m client, a subprocess)
  preparation  a `custom` task on the project run by the real agent (python -m agent, real Docker
               engine, the local busybox image): preparing -> running from the task's timeline,
               empty cache
  cached       a second task on the same project: the same span, every blob in the cache
  download     `sly projects download ID DIR` (a subprocess)

and the peak RSS (VmHWM in /proc/<pid>/status) of the server, of the largest of the agent's
processes (the task handler plans and fetches; it exits, so the tree is sampled every 0.1 s
during the run) and of the two CLI runs.

--repo names the checkout whose server, agent and CLI run (default: the one this file is in),
so the same script measures an older commit: `python bench/bench_data.py --repo /tmp/before`.

Runs in a series: on ext4 without a journal (this project's test machines), every new file or
folder skips the inodes of its block group freed in the last minute (six, while their inode
table block is dirty), so a run started minutes after another removed its 200,000 files pays
for that removal in every step. Keep each run's files (--keep) through a series and remove them
after it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

HERE = Path(__file__).resolve().parents[1]
SIDE = 8  # every image is SIDE x SIDE RGB
MIB = 1 << 20
# the goals, as ratios to the baseline (cached: seconds)
GOALS = {"upload": "<= 0.5x", "preparation": "<= 0.25x", "cached": "< 3 s", "download": "<= 0.5x"}


# --- the project folder ---


def png_bytes(width: int, height: int, rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from raw scanlines, unfiltered."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\0" + row for row in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def picture(i: int) -> tuple[bytes, tuple[int, int]]:
    """Image i: a background colour that encodes i (so no two images are the same blob) and a red
    3x3 box at one of 25 places; returns the PNG and the box's top-left corner."""
    background = bytes(((i >> 16) & 255, (i >> 8) & 255, i & 255))
    x0, y0 = i % 5, (i // 5) % 5
    rows = [
        b"".join(b"\xdc\x28\x28" if x0 <= x < x0 + 3 and y0 <= y < y0 + 3 else background for x in range(SIDE))
        for y in range(SIDE)
    ]
    return png_bytes(SIDE, SIDE, rows), (x0, y0)


def rectangle(title: str, left_top: list[int], right_bottom: list[int]) -> dict:
    """A rectangle label as sly.Annotation.to_json() writes it."""
    return {
        "classTitle": title,
        "description": "",
        "tags": [],
        "points": {"exterior": [left_top, right_bottom], "interior": []},
        "geometryType": "rectangle",
        "shape": "rectangle",
    }


META = {
    "classes": [
        {"title": t, "description": "", "shape": "rectangle", "color": c, "geometry_config": {}, "hotkey": ""}
        for t, c in (("box", "#E53935"), ("frame", "#43A047"))
    ],
    "tags": [],
    "projectType": "images",
}


def write_project(root: Path, items: int, dataset_size: int) -> list[str]:
    """A Supervisely project folder of `items` images in datasets ds000, ds001, ...; their sha256s."""
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(META))
    shas = []
    for i in range(items):
        ds = root / f"ds{i // dataset_size:03d}"
        if i % dataset_size == 0:
            (ds / "img").mkdir(parents=True)
            (ds / "ann").mkdir()
        png, (x0, y0) = picture(i)
        name = f"img_{i:07d}.png"
        (ds / "img" / name).write_bytes(png)
        ann = {
            "description": "",
            "size": {"height": SIDE, "width": SIDE},
            "tags": [],
            "objects": [rectangle("box", [x0, y0], [x0 + 2, y0 + 2]), rectangle("frame", [0, 0], [SIDE - 1, SIDE - 1])],
            "customBigData": {},
        }
        (ds / "ann" / f"{name}.json").write_text(json.dumps(ann))
        shas.append(hashlib.sha256(png).hexdigest())
    return shas


# --- processes and their peak memory ---


def vm_hwm(pid: int) -> int:
    """The peak resident set size of a live process in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples VmHWM of process trees every `interval` s on a thread; keeps each tree's largest process."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.roots: dict[str, int] = {}
        self.peaks: dict[str, tuple[int, str]] = {}  # label -> (bytes, process title)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def watch(self, label: str, pid: int) -> None:
        self.roots[label] = pid

    def start(self) -> PeakRSS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for label, pid in list(self.roots.items()):
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                hwm = vm_hwm(p.pid)
                if hwm > self.peaks.get(label, (0, ""))[0]:
                    try:
                        title = " ".join(p.cmdline()).strip()[:60]
                    except psutil.Error:
                        title = str(p.pid)
                    self.peaks[label] = (hwm, title)


def wait(pred, timeout: float, interval: float = 0.05):
    """pred()'s first truthy value, asked every `interval` s; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise TimeoutError("bench: condition not met in time")


class Agent:
    """`python -m agent` of the measured checkout, with its own storage dir."""

    def __init__(self, repo: Path, server_url: str, token: str, root: Path):
        env = dict(
            os.environ,
            PYTHONPATH=str(repo),
            SERVER_ADDRESS=server_url,
            ACCESS_TOKEN=token,
            AGENT_HOST_DIR=str(root),
            MIN_FREE_DISK_MB="1",
            MAX_TASKS="2",
            PYTHONUNBUFFERED="1",
            TASK_DIR_CLEANUP="always",
        )
        env.pop("SLY_AGENT_HANDLER", None)
        self.log = open(root.parent / f"{root.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent"], cwd=repo, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def cli(repo: Path, server, args: list[str], peaks: PeakRSS, label: str) -> tuple[float, dict]:
    """Run `python -m client --json ARGS` of the checkout; its wall time and its JSON answer."""
    env = dict(os.environ, PYTHONPATH=str(repo), SLY_ADMIN_TOKEN=server.admin_token)
    cmd = [sys.executable, "-m", "client", "--server", server.url, "--json", "--no-progress", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peaks.watch(label, proc.pid)
    out, err = proc.communicate()
    took = time.perf_counter() - t0
    peaks.roots.pop(label, None)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {err.decode()[-2000:]}")
    return took, json.loads(out)


# --- the steps ---


def plain_gets(url: str, token: str, shas: list[str], out: Path, threads: int) -> float:
    """The baseline: `threads` threads, one session each, GET every blob into a file; seconds."""
    out.mkdir(parents=True)
    local = threading.local()

    def get(sha: str) -> None:
        s = getattr(local, "session", None)
        if s is None:
            s = local.session = requests.Session()
            s.headers["Authorization"] = "Bearer " + token
        r = s.get(f"{url}/api/v1/blobs/{sha}")
        r.raise_for_status()
        (out / sha).write_bytes(r.content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, shas))
    return time.perf_counter() - t0


def preparation(user, agent_id: int, image: str, project_id: int, timeout: float) -> float:
    """Run a `true` task on the project; seconds from `preparing` to `running` in its timeline."""
    task = user.create_task(agent_id, "custom", image, command=["true"], project_id=project_id)
    done = wait(
        lambda: (t := user.get_task(task["id"]))["state"] in ("finished", "failed", "stopped", "lost") and t,
        timeout=timeout,
        interval=0.1,
    )
    if done["state"] != "finished":
        raise RuntimeError(f"task {task['id']} {done['state']}: {done.get('error')}")
    at = {e["state"]: e["ts"] for e in done["timeline"]}
    if SHOW_STEPS:  # --steps: the agent's own lines while it prepared, timed from `preparing`
        for ln in user.iter_logs(task["id"], follow=False):
            if ln["stream"] == "agent" and ln["ts"] <= at["running"] + 0.5:
                print(f"      +{ln['ts'] - at['preparing']:6.2f} s  {ln['message'][:110]}", flush=True)
    return at["running"] - at["preparing"]


SHOW_STEPS = False


def count_images(root: Path) -> int:
    """Images in a downloaded Supervisely project folder."""
    return sum(1 for _ in root.glob("*/img/*"))


def run_size(repo: Path, items: int, args, image: str, tmp: Path) -> dict:
    """Every step at one project size, on a fresh server and agent, under `tmp`; the figures."""
    from client import UserClient
    from tests.support.server import ServerProcess

    print(f"[{items:,} items] writing the project under {tmp} ...", flush=True)
    shas = write_project(tmp / "project", items, args.dataset_size)
    blob_bytes = sum(p.stat().st_size for p in (tmp / "project").glob("*/img/*"))
    ann_bytes = sum(p.stat().st_size for p in (tmp / "project").glob("*/ann/*"))
    server = ServerProcess(tmp / "server", env={"PYTHONPATH": str(repo)}).start()
    user = UserClient(server.url, server.admin_token)
    node = user.create_agent(f"bench-data-{os.getpid()}")
    agent = Agent(repo, server.url, node["token"], tmp / "agent")
    assert server.proc is not None  # a ServerProcess has one once started
    peaks = PeakRSS()
    peaks.watch("server", server.proc.pid)
    peaks.watch("agent", agent.proc.pid)
    peaks.start()
    f: dict = {"items": items, "blob_bytes": blob_bytes, "ann_bytes": ann_bytes}
    try:
        wait(lambda: user.get_agent(node["id"]).get("status") == "online", timeout=60, interval=0.1)
        print("  sly projects upload ...", flush=True)
        f["upload"], project = cli(
            repo, server, ["projects", "upload", str(tmp / "project"), "--name", "bench"], peaks, "upload cli"
        )
        print(f"    {f['upload']:.2f} s", flush=True)
        print("  baseline: plain GETs ...", flush=True)
        f["baseline"] = plain_gets(server.url, server.admin_token, shas, tmp / "plain", args.threads)
        print(f"    {f['baseline']:.2f} s", flush=True)
        # The baseline's files stay until every step is timed: on ext4 without a journal (this
        # project's test machines) an inode freed in the last minute is skipped by every inode
        # allocation in its group, so 20,000 files removed here made each of the preparation's
        # new folders scan past them (perf: 11 % of the agent's samples in recently_deleted).
        print("  task preparation, empty cache ...", flush=True)
        f["preparation"] = preparation(user, node["id"], image, project["id"], args.timeout)
        print(f"    {f['preparation']:.2f} s", flush=True)
        print("  task preparation, cached ...", flush=True)
        f["cached"] = preparation(user, node["id"], image, project["id"], args.timeout)
        print(f"    {f['cached']:.2f} s", flush=True)
        print("  sly projects download ...", flush=True)
        f["download"], _ = cli(
            repo, server, ["projects", "download", str(project["id"]), str(tmp / "down")], peaks, "download cli"
        )
        print(f"    {f['download']:.2f} s", flush=True)
        got = count_images(tmp / "down")
        if got != items:
            raise RuntimeError(f"the download holds {got} images, not {items}")
        shutil.rmtree(tmp / "plain")
    finally:
        peaks.stop()
        agent.stop()
        server.stop()
    f["rss"] = peaks.peaks
    return f


def report(f: dict, threads: int) -> str:
    """The figures of one size as markdown: the steps table, then the peak RSS."""
    base = f["baseline"]
    n = f["items"]
    rows = [
        (f"baseline: {threads} threads of plain GET /api/v1/blobs/<sha>", base, "1.00x", ""),
        ("`sly projects upload DIR`", f["upload"], f"{f['upload'] / base:.2f}x", GOALS["upload"]),
        (
            "task preparation (preparing -> running), empty cache",
            f["preparation"],
            f"{f['preparation'] / base:.2f}x",
            GOALS["preparation"],
        ),
        ("cached re-preparation (second task)", f["cached"], f"{f['cached'] / base:.2f}x", GOALS["cached"]),
        ("`sly projects download ID DIR`", f["download"], f"{f['download'] / base:.2f}x", GOALS["download"]),
    ]
    out = [
        f"{n:,} items: {f['blob_bytes'] / MIB:.1f} MiB of PNGs ({f['blob_bytes'] / n:.0f} B each), "
        f"{f['ann_bytes'] / MIB:.1f} MiB of annotations",
        "",
        "| step | seconds | ratio to the baseline | goal |",
        "|---|---|---|---|",
        *(f"| {step} | {s:.2f} | {ratio} | {goal} |" for step, s, ratio, goal in rows),
        "",
        "| process | peak RSS (VmHWM) | which |",
        "|---|---|---|",
    ]
    for label in ("server", "agent", "upload cli", "download cli"):
        hwm, title = f["rss"].get(label, (0, "-"))
        out.append(f"| {label} | {hwm / MIB:.0f} MiB | `{title}` |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="20000", help="project sizes, comma-separated (default 20000)")
    ap.add_argument("--repo", type=Path, default=HERE, help="the checkout to measure (default: this one)")
    ap.add_argument("--dataset-size", type=int, default=5000, help="most items in one dataset")
    ap.add_argument("--threads", type=int, default=16, help="threads of the plain GET baseline")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a task may take")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders (project, server, agent)")
    ap.add_argument("--steps", action="store_true", help="print the agent's lines of each preparation, timed")
    args = ap.parse_args()
    global SHOW_STEPS
    SHOW_STEPS = args.steps
    repo = args.repo.resolve()
    sys.path.insert(0, str(repo))  # the server, client and agent code of the measured checkout

    import docker

    from tools.images import ensure_busybox_image

    image = ensure_busybox_image(docker.from_env())
    sizes = [int(s) for s in args.items.split(",") if s.strip()]
    print(f"repo {repo}", flush=True)
    for items in sizes:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-data-{items}-"))
        try:
            figures = run_size(repo, items, args, image, tmp)
            print()
            print(report(figures, args.threads))
            print(flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)  # minutes for 10^5 files on a busy disk


if __name__ == "__main__":
    main()
