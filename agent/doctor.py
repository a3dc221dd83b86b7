"""Preflight checks of a node: `python -m agent doctor` and `./run.sh doctor`, also run at the
agent's start (its log has one line per check).

One line per check: `ok`, `FAIL` with what to do, or `skip` with why (a check that does not apply
here, e.g. the GPU checks on a machine without an NVIDIA driver). `doctor` exits 1 when any check
fails, 2 when the settings themselves are unusable, else 0.

The checks read and never change what a running agent uses: the token is checked with a read the
server answers 404 for a good token and 401 for a bad one (it renews the node's leases, as any
request of the node does), and the token is never printed.
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

from node.config import Config

OK, FAIL, SKIP = "ok", "FAIL", "skip"
CLOCK_SKEW_MAX_S = 30.0  # past it, log times and TLS certificates go wrong
DEFAULT_IMAGE = "busybox:latest"  # the GPU container check's image; DOCTOR_IMAGE names another
NO_BLOB = "0" * 64  # a blob no one has: a good token gets 404, a bad one 401
_NVIDIA_DEV = re.compile(r"^nvidia\d+$")


class Check(NamedTuple):
    name: str
    status: str  # OK, FAIL or SKIP
    detail: str


def line(c: Check) -> str:
    return f"{c.status:<4}  {c.name:<13} {c.detail}"


# --- Docker and GPUs ---


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def docker_client(timeout: float):
    import docker

    return docker.from_env(timeout=timeout)


def check_docker(client_factory=docker_client, timeout: float = 5.0) -> tuple[Check, object | None]:
    """The engine answers, and its version; (the check, a client to reuse or None)."""
    try:
        client = client_factory(timeout)
        v = client.version()
    except Exception as e:  # noqa: BLE001 - no SDK, no socket, no permission: all one answer
        return Check(
            "docker",
            FAIL,
            f"no Docker engine answers at {docker_host()} ({type(e).__name__}): start it "
            "(sudo systemctl start docker), let this user use its socket (sudo usermod -aG docker $USER, then "
            "log in again), or, in a container, mount -v /var/run/docker.sock:/var/run/docker.sock",
        ), None
    return Check(
        "docker", OK, f"Docker engine {v.get('Version')} (API {v.get('ApiVersion')}) at {docker_host()}"
    ), client


def nvidia_driver_present() -> bool:
    """Signs of an NVIDIA kernel driver, visible also in a container that was given no GPU."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def check_nvml(config: Config, gpus: list[dict], driver: bool) -> Check:
    """NVML sees the GPUs (`gpus`: agent.gpus.list_gpus()); `driver`: an NVIDIA driver is loaded."""
    if (config.gpus or "").strip().lower() == "none":
        return Check("gpu-nvml", SKIP, "AGENT_GPUS=none: this node hands out no GPU")
    if gpus:
        names = ", ".join(sorted({str(g.get("name")) for g in gpus}))
        return Check("gpu-nvml", OK, f"NVML sees {len(gpus)} GPU(s): {names}")
    if driver:
        return Check(
            "gpu-nvml",
            FAIL,
            "an NVIDIA driver is loaded but NVML sees no GPU: in a container, start the agent with --gpus all "
            "(the GPU form of the run command; needs the NVIDIA container toolkit); on bare metal, check "
            "nvidia-smi and that nvidia-ml-py is installed (requirements-agent.txt)",
        )
    return Check("gpu-nvml", SKIP, "no NVIDIA driver seen and NVML sees no GPU: GPU tasks are refused on this node")


def check_gpu_container(client, image: str, expected: int, pull: bool, timeout: float = 60.0) -> Check:
    """A container given the GPUs through device requests (`docker run --gpus all`) sees them."""
    import docker
    from docker.types import DeviceRequest

    try:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            if not pull:
                return Check(
                    "gpu-container",
                    SKIP,
                    f"image {image} is not here (./run.sh doctor pulls it; DOCTOR_IMAGE names another)",
                )
            client.images.pull(image)
        out = client.containers.run(
            image,
            ["ls", "/dev"],
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
            network_mode="none",
            remove=True,
            stdout=True,
            stderr=False,
        )
    except docker.errors.ImageNotFound:
        return Check(
            "gpu-container", SKIP, f"cannot get image {image} to test with (set DOCTOR_IMAGE to a local image)"
        )
    except docker.errors.APIError as e:
        text = str(e.explanation or e)
        if "device driver" in text or "nvidia" in text.lower():
            return Check(
                "gpu-container",
                FAIL,
                f"Docker cannot give a container GPUs ({text[:200]}): install the NVIDIA container toolkit "
                "(nvidia-ctk runtime configure --runtime=docker), then restart dockerd (docs/deployment.md, GPUs)",
            )
        return Check("gpu-container", FAIL, f"a test container with --gpus all did not run: {text[:300]}")
    except Exception as e:  # noqa: BLE001 - a container error, a timeout, a pull refused
        return Check(
            "gpu-container", FAIL, f"a test container with --gpus all did not run: {type(e).__name__}: {e}"[:400]
        )
    seen = [n for n in out.decode(errors="replace").split() if _NVIDIA_DEV.match(n)]
    if len(seen) < expected:
        return Check(
            "gpu-container",
            FAIL,
            f"a container given every GPU sees {len(seen)} of the {expected} NVML reports: check the NVIDIA "
            "container toolkit's configuration (nvidia-ctk runtime configure --runtime=docker)",
        )
    return Check("gpu-container", OK, f"a container given --gpus all sees {len(seen)} GPU(s) (image {image})")


# --- disk ---


def check_disk(config: Config) -> list[Check]:
    from workers.cache import MB, cache_entries, disk_status

    status = disk_status(config)
    if status["ok"]:
        disk = Check(
            "disk",
            OK,
            f"{status['free_mb']:.0f} MB free under {config.root} (MIN_FREE_DISK_MB={config.min_free_disk_mb})",
        )
    else:
        disk = Check("disk", FAIL, status["reason"] + ": free space there, or move AGENT_HOST_DIR to a larger disk")
    used = sum(e[1] for e in cache_entries(config)) / MB if config.images_dir.is_dir() else 0.0
    if config.cache_quota_mb > 0:
        cache = Check("cache", OK, f"{used:.0f} MB cached of CACHE_QUOTA_MB={config.cache_quota_mb}")
    else:
        cache = Check("cache", OK, f"{used:.0f} MB cached, no quota (CACHE_QUOTA_MB=0: bounded by MIN_FREE_DISK_MB)")
    return [disk, cache]


# --- storage ---


def _small_files(root: Path, depth: int = 2, most: int = 2000):
    """Files near the root (the agent's own; not the cache and task trees), at most `most`."""
    skip = {root / "storage", root / "tasks", root / "tmp"}
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here in skip or len(here.relative_to(root).parts) >= depth:
            dirnames[:] = []
        else:
            dirnames[:] = [d for d in dirnames if here / d not in skip]
        for f in filenames:
            n += 1
            if n > most:
                return
            yield here / f


def check_storage(config: Config) -> Check:
    """The storage dir is writable, and no path or agent file in it holds the token."""
    token = config.access_token
    root = config.root
    if token in config.host_dir or token in str(root):
        return Check("storage", FAIL, "the storage path contains the token: set AGENT_HOST_DIR to a path without it")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".doctor-") as f:
            f.write(b"ok")
            f.flush()
    except OSError as e:
        return Check(
            "storage",
            FAIL,
            f"cannot write to {root}: {e.strerror}: give this user the directory (chown) or set AGENT_HOST_DIR",
        )
    found = []
    for p in _small_files(root):
        try:
            if token in p.name or (p.is_file() and p.stat().st_size <= 1 << 16 and token.encode() in p.read_bytes()):
                found.append(str(p.relative_to(root)).replace(token, "<token>"))
        except OSError:
            continue
    if found:
        return Check(
            "storage",
            FAIL,
            f"the token is in plain sight under {root}: {', '.join(found[:5])}; remove it (the agent takes the "
            "token from ACCESS_TOKEN and keeps no copy)",
        )
    return Check("storage", OK, f"{root} is writable and holds no token")


# --- the server ---


def _no_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def proxy_for(url: str) -> str | None:
    """The proxy requests takes for `url` from HTTP(S)_PROXY / NO_PROXY (credentials left out)."""
    import requests

    proxies = requests.utils.get_environ_proxies(url)
    proxy = proxies.get(urlsplit(url).scheme) or proxies.get("all")
    return _no_credentials(proxy) if proxy else None


def _route(url: str) -> str:
    proxy = proxy_for(url)
    if proxy:
        return f"through the proxy {proxy}"
    if any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")):
        return "directly (NO_PROXY)"
    return "directly"


def check_server(config: Config, timeout: float = 5.0) -> list[Check]:
    """Server reachable (through the proxy when one is set), token accepted, clock skew."""
    import requests

    base = config.server_address
    route = _route(base)
    session = requests.Session()  # trust_env: the proxy variables and REQUESTS_CA_BUNDLE, as the agent's
    try:
        t0 = time.time()
        r = session.get(base + "/healthz", timeout=timeout)
        t1 = time.time()
    except requests.RequestException as e:
        hint = (
            "check the proxy (HTTPS_PROXY/HTTP_PROXY) or add the server to NO_PROXY"
            if route.startswith("through")
            else "check SERVER_ADDRESS, the network and firewalls; behind a proxy set HTTPS_PROXY/HTTP_PROXY"
        )
        why = type(e).__name__
        return [
            Check("server", FAIL, f"cannot reach {base} {route} ({why}): {hint}"),
            Check("token", SKIP, "the server is unreachable"),
            Check("clock", SKIP, "the server is unreachable"),
        ]
    finally:
        session.close()
    if r.status_code != 200:
        server = Check(
            "server",
            FAIL,
            f"{base}/healthz answered {r.status_code} {route}: is SERVER_ADDRESS the task server's URL "
            "(a proxy or load balancer in front answers otherwise)?",
        )
    else:
        server = Check("server", OK, f"{base} answers {route} ({(t1 - t0) * 1000:.0f} ms)")
    return [server, _check_token(config, timeout), _check_clock(r.headers.get("date"), t0, t1)]


def _check_token(config: Config, timeout: float) -> Check:
    import requests

    from protocol import endpoints as ep

    url = config.server_address + ep.path(ep.AGENT_BLOB, sha256=NO_BLOB)
    try:
        with requests.Session() as s:
            r = s.head(url, headers={ep.AGENT_TOKEN_HEADER: config.access_token}, timeout=timeout)
    except requests.RequestException as e:
        return Check("token", FAIL, f"the token check did not get an answer ({type(e).__name__})")
    if r.status_code == 401:
        return Check(
            "token",
            FAIL,
            "the server refused ACCESS_TOKEN (a rotated token, or the node was removed): take the node's current "
            "token from the console or `sly nodes rotate ID`",
        )
    if r.status_code == 404:
        return Check("token", OK, "the server accepts this node's token")
    return Check("token", FAIL, f"the token check got {r.status_code}, neither accepted (404) nor refused (401)")


def _check_clock(date: str | None, t0: float, t1: float) -> Check:
    if not date:
        return Check("clock", SKIP, "the server's answer has no Date header")
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return Check("clock", SKIP, f"the server's Date header is not a date: {date[:60]!r}")
    # Date has whole seconds, truncated: the server's clock was in [server, server + 1).
    skew = (t0 + t1) / 2 - (server + 0.5)
    if abs(skew) > CLOCK_SKEW_MAX_S:
        side = "ahead of" if skew > 0 else "behind"
        return Check(
            "clock",
            FAIL,
            f"this clock is {abs(skew):.0f} s {side} the server's: turn on time sync (timedatectl set-ntp true)",
        )
    return Check("clock", OK, f"within {max(1.0, abs(skew)):.0f} s of the server's")


# --- all of them ---


def run_checks(config: Config, *, pull: bool = True, server: bool = True, nvml=None) -> list[Check]:
    """Every check, in order; `pull`: the GPU container check may pull its image; `server`: also
    the server checks (reachable, token, clock)."""
    from agent.gpus import list_gpus

    checks = []
    docker, client = check_docker()
    checks.append(docker)
    gpus = list_gpus(nvml)
    nvml_check = check_nvml(config, gpus, nvidia_driver_present())
    checks.append(nvml_check)
    if nvml_check.status != OK:
        checks.append(Check("gpu-container", SKIP, "no GPU to hand to a container (see gpu-nvml)"))
    elif client is None:
        checks.append(Check("gpu-container", SKIP, "no Docker engine (see docker)"))
    else:
        image = os.environ.get("DOCTOR_IMAGE") or DEFAULT_IMAGE
        slow = docker_client(120)  # a pull and a container start take longer than a ping
        try:
            checks.append(check_gpu_container(slow, image, len(gpus), pull))
        finally:
            slow.close()
    if client is not None:
        client.close()
    checks.extend(check_disk(config))
    checks.append(check_storage(config))
    if server:
        checks.extend(check_server(config))
    return checks


def log_checks(config: Config, log: logging.Logger) -> list[Check]:
    """At the agent's start: the checks (no image pull), one log line each; a failure is a warning,
    and the agent goes on (what fails may recover: the engine started late, disk freed)."""
    try:
        checks = run_checks(config, pull=False)
    except Exception as e:  # noqa: BLE001 - a check's own bug must not stop the agent
        log.warning("doctor: the checks did not run: %s: %s", type(e).__name__, e)
        return []
    for c in checks:
        log.log(logging.WARNING if c.status == FAIL else logging.INFO, "doctor: %s", line(c))
    return checks


def main(argv: list[str] | None = None) -> int:
    """`python -m agent doctor`: print the checks, exit 1 if any fails (2: unusable settings)."""
    from agent.exitcodes import EXIT_CONFIG
    from node.config import load_config
    from protocol.errors import ConfigError

    parser = argparse.ArgumentParser(
        prog="python -m agent doctor",
        description="Check this node: Docker, GPUs, disk, storage, the server, the token, the clock. "
        "Reads the agent's settings (SERVER_ADDRESS, ACCESS_TOKEN, AGENT_HOST_DIR, ...).",
    )
    parser.add_argument(
        "--no-pull", action="store_true", help=f"do not pull {DEFAULT_IMAGE} for the GPU container check"
    )
    args = parser.parse_args(argv)
    try:
        config = load_config()
    except ConfigError as e:
        print(line(Check("config", FAIL, str(e))), flush=True)
        return EXIT_CONFIG
    print(line(Check("config", OK, f"server {config.server_address}, storage {config.root}")), flush=True)
    failed = 0
    try:
        checks = run_checks(config, pull=not args.no_pull)
    except KeyboardInterrupt:
        return 130
    for c in checks:
        print(line(c), flush=True)
        failed += c.status == FAIL
    print(f"{failed} check(s) failed" if failed else "every check passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
