"""`app`: a Supervisely App, an image whose code talks to the server through the SDK's `sly.Api`.

The agent downloads nothing for it and uploads nothing after it (the App reads and writes through
the public API); logs, stop, timeouts, resources and GPUs are those of every container task
(workers/docker_task.py). What is the App's own (docs/workers.md "App tasks"):

- its environment, the real Supervisely agent's (`app_env`): SERVER_ADDRESS, API_TOKEN, TASK_ID,
  TEAM_ID, WORKSPACE_ID, PROJECT_ID/DATASET_ID, CONTEXT and MODAL_STATE, flattened as
  `context.*` / `modal.state.*` (and their `CONTEXT_*` / `MODAL_STATE_*` twins);
- its way to the server. The App's container shares the network namespace of a sidecar
  container (same labels plus LABEL_ROLE, TASK_NETWORK, hardened further than a task: no
  capabilities, read-only root, 64 MiB, 300 pids), which runs a byte relay
  (workers/app_sidecar.py, with the App image's own python3) from 127.0.0.1:RELAY_PORT to the
  forwarder's Unix socket (workers/app_proxy.py), served by this task process. So SERVER_ADDRESS
  works even when the server is on the node's loopback, no host service is opened to the
  container, and the App's API_TOKEN is a local token that only that socket accepts: the real
  App token never enters the container.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from docker.types import Mount

from workers.app_proxy import ApiForwarder, local_token
from workers.base import Outcome
from workers.container import docker_client, find_container, remove_container, start_container
from workers.container_spec import LABEL_AGENT, LABEL_ROLE, LABEL_TASK, TASK_ROOT, bind_source, container_name
from workers.docker_task import Companion, prepare, run_container_task
from workers.errors import StopRequested, TaskError

RELAY_PORT = 8787
RELAY_ROLE = "api-relay"
API_DIR = "api"  # tasks/<id>/api/: the forwarder's socket and nothing else; only the sidecar gets it
SOCKET_NAME = "api.sock"
TOKEN_FILE = "api_token"  # tasks/<id>/api_token: the local token (0600; never mounted)
RELAY_FILE = "api_relay.py"  # tasks/<id>/api_relay.py: the relay script's copy the sidecar runs
SIDECAR_API = "/sly-api"
SIDECAR_SCRIPT = "/sly-relay.py"
SIDECAR_MEMORY = "64m"
SIDECAR_PIDS = 300  # the relay's threads: two per connection, at most 128 connections
READY_S = 30.0  # the relay must say it listens within this (python3 starting in the App's image)
READY_POLL_S = 0.02
# SLY_APP_DATA_DIR (the SDK's sly.app.get_data_dir()): writable, on the agent's disk, cleaned with the task dir.
APP_DATA_DIR = f"{TASK_ROOT}/tmp"
MAX_VAR = 128 * 1024 - 1  # the kernel's limit on one environment string (MAX_ARG_STRLEN)
# The variables the real agent sets from the context (the SDK reads CONTEXT_TEAMID and these).
ID_VARS = (
    ("TEAM_ID", "teamId"),
    ("WORKSPACE_ID", "workspaceId"),
    ("PROJECT_ID", "projectId"),
    ("DATASET_ID", "datasetId"),
)
MAX_ENV = 1024 * 1024  # all of them together: the rest of ARG_MAX stays for the command


def run(ctx) -> Outcome:
    return run_container_task(ctx, _no_upload, AppCompanion())


def _no_upload(ctx, live) -> None:
    """An App writes its results through the API; the agent has none to upload."""


# --- the environment ---
def _flat(prefix: str, obj: dict, out: dict) -> None:
    """Nested dicts flattened with dots, as the real agent's flatten_json (pandas.json_normalize)
    does: an empty dict gives no key, a list is a leaf."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flat(name + ".", value, out)
        else:
            out[name] = value


def _text(value) -> str | None:
    """A leaf as the real agent's containers see it (docker-py writes `f"{key}={value}"`): a string
    as it is, anything else as Python prints it (`True`, `[1, 'a']`, which the SDK's own readers
    parse: flag_from_env, ast.literal_eval); None is no variable at all."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def app_context(task: dict) -> dict:
    """CONTEXT: what the real server's context holds of an App session that this server has:
    teamId, workspaceId, taskId, and projectId/datasetId when the task names them."""
    context = {"teamId": task.get("team_id"), "workspaceId": task.get("workspace_id"), "taskId": int(task["id"])}
    if task.get("project_id") is not None:
        context["projectId"] = task["project_id"]
    if task.get("dataset_id") is not None:
        context["datasetId"] = task["dataset_id"]
    return {k: v for k, v in context.items() if v is not None}


def app_env(ctx, token: str) -> dict[str, str]:
    """The App's variables, added to task_env() (which gives PYTHONUNBUFFERED, LOG_LEVEL, TASK_ID,
    the GPUs, the proxies and the CA bundle); TaskError when the config cannot fit an environment."""
    task, cfg = ctx.task, ctx.config
    modal = task.get("config")
    modal = {} if modal is None else modal
    context = app_context(task)
    flat: dict = {}
    _flat("context.", context, flat)
    if isinstance(modal, dict):
        _flat("modal.state.", modal, flat)
    # As the real agent does: ids picked by the App's modal dialog become the context's.
    for key, names in (
        ("slyProjectId", ("context.projectId", "PROJECT_ID")),
        ("slyDatasetId", ("context.datasetId", "DATASET_ID")),
        ("slyFile", ("context.slyFile", "FILE")),
        ("slyFolder", ("context.slyFolder", "FOLDER")),
    ):
        if f"modal.state.{key}" in flat:
            for name in names:
                flat.setdefault(name, flat[f"modal.state.{key}"])
    env: dict[str, str] = {}
    skipped = []
    for name, value in flat.items():
        text = _text(value)
        if text is None:
            continue
        if "=" in name or "\0" in name or "\0" in text:
            skipped.append(name)
            continue
        env[name] = text
        if "." in name:  # the real agent's twin for images whose tools cannot read dotted names
            env.setdefault(name.replace(".", "_").upper(), text)
    if skipped:
        ctx.log(
            f"{len(skipped)} config keys cannot be environment variables (a '=' or NUL); "
            f"not given to the App: {', '.join(repr(s[:60]) for s in skipped[:5])}",
            level="warning",
        )
    level = cfg.task_log_level
    env.update(
        {
            "SERVER_ADDRESS": f"http://127.0.0.1:{RELAY_PORT}",
            "API_TOKEN": token,
            "TASK_ID": str(ctx.task_id),
            "CONTEXT": json.dumps(context),
            "MODAL_STATE": json.dumps(modal),
            "LOG_LEVEL": level,
            "LOGLEVEL": level,
            "ENV": "production",  # sly.is_production(): no local.env, the App's production paths
            "APP_MODE": "production",
            "SLY_APP_DATA_DIR": APP_DATA_DIR,
        }
    )
    for name, key in ID_VARS:
        if key in context:
            env[name] = str(context[key])
    _no_proxy_for_the_relay(cfg.proxy_env, env)
    _check_size(env)
    return env


def _no_proxy_for_the_relay(proxy_env: dict, env: dict) -> None:
    """With the node's proxies in the container (task_env), requests would send the App's calls
    to 127.0.0.1 to the proxy: the relay's address joins NO_PROXY (both cases)."""
    if not any(k.lower() in ("http_proxy", "https_proxy") for k in proxy_env):
        return
    current = proxy_env.get("NO_PROXY") or proxy_env.get("no_proxy") or ""
    value = ",".join(p for p in (current, "127.0.0.1", "localhost") if p)
    env["NO_PROXY"] = env["no_proxy"] = value


def _check_size(env: dict) -> None:
    for name, value in env.items():
        if len(name) + len(value) + 1 > MAX_VAR:
            raise TaskError(
                f"the App's environment variable {name[:80]} would be {len(value):,} bytes; one variable "
                f"holds at most {MAX_VAR:,} (make the task's config smaller)"
            )
    total = sum(len(n) + len(v) + 2 for n, v in env.items())
    if total > MAX_ENV:
        raise TaskError(
            f"the App's environment would be {total:,} bytes (the task's config, flattened); at most {MAX_ENV:,}"
        )


# --- the forwarder and the sidecar ---
class AppCompanion(Companion):
    """The App's API forwarder (in this process) and its relay sidecar, for one task."""

    def __init__(self):
        self.forwarder: ApiForwarder | None = None
        self.sidecar = None

    def prepare(self, ctx) -> None:
        prepare(ctx, download=False)

    def spawn(self, ctx, client, image_config) -> dict:
        token = self._serve(ctx)
        t0 = time.monotonic()
        try:
            self.sidecar = start_container(client, ctx, sidecar_kwargs(ctx))
        except TaskError as e:
            if "python3" in str(e):  # the runtime: exec: "python3": executable file not found in $PATH
                raise TaskError(
                    f"the App's image {ctx.task.get('image')} has no python3, which runs the App's API relay "
                    f"(its sidecar container); Apps are Python images with the Supervisely SDK ({e})"
                ) from None
            raise
        self._wait_ready(ctx, client)
        ctx.log(
            f"App API: SERVER_ADDRESS http://127.0.0.1:{RELAY_PORT} in the App's container, relayed by "
            f"{self.sidecar.name} to this agent, which forwards {ctx.config.server_address}/public/api/v3/ "
            f"(relay ready in {time.monotonic() - t0:.2f} s)"
        )
        return {"environment": app_env(ctx, token), "network_mode": f"container:{self.sidecar.id}"}

    def adopt(self, ctx, client, container) -> None:
        self._serve(ctx)
        self.sidecar = find_container(client, ctx.task_id, ctx.config.identity, role=RELAY_ROLE)
        if self.sidecar is None or self.sidecar.status != "running":
            ctx.log(
                "the App's API relay (its sidecar container) is gone: the App cannot reach the server any more",
                level="warning",
            )

    def remove(self, ctx) -> None:
        sidecar = self.sidecar
        self.sidecar = None
        try:
            if sidecar is None:  # e.g. the App's container was lost while the agent was down
                sidecar = find_container(docker_client(), ctx.task_id, ctx.config.identity, role=RELAY_ROLE)
            if sidecar is not None:
                remove_container(sidecar)
        except Exception as e:  # noqa: BLE001 - reported; the orphan reaper removes it at the latest
            ctx.log(f"could not remove the App's API relay: {e}", level="warning")
        if self.forwarder is not None:
            f, self.forwarder = self.forwarder, None
            f.close()
            ctx.log(f"App API: {f.forwarded} requests forwarded, {f.refused} refused")

    def _serve(self, ctx) -> str:
        """Serve the forwarder's socket (again, after a restart, with the same local token)."""
        api_dir = ctx.task_dir / API_DIR
        if api_dir.is_symlink() or (api_dir.exists() and not api_dir.is_dir()):
            api_dir.unlink()
        api_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(api_dir, 0o755)  # the sidecar's user may not be ours
        token = local_token(ctx.task_dir / TOKEN_FILE)
        real = ctx.task.get("api_token")
        if not real:
            raise TaskError("the server gave this app task no api_token (is it older than the agent?)")
        self.forwarder = ApiForwarder(api_dir / SOCKET_NAME, ctx.config.server_address, token, real).start()
        return token

    def _wait_ready(self, ctx, client) -> None:
        """Until the relay says it listens; TaskError with its output when it exits first."""
        deadline = time.monotonic() + READY_S
        n = 0
        while True:
            out = client.api.logs(self.sidecar.id, stdout=True, stderr=True)
            if b"sly-relay: listening" in out:
                return
            if ctx.stop_event.is_set():
                raise StopRequested()
            n += 1
            if n % 10 == 0 or time.monotonic() >= deadline:
                self.sidecar.reload()
                if self.sidecar.status not in ("created", "running"):
                    tail = out.decode("utf-8", "replace").strip()[-1000:]
                    raise TaskError(
                        f"the App's API relay (python3 of image {ctx.task.get('image')}) exited with "
                        f"{self.sidecar.attrs.get('State', {}).get('ExitCode')}: {tail or '(no output)'}"
                    )
                if time.monotonic() >= deadline:
                    raise TaskError(f"the App's API relay did not start listening within {READY_S:g} s")
            time.sleep(READY_POLL_S)


def sidecar_kwargs(ctx) -> dict:
    """The relay sidecar's create kwargs: the App's image (Apps are Python images; it is on the
    node already) running python3 on the relay script, mounted read-only with the forwarder's
    socket folder; the task's labels plus its role; TASK_NETWORK (the App keeps the internet
    access a task has); no capabilities, no new privileges, read-only root, small limits."""
    cfg = ctx.config
    script = ctx.task_dir / RELAY_FILE
    tmp = script.with_name(script.name + ".tmp")
    shutil.copyfile(Path(__file__).with_name("app_sidecar.py"), tmp)
    os.chmod(tmp, 0o444)
    os.replace(tmp, script)
    kw = {
        "image": ctx.task.get("image"),
        "name": f"{container_name(ctx.task_id)}_api",
        "labels": {LABEL_AGENT: cfg.identity, LABEL_TASK: str(ctx.task_id), LABEL_ROLE: RELAY_ROLE},
        "entrypoint": ["python3", "-I", "-S", "-B", "-u", SIDECAR_SCRIPT],
        "command": ["127.0.0.1", str(RELAY_PORT), f"{SIDECAR_API}/{SOCKET_NAME}"],
        # An nvidia default runtime would give the image's NVIDIA_VISIBLE_DEVICES=all every GPU.
        "environment": {"NVIDIA_VISIBLE_DEVICES": "void"},
        "mounts": [
            Mount(SIDECAR_API, bind_source(ctx, ctx.task_dir / API_DIR), type="bind", read_only=True),
            Mount(SIDECAR_SCRIPT, bind_source(ctx, script), type="bind", read_only=True),
        ],
        "working_dir": "/",
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "cap_drop": ["ALL"],
        "network_mode": cfg.task_network,
        "read_only": True,
        "pids_limit": SIDECAR_PIDS,
        "mem_limit": SIDECAR_MEMORY,
        "memswap_limit": SIDECAR_MEMORY,
        "detach": True,
    }
    if cfg.task_user:
        kw["user"] = cfg.task_user
    return kw
