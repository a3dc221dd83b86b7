"""Telemetry process (`sly-agent: telemetry`): a psutil/NVML/Docker sample every N seconds."""

from __future__ import annotations

import logging
import os
import platform
import socket
import time

import psutil

from agent.child import ChildBase
from agent.gpus import list_gpus
from node import __version__
from node.config import Config

log = logging.getLogger("agent.telemetry")


def docker_info() -> dict:
    """Docker version and running containers; {"available": False} without an engine."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            v = client.version()
            running = client.containers.list()
            return {
                "available": True,
                "version": v.get("Version"),
                "api_version": v.get("ApiVersion"),
                "containers_running": len(running),
                "task_containers": sorted(c.name for c in running if c.name.startswith("sly_task_")),
            }
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - no SDK, no socket, no permission: not an error
        return {"available": False, "error": type(e).__name__}


def disks(config: Config) -> list[dict]:
    out = []
    for path in (config.root,):
        try:
            u = psutil.disk_usage(str(path))
        except OSError:
            continue
        out.append({"path": str(path), "total": u.total, "used": u.used, "free": u.free, "percent": u.percent})
    return out


def system_info(config: Config) -> dict:
    """What the agent tells the server at connect."""
    vm = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "agent_version": __version__,
        "identity": config.identity,
        "cpus": {"logical": psutil.cpu_count(), "physical": psutil.cpu_count(logical=False)},
        "memory": {"total": vm.total},
        "disks": disks(config),
        "gpus": list_gpus(),
        "docker": docker_info(),
        "max_tasks": config.max_tasks,
    }


def sample(config: Config, free_slots: int | None = None) -> dict:
    """One telemetry sample (cpu per core, memory, swap, disks, network, load, gpus, containers)."""
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    net = psutil.net_io_counters()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    d = docker_info()
    return {
        "ts": time.time(),
        "cpu": {
            "percent": psutil.cpu_percent(),
            "per_core": psutil.cpu_percent(percpu=True),
            "count": psutil.cpu_count(),
        },
        "memory": {"total": vm.total, "available": vm.available, "used": vm.used, "percent": vm.percent},
        "swap": {"total": sw.total, "used": sw.used, "percent": sw.percent},
        "disks": disks(config),
        "network": {"bytes_sent": net.bytes_sent, "bytes_recv": net.bytes_recv} if net else None,
        "load": load,
        "gpus": list_gpus(),
        "docker": d,
        "containers": d.get("task_containers", []),
        "free_slots": free_slots,
    }


class Telemetry(ChildBase):
    """Samples and posts every config.telemetry_interval_s; never dies of a server outage."""

    title = "telemetry"

    def __init__(self, config: Config, free_slots=None):
        super().__init__()
        self.config = config
        self.free_slots = free_slots  # a lock-free shared int (multiprocessing.RawValue)

    def run(self) -> None:
        self.start_in_child()
        from node.api import AgentAPI

        api = AgentAPI(self.config.server_address, self.config.access_token, timeout=10, retries=1)
        psutil.cpu_percent(percpu=True)  # the first call only primes the counters
        failing = False
        next_at = time.monotonic()
        while not self.stopping.is_set() and self.parent_alive():
            self.beat()
            now = time.monotonic()
            if now >= next_at:
                next_at = now + self.config.telemetry_interval_s
                try:
                    api.telemetry(sample(self.config, self.free_slots.value if self.free_slots is not None else None))
                    if failing:
                        log.info("telemetry delivered again")
                    failing = False
                except Exception as e:  # noqa: BLE001 - the next sample will try again
                    if not failing:
                        log.warning("telemetry not delivered: %s", e)
                    failing = True
            self.stopping.wait(min(0.5, max(0.0, next_at - time.monotonic())))
