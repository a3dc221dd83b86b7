"""What a task's container is created with: name, labels, mounts, environment, command, limits.

`create_kwargs()` is the whole contract (docs/workers.md "The task container"); it needs no
Docker engine, so tests/security/test_defaults.py pins it without one.
"""

from __future__ import annotations

import json
import os
import shlex

from docker.types import DeviceRequest, Mount

from protocol.tasks import DEFAULT_ENTRYPOINTS
from workers.errors import TaskError

LABEL_AGENT = "sly-agent.agent"
LABEL_TASK = "sly-agent.task"
# On a container that runs beside the task's own (an App's API relay, workers/app.py): its role.
# The task's own container has no such label; find_container() tells them apart by it.
LABEL_ROLE = "sly-agent.role"

TASK_ROOT = "/sly_task_data"
# What the container is given of its task dir, at the real Supervisely agent's paths: inputs
# read-only, results/ and tmp/ writable. The task dir itself (its durable log in logs/) is not.
MOUNTS = (
    ("task_config.json", True),
    ("task_settings.json", True),
    ("data", True),
    ("model", True),
    ("results", False),
    ("tmp", False),
)
MOUNT_FILES = frozenset({"task_config.json", "task_settings.json"})
# The node's CA bundle (CA_BUNDLE): a copy in the task dir, mounted read-only here.
CA_FILE = "ca-bundle.pem"
CA_PATH = "/etc/sly-ca.pem"
# A custom task whose image has no CMD and no entrypoint, and no command: the real agent's.
CUSTOM_FALLBACK = ["python", "-u", "/workdir/src/main.py"]


def container_name(task_id: int) -> str:
    return f"sly_task_{task_id}"


def _size(value):
    """Resources: an int of bytes, or a docker size string ('512m', '2g'); 0/''/'0' is none."""
    if value is None or value == "" or value == 0 or value == "0":
        return None
    return value if isinstance(value, (int, str)) else str(value)


def ensure_mount_sources(ctx) -> None:
    """Create every bind source before create (a missing one would fail the create, or worse, be
    made by the engine): empty data/ and model/ for a task without them; task_settings.json is
    made task_config.json's twin (the legacy name of the same object)."""
    task_dir = ctx.task_dir
    task_dir.mkdir(parents=True, exist_ok=True)
    for name, _ro in MOUNTS:
        path = task_dir / name
        if path.is_symlink():
            raise TaskError(f"task dir entry {name} is a symbolic link; refusing to mount it")
        if name in MOUNT_FILES:
            continue
        path.mkdir(exist_ok=True)
        if not _ro and ctx.config.task_user:
            os.chmod(path, 0o777)  # another uid than ours writes here
    config_file, settings_file = task_dir / "task_config.json", task_dir / "task_settings.json"
    if not config_file.exists():
        _write_atomic(config_file, json.dumps(ctx.task.get("config") or {}, indent=2).encode())
    data = config_file.read_bytes()
    if not settings_file.exists() or settings_file.read_bytes() != data:
        _write_atomic(settings_file, data)


def _write_atomic(path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def bind_source(ctx, path) -> str:
    """The host path of a bind source, symlinks resolved as the engine will resolve them; it must
    not name the token (every container sees its mount sources in /proc/self/mountinfo)."""
    cfg = ctx.config
    if os.path.abspath(cfg.agent_dir) == os.path.abspath(cfg.host_dir):
        source = os.path.realpath(path)
    else:
        source = cfg.host_path(path)  # the agent runs in a container: the host resolves its own links
    if cfg.access_token in source:
        raise TaskError("the task dir's host path contains the node token; set AGENT_HOST_DIR to a path without it")
    return source


def task_env(ctx) -> dict:
    """The environment the real Supervisely agent gives a task (without its host paths): the
    node's proxy variables in both cases, and the CA bundle's path when CA_BUNDLE is set."""
    task, cfg = ctx.task, ctx.config
    env = {
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": cfg.task_log_level,
        "LANG": "C.UTF-8",
        "TASK_ID": str(ctx.task_id),
        "TASK_TYPE": str(task.get("type", "")),
    }
    if ctx.gpus:
        # The runtime exposes only the requested GPUs, numbered from 0 inside; an image's own
        # CUDA_VISIBLE_DEVICES (a host index, often) would hide them.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(ctx.gpus)))
    else:
        # On a node whose default runtime is nvidia, an image's NVIDIA_VISIBLE_DEVICES=all would
        # expose every GPU; "void" makes that runtime behave like runc.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    env.update(cfg.proxy_env)
    if cfg.ca_bundle:
        env["REQUESTS_CA_BUNDLE"] = env["SSL_CERT_FILE"] = CA_PATH
    return env


def task_command(task: dict, image_config: dict | None = None) -> dict:
    """`command` (argv after the image's entrypoint) or the real agent's entry point for a
    train/inference task without one; {} runs the image's own CMD. A custom task without one
    whose image has neither CMD nor entrypoint (`image_config`: the image's inspected `Config`;
    None: not known) runs `python -u /workdir/src/main.py`, as the real agent does."""
    command = task.get("command")
    if command:
        return {"command": shlex.split(command) if isinstance(command, str) else [str(c) for c in command]}
    default = DEFAULT_ENTRYPOINTS.get(str(task.get("type")))
    if default:
        # As the Supervisely agent starts it; legacy NN plugin images have no CMD.
        return {"entrypoint": ["sh", "-c", shlex.join(default)]}
    if image_config is not None and not image_config.get("Cmd") and not image_config.get("Entrypoint"):
        return {"command": list(CUSTOM_FALLBACK)}
    return {}


def ca_mount(ctx) -> Mount | None:
    """CA_BUNDLE copied into the task dir and mounted read-only at CA_PATH (a copy: the agent may
    run in a container, where its path is not the host's; and the task sees no host path)."""
    source = ctx.config.ca_bundle
    if not source:
        return None
    copy = ctx.task_dir / CA_FILE
    try:
        with open(source, "rb") as f:
            _write_atomic(copy, f.read())
    except OSError as e:
        raise TaskError(f"CA_BUNDLE {source} cannot be read: {e.strerror or e}") from None
    os.chmod(copy, 0o444)
    return Mount(CA_PATH, bind_source(ctx, copy), type="bind", read_only=True)


def create_kwargs(ctx, image_config: dict | None = None, extra: dict | None = None) -> dict:
    """Everything `containers.create` gets for this task (docs/workers.md, docs/security.md);
    `image_config` is the image's inspected `Config` (for a custom task's default entry point).
    `extra`: what the task type adds (workers/app.py: the App's environment, merged over
    task_env(), and its network_mode); every other key of `extra` replaces the default."""
    task, cfg = ctx.task, ctx.config
    res = task.get("resources") or {}
    ensure_mount_sources(ctx)
    mounts = [
        Mount(f"{TASK_ROOT}/{name}", bind_source(ctx, ctx.task_dir / name), type="bind", read_only=ro)
        for name, ro in MOUNTS
    ]
    ca = ca_mount(ctx)
    if ca is not None:
        mounts.append(ca)
    kw: dict = {
        "image": task.get("image"),
        "name": container_name(ctx.task_id),
        "labels": {LABEL_AGENT: cfg.identity, LABEL_TASK: str(ctx.task_id)},
        "environment": task_env(ctx),
        "mounts": mounts,
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "cap_drop": cfg.cap_drop,
        "network_mode": cfg.task_network,
        "detach": True,
        **task_command(task, image_config),
    }
    if cfg.task_pids_limit > 0:
        kw["pids_limit"] = cfg.task_pids_limit
    if cfg.task_user:
        kw["user"] = cfg.task_user
    if cfg.task_read_only_root:
        kw["read_only"] = True
        kw["tmpfs"] = {"/tmp": "rw,nosuid,nodev"}
    if ctx.gpus:
        kw["device_requests"] = [DeviceRequest(device_ids=[str(g) for g in ctx.gpus], capabilities=[["gpu"]])]
    if res.get("cpus"):
        kw["nano_cpus"] = int(float(res["cpus"]) * 1e9)
    mem = _size(res.get("memory")) or _size(cfg.task_memory)
    if mem is not None:
        kw["mem_limit"] = mem
        kw["memswap_limit"] = mem  # no swap beyond the limit: over it is an OOM kill, not thrashing
    shm = _size(res.get("shm_size")) or _size(cfg.task_shm_size)
    if shm is not None:
        kw["shm_size"] = shm
    for key, value in (extra or {}).items():
        kw[key] = {**kw["environment"], **value} if key == "environment" else value
    return kw
