"""The lifecycle every container task type shares (train, inference, custom, app):

    preparing: disk check -> downloads -> the task dir (data/, model/, config files) -> image -> container
    running:   stream the output, upload checkpoints; stop, deadline, exit code, OOM
    uploading: the type's result (workers.<type> says what and how)

and `reap_orphan_containers()`, which the supervisor calls after its first poll (through workers.engine).
A type that runs something beside its container (an App's API forwarder and relay) says so with
a `Companion`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import docker
import requests

from workers import cache
from workers.base import Outcome
from workers.checkpoints import CHECKPOINTS_FILE, CheckpointUploader
from workers.container import (
    docker_client,
    find_container,
    kill_container,
    remove_container,
    spawn_container,
    stop_container,
)
from workers.container_spec import LABEL_AGENT, LABEL_ROLE, LABEL_TASK
from workers.downloads import Downloader, plan_pages, write_project_files
from workers.errors import StopRequested, TaskError
from workers.image_pull import ensure_image
from workers.log_pump import LogPump

TAIL_IN_ERROR = 10
STOP_POLL_S = 0.1


AGENT_FILE = "agent.json"  # tasks/<id>/agent.json: the agent's own fields; never mounted
CONFIG_FILES = ("task_config.json", "task_settings.json")


def write_task_config(ctx) -> list[Path]:
    """task_config.json and task_settings.json: both the task's `config` (the real agent
    writes both, `task_settings.json` being the legacy name), as the SDK's dump_json_file
    writes JSON; and agent.json with what the agent itself knows of the task."""
    task = ctx.task
    paths = []
    config = task_config(task, ctx.gpus)
    for name in CONFIG_FILES:
        paths.append(_write_json(ctx.task_dir / name, config))
    project = task.get("project")
    model = task.get("model")
    _write_json(
        ctx.task_dir / AGENT_FILE,
        {
            "task_id": ctx.task_id,
            "type": task.get("type"),
            "image": task.get("image"),
            "resources": task.get("resources") or {},
            "gpus": list(ctx.gpus),
            "project": (
                {
                    "id": project.get("id"),
                    "name": project.get("name"),
                    "datasets": [ds.get("name") for ds in project.get("datasets") or []],
                }
                if project
                else None
            ),
            "model": ({"id": model.get("id"), "name": model.get("name"), "hash": model.get("hash")} if model else None),
        },
    )
    return paths


def task_config(task: dict, gpus: list[int]) -> object:
    """The task's `config` as given; when the task has GPUs, or its config names `gpu_devices`,
    `gpu_devices` is the GPUs' indices inside the container (0..n-1; [] on the CPU): legacy
    plugins call `remap_gpu_devices(config["gpu_devices"])`, and the host's indices mean nothing
    inside, where the runtime numbers the task's GPUs from 0."""
    config = task.get("config")
    if config is None:
        config = {}
    if isinstance(config, dict) and (gpus or "gpu_devices" in config):
        config = {**config, "gpu_devices": list(range(len(gpus)))}
    return config


def _write_json(path: Path, obj) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    tmp.replace(path)
    return path


def prepare(ctx, download: bool = True) -> dict:
    """The task dir as the real agent lays it out; returns the download summary.

    data/<project>/ and model/ are made anew (a task prepared again after a restart finds
    no stale link); results/ and tmp/ exist and are empty when the container starts.
    `download` False: nothing is fetched (an App reads its project through the API)."""
    ctx.task_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "model", "results", "tmp"):
        d = ctx.task_dir / sub
        if d.is_symlink() or d.is_file():
            d.unlink()
        elif d.is_dir():
            shutil.rmtree(d)
        d.mkdir()
    (ctx.task_dir / CHECKPOINTS_FILE).unlink(missing_ok=True)
    downloader = Downloader(ctx)
    summary = downloader.prepare(plan_pages(ctx) if download else [])
    summary["empty_anns"] = write_project_files(ctx, downloader.jobs) if download else 0
    if downloader.jobs:
        ctx.log(
            f"data ready: {summary['files']} files ({summary['cached']} cached, {summary['fetched']} downloaded, "
            f"{summary['bytes'] / cache.MB:.1f} MB)"
        )
    write_task_config(ctx)
    return summary


class Companion:
    """What a task type runs beside its container, at fixed points of the lifecycle. This one runs
    nothing (train, inference, custom); workers/app.py's runs an App's API forwarder and relay."""

    def prepare(self, ctx) -> None:
        """Preparing, before the image: the task dir (and the downloads)."""
        prepare(ctx)

    def spawn(self, ctx, client, image_config: dict | None) -> dict:
        """Just before the container is created: start what runs beside it; returns the
        container's create_kwargs() `extra`."""
        return {}

    def adopt(self, ctx, client, container) -> None:
        """The task's container was found again (agent restart): serve it again."""

    def remove(self, ctx) -> None:
        """At every end, after the container is removed: remove what runs beside it. Idempotent."""


def run_container_task(ctx, upload, companion: Companion | None = None) -> Outcome:
    """The whole life of a container task; `upload(ctx, live)` uploads the type's result after
    exit 0 (`live`: the CheckpointUploader that ran alongside the container)."""
    companion = companion or Companion()
    client = None
    container = None
    just_started = False
    outcome: Outcome | None = None
    try:
        client = docker_client()
        if ctx.adopt:
            container = find_container(client, ctx.task_id, ctx.config.identity)
            since = ctx.last_log_ts_ns()
            if container is None and since is not None:
                return Outcome("failed", error="container lost while the agent was down")
            if container is not None:
                ctx.log(f"re-attached to container {container.name} ({container.status})")
                companion.adopt(ctx, client, container)
                _phase(ctx, "running")  # the server has it running already; the title shows it
            else:
                # The previous task process died before its container printed anything (while
                # preparing, most likely): prepare again; cached blobs make that cheap.
                ctx.log("no container for this task yet (the agent stopped while preparing); preparing again")
        if container is None:
            _phase(ctx, "preparing")
            status = cache.disk_status(ctx.config)
            if not status["ok"]:
                cache.ensure_space(ctx.config, 0, log=ctx.log)
            companion.prepare(ctx)
            _check_stop(ctx)
            image_config = ensure_image(client, ctx.task.get("image"), ctx.config.pull_policy, ctx.log, ctx.config)
            _check_stop(ctx)
            extra = companion.spawn(ctx, client, image_config)
            _check_stop(ctx)
            container = spawn_container(client, ctx, image_config, extra)
            since = None
            just_started = True
            _phase(ctx, "running")
        outcome, live = _supervise(ctx, client, container, since, just_started)
        if outcome.state == "finished":
            ctx.set_phase("uploading")
            upload(ctx, live)
    except StopRequested:
        outcome = Outcome("stopped")
    except (TaskError, cache.DiskError) as e:
        ctx.log(str(e), level="error")
        outcome = Outcome("failed", error=str(e))
    except docker.errors.DockerException as e:
        ctx.log(f"Docker: {e}", level="error")
        outcome = Outcome("failed", error=f"Docker: {e}")
    finally:
        if outcome is None:  # leaving with an exception (or a return above)
            if container is not None:
                _remove(ctx, container)
                container = None
            companion.remove(ctx)
    # The container's removal and the task dir's cleanup overlap the shipping of the last log
    # lines; both are done before the final state is reported (ctx.before_final).
    end = threading.Thread(target=_end_of_task, args=(ctx, container, outcome, companion), name="task-end")
    end.start()
    ctx.before_final(end.join)
    return outcome


def _remove(ctx, container) -> None:
    try:
        remove_container(container)
    except Exception as e:  # noqa: BLE001 - reported, the outcome stands
        ctx.log(f"could not remove container {container.name}: {e}", level="warning")


def _end_of_task(ctx, container, outcome: Outcome, companion: Companion) -> None:
    if container is not None:
        _remove(ctx, container)
    companion.remove(ctx)  # after the container: an App is stopped before its relay
    clean_task_dir(ctx, outcome)


def _phase(ctx, phase: str) -> None:
    try:
        ctx.set_phase(phase)
    except ValueError:
        if not ctx.adopt:
            raise
        # adopted in a later phase (e.g. uploading): the phases still to come are reported as they come


def _check_stop(ctx) -> None:
    if ctx.stop_event.is_set():
        raise StopRequested()


def _deadline(ctx, container, just_started: bool) -> float | None:
    """The wall-clock deadline from the task's timeout_s, counted from the container's start."""
    timeout = ctx.task.get("timeout_s")
    if not timeout:
        return None
    if just_started:
        return time.time() + float(timeout)
    container.reload()
    started = container.attrs.get("State", {}).get("StartedAt", "")
    from datetime import datetime

    try:
        t0 = datetime.fromisoformat(started[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        t0 = time.time()
    if t0 <= 0:
        t0 = time.time()
    return t0 + float(timeout)


def _supervise(ctx, client, container, since_ns, just_started: bool = False):
    """Stream the output until the container exits; apply stop and deadline; read the exit.
    Returns (Outcome, the CheckpointUploader)."""
    checkpoints = CheckpointUploader(ctx).start()
    pump = LogPump(ctx, client, container, since_ns=since_ns, on_event=checkpoints.on_event)
    pump.start()
    deadline = _deadline(ctx, container, just_started)
    stopped = timed_out = False
    try:
        while pump.is_alive() or (pump.error is not None and _still_running(container)):
            if pump.is_alive():
                pump.join(STOP_POLL_S)
            else:  # output lost (reported below); still wait for the exit
                time.sleep(STOP_POLL_S)
            if not stopped and ctx.stop_event.is_set():
                ctx.log(f"stopping the container (SIGTERM, {ctx.config.stop_grace_s:g} s grace, SIGKILL)")
                stopped = True
                stop_container(container, ctx.config.stop_grace_s)
            if not timed_out and not stopped and deadline is not None and time.time() >= deadline:
                ctx.log(f"deadline exceeded ({ctx.task.get('timeout_s')} s): killing the container", level="error")
                timed_out = True
                kill_container(container)
        result = container.wait(timeout=60)
    finally:
        pump.join(30)
        checkpoints.stop()
    if pump.error is not None:
        ctx.log(f"reading the container's output failed: {pump.error!r}", level="warning")
    code = result.get("StatusCode")
    if code != 0:
        container.reload()  # OOMKilled is only in the inspect answer
    state = container.attrs.get("State", {}) if code != 0 else {}
    return _exit_outcome(ctx, pump, code, state, stopped, timed_out), checkpoints


def _exit_outcome(ctx, pump, code, state: dict, stopped: bool, timed_out: bool) -> Outcome:
    if stopped:
        return Outcome("stopped", exit_code=code)
    if timed_out:
        return Outcome("failed", exit_code=code, error=f"deadline exceeded ({ctx.task.get('timeout_s')} s)")
    if state.get("OOMKilled"):
        return Outcome("failed", exit_code=code, error="out of memory (OOMKilled)")
    if code != 0:
        tail = "\n".join(list(pump.tail)[-TAIL_IN_ERROR:])
        return Outcome(
            "failed",
            exit_code=code,
            error=f"exit code {code}; last output:\n{tail}" if tail else f"exit code {code} (no output)",
        )
    return Outcome("finished", exit_code=0)


def _still_running(container) -> bool:
    """Only asked when the log pump has ended early (an error): is the container still up?"""
    try:
        container.reload()
    except docker.errors.NotFound:
        return False
    except (docker.errors.APIError, requests.RequestException):
        return True
    return container.status in ("running", "paused", "restarting", "created")


def clean_task_dir(ctx, outcome: Outcome) -> None:
    """TASK_DIR_CLEANUP: never, on-success, always. Logs stay."""
    policy = ctx.config.task_dir_cleanup
    if policy == "never" or (policy == "on-success" and outcome.state != "finished"):
        return
    remove_task_data(ctx.task_dir)


def remove_task_data(task_dir: Path) -> int:
    """Delete everything in a task dir but its logs/; returns bytes freed (approximately)."""
    freed = 0
    if not task_dir.is_dir():
        return 0
    for entry in task_dir.iterdir():
        if entry.name == "logs":
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                freed += sum(p.stat().st_size for p in entry.rglob("*") if p.is_file() and not p.is_symlink())
                shutil.rmtree(entry, ignore_errors=True)
            else:
                freed += entry.lstat().st_size
                entry.unlink()
        except OSError:
            pass
    return freed


def reap_orphan_containers(config, keep_task_ids) -> list[str]:
    """Remove containers labelled with this agent's identity whose task is not in keep_task_ids."""
    keep = {str(int(t)) for t in keep_task_ids}
    client = docker_client()
    removed = []
    found = client.containers.list(all=True, filters={"label": f"{LABEL_AGENT}={config.identity}"})
    # A task's own container before those beside it (an App before its API relay).
    for c in sorted(found, key=lambda c: LABEL_ROLE in c.labels):
        if c.labels.get(LABEL_TASK) not in keep:
            remove_container(c)
            removed.append(c.name)
    return removed
