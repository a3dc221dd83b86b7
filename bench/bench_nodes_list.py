"""Nodes-list benchmark: what one console refresh of the nodes page costs at N nodes.

    python bench/bench_nodes_list.py [--nodes 1000] [--repeat 10] [--db-url URL]

Starts a server, registers --nodes agents, and has each connect (system info) and post one
telemetry sample of about 4 KB (bench_fleet's shape, 8 GPUs). Then it times one refresh as the
console does it: every page of `GET /api/v1/agents` (gzip accepted, as browsers do), and, when
the answer carries an ETag, the same request again with If-None-Match. Prints the bytes on the
wire, the decoded bytes, and the median and worst time of --repeat refreshes; then what the
console's nodes page asks: one page of 100 rows and the same again with If-None-Match.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_fleet import SYSTEM_INFO, telemetry_sample  # noqa: E402
from tests.support.server import ServerProcess  # noqa: E402


def populate(srv: ServerProcess, n: int) -> None:
    admin = srv.admin()

    def one(i: int) -> None:
        a = admin.post(srv.url + "/api/v1/agents", json={"name": f"node-{i:04d}"}, timeout=60).json()
        s = requests.Session()
        s.headers["x-token"] = a["token"]
        s.post(
            srv.url + "/agent/v1/connect", json=dict(SYSTEM_INFO, hostname=f"sim-{i}"), timeout=60
        ).raise_for_status()
        s.post(srv.url + "/agent/v1/telemetry", json=telemetry_sample(2), timeout=60).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def refresh(s: requests.Session, url: str, etags: dict) -> tuple[int, int, int, int]:
    """One refresh (every page): (wire bytes, decoded bytes, rows, 304 answers)."""
    wire = decoded = rows = not_modified = 0
    cursor = None
    while True:
        params = {"cursor": cursor} if cursor else {}
        headers = {"If-None-Match": etags[cursor]} if cursor in etags else {}
        r = s.get(url, params=params, headers=headers, stream=True, timeout=60)
        raw = r.raw.read(decode_content=False)
        wire += len(raw)
        if r.status_code == 304:
            not_modified += 1
            return wire, decoded, rows, not_modified  # the console keeps what it drew
        r.raise_for_status()
        body = gzip.decompress(raw) if r.headers.get("content-encoding") == "gzip" else raw
        decoded += len(body)
        page = json.loads(body)
        rows += len(page["items"])
        if r.headers.get("etag"):
            etags[cursor] = r.headers["etag"]
        cursor = page.get("next")
        if not cursor:
            return wire, decoded, rows, not_modified


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--db-url", default=None)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        # Nodes stay online through the run (they post once), so the fleet does not change under the
        # measurement: a 304 then shows what an unchanged page costs.
        args = ["--offline-after-s", "3600"] + (["--db", a.db_url] if a.db_url else [])
        srv = ServerProcess(Path(d) / "data", extra_args=args).start()
        try:
            t0 = time.monotonic()
            populate(srv, a.nodes)
            print(f"{a.nodes} nodes registered, connected, one sample each in {time.monotonic() - t0:.1f} s")
            s = srv.admin()
            s.headers["Accept-Encoding"] = "gzip"
            url = srv.url + "/api/v1/agents"
            for label, keep_etags in (("full refresh", False), ("refresh with If-None-Match", True)):
                times, etags = [], {}
                refresh(s, url, etags)  # warm up; collects the ETags
                for _ in range(a.repeat):
                    t = time.perf_counter()
                    wire, decoded, rows, nm = refresh(s, url, etags if keep_etags else {})
                    times.append(time.perf_counter() - t)
                print(
                    f"{label}: {rows} rows, {wire:,} bytes on the wire, {decoded:,} decoded, "
                    f"{nm} x 304; median {statistics.median(times) * 1000:.0f} ms, "
                    f"max {max(times) * 1000:.0f} ms"
                )
            # What the console's nodes page asks every 5 s: one page of 100 rows, then If-None-Match.
            times, nm = [], 0
            for _ in range(a.repeat):
                t = time.perf_counter()
                r = s.get(url, params={"limit": 100}, stream=True, timeout=60)
                wire = len(r.raw.read(decode_content=False))
                r2 = s.get(
                    url,
                    params={"limit": 100},
                    headers={"If-None-Match": r.headers.get("etag") or "-"},
                    stream=True,
                    timeout=60,
                )
                wire2 = len(r2.raw.read(decode_content=False))
                nm += r2.status_code == 304
                times.append(time.perf_counter() - t)
            print(
                f"console page (limit=100): {wire:,} bytes on the wire, then {wire2:,} bytes with "
                f"If-None-Match ({nm}/{a.repeat} x 304); both requests: median {statistics.median(times) * 1000:.0f} ms"
            )
        finally:
            srv.close()


if __name__ == "__main__":
    main()
