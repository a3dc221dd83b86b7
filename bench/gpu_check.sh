#!/usr/bin/env bash
# The GPU check for a machine that has one (issue 23), in well under 5 minutes:
#   1. NVML telemetry (agent/gpus.py) matches `nvidia-smi`: count, names, UUIDs, memory;
#   2. admission (agent/admission.py) hands out exclusive GPUs: two 1-GPU tasks get different
#      GPUs, a task naming no count gets the rest, a task wanting more than the node has is refused;
#   3. the device requests a task gets: a container started as the agent starts one, asking GPU
#      index N, sees exactly one /dev/nvidiaN device (skipped with a note when no Docker engine).
# Prints one line per check and exits non-zero if any fails. Needs the NVIDIA driver; never run
# by the tests (they never assume a GPU either way).
#
#   bash bench/gpu_check.sh            (uses ./.venv, made by ./run.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SLY_VENV:-$PWD/.venv}/bin/python
[ -x "$PY" ] || PY=python3
command -v nvidia-smi >/dev/null || { echo "FAIL nvidia-smi not found: is the NVIDIA driver installed?"; exit 1; }
exec "$PY" - <<'PY'
import subprocess
import sys

from agent.admission import admit
from agent.gpus import gpu_pool, list_gpus

failed = 0


def report(ok: bool, what: str) -> None:
    global failed
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    failed += not ok


smi = subprocess.run(
    ["nvidia-smi", "--query-gpu=index,name,uuid,memory.total", "--format=csv,noheader,nounits"],
    capture_output=True, text=True, check=True, timeout=60,
).stdout.strip().splitlines()
smi_rows = [[c.strip() for c in line.split(",")] for line in smi if line.strip()]
nvml = list_gpus()
report(len(nvml) == len(smi_rows), f"NVML sees {len(nvml)} GPU(s), nvidia-smi {len(smi_rows)}")
for (idx, name, uuid, mem_mib), g in zip(smi_rows, nvml):
    same = int(idx) == g["index"] and name == g["name"] and uuid == g["uuid"]
    mem_ok = abs(g.get("memory_total", 0) / 2**20 - int(mem_mib)) <= 1
    report(same and mem_ok, f"GPU {idx}: {name} {uuid[:12]}… {mem_mib} MiB (NVML: {g['name']}, "
           f"{g.get('memory_total', 0) // 2**20} MiB)")

pool = gpu_pool("all")
n = len(pool)
if n:
    a = admit([(1, 1), (2, 1), (3, None)], busy=0, max_tasks=10, pool=pool, used=[])
    got = dict(a.start)
    singles = [tuple(got.get(1, [])), tuple(got.get(2, []))]
    if n >= 2:
        report(len(got.get(1, [])) == 1 and len(got.get(2, [])) == 1 and singles[0] != singles[1],
               f"two 1-GPU tasks get different GPUs: {singles}")
    rest = set(pool) - set(got.get(1, [])) - set(got.get(2, []))
    report(set(got.get(3, [])) == rest, f"a task naming no count gets the free rest: {got.get(3)} (free {sorted(rest)})")
    big = admit([(4, n + 1)], busy=0, max_tasks=10, pool=pool, used=[])
    report(bool(big.refuse) and not big.start, f"a task wanting {n + 1} GPU(s) of {n} is refused")

try:
    import docker
    from docker.types import DeviceRequest

    from tools.images import ensure_busybox_image

    client = docker.from_env()
    client.ping()
except Exception as e:  # noqa: BLE001
    print(f"skip device requests: no Docker engine answers ({e})")
else:
    image = ensure_busybox_image(client)
    for index in pool[:2]:
        out = client.containers.run(
            image, ["sh", "-c", "ls /dev | grep -E '^nvidia[0-9]+$' || true"], remove=True,
            device_requests=[DeviceRequest(device_ids=[str(index)], capabilities=[["gpu"]])],
        ).decode().split()
        report(len(out) == 1, f"a container asking GPU {index} sees {out}")
sys.exit(1 if failed else 0)
PY
