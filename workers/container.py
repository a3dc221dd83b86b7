"""One task's container through the docker SDK: pull, create, stream its output, stop, inspect.

The output is read from the Engine's log endpoint (`follow=1&timestamps=1`) with large socket
reads and our own frame decoder (workers/logparse.py): every line gets its container timestamp
`cts`, so a re-attaching task process resumes right after the last line in the durable log.
"""
from __future__ import annotations

import collections
import json
import os
import shlex
import threading
import time

import docker
from docker.types import DeviceRequest, Mount

from protocol.tasks import DEFAULT_ENTRYPOINTS
from workers.errors import TaskError
from workers.logparse import FrameDecoder

LABEL_AGENT = "sly-agent.agent"
LABEL_TASK = "sly-agent.task"
BATCH_LINES = 1000
BATCH_INTERVAL_S = 0.05
READ_SIZE = 1 << 20
LOG_SOURCE_ENV = "SLY_LOG_SOURCE"   # "api": always read the log through the Engine (tests, debugging)
FILE_POLL_S = 0.01
FILE_QUIET_READS = 2          # empty reads 10 ms apart after the exit: the log is complete
PULL_LOG_EVERY_S = 1.0


def container_name(task_id: int) -> str:
    return f"sly_task_{task_id}"


def docker_client(timeout: float = 120):
    return docker.from_env(timeout=timeout)


def ensure_image(client, image: str, policy: str, log) -> None:
    """Apply the pull policy (if-not-present, always, never); pull progress goes to `log`."""
    if not image:
        raise TaskError("the task has no image")
    present = True
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        present = False
    except docker.errors.APIError as e:
        raise TaskError(f"image {image}: {e.explanation or e}") from None
    if policy == "never" or (policy == "if-not-present" and present):
        if not present:
            raise TaskError(f"image {image} is not on this node and PULL_POLICY=never forbids pulling it")
        return
    repo, tag = _split_image(image)
    log(f"pulling image {image}")
    last = 0.0
    try:
        for ev in client.api.pull(repo, tag=tag, stream=True, decode=True):
            if "error" in ev:
                raise TaskError(f"cannot pull image {image}: {ev['error']}")
            now = time.monotonic()
            if now - last >= PULL_LOG_EVERY_S:
                last = now
                log(f"pull {image}: {ev.get('id', '')} {ev.get('status', '')} {ev.get('progress', '')}".rstrip())
    except docker.errors.APIError as e:
        if policy == "always" and present:
            log(f"pull of {image} failed ({e.explanation or e}); using the local image", level="warning")
            return
        raise TaskError(f"cannot pull image {image}: {e.explanation or e}") from None
    log(f"pulled image {image}")


def _split_image(image: str) -> tuple[str, str]:
    if "@" in image:
        return image, None
    name, _, tag = image.rpartition(":")
    if name and "/" not in tag:
        return name, tag
    return image, "latest"


def _size(value):
    """Resources: an int of bytes, or a docker size string ('512m', '2g'); 0/''/'0' is none."""
    if value is None or value == "" or value == 0 or value == "0":
        return None
    return value if isinstance(value, (int, str)) else str(value)


TASK_ROOT = "/sly_task_data"
# What the container is given of its task dir, at the real Supervisely agent's paths: inputs
# read-only, results/ and tmp/ writable. The task dir itself (its durable log in logs/) is not.
MOUNTS = (("task_config.json", True), ("task_settings.json", True), ("data", True), ("model", True),
          ("results", False), ("tmp", False))
MOUNT_FILES = frozenset({"task_config.json", "task_settings.json"})


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
            os.chmod(path, 0o777)   # another uid than ours writes here
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
        source = cfg.host_path(path)    # the agent runs in a container: the host resolves its own links
    if cfg.access_token in source:
        raise TaskError("the task dir's host path contains the node token; set AGENT_HOST_DIR to a path without it")
    return source


def task_env(ctx) -> dict:
    """The environment the real Supervisely agent gives a task, without its host paths and proxies."""
    task, cfg = ctx.task, ctx.config
    env = {"PYTHONUNBUFFERED": "1", "LOG_LEVEL": cfg.task_log_level, "LANG": "C.UTF-8",
           "TASK_ID": str(ctx.task_id), "TASK_TYPE": str(task.get("type", ""))}
    if ctx.gpus:
        # The runtime exposes only the requested GPUs, numbered from 0 inside; an image's own
        # CUDA_VISIBLE_DEVICES (a host index, often) would hide them.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(ctx.gpus)))
    else:
        # On a node whose default runtime is nvidia, an image's NVIDIA_VISIBLE_DEVICES=all would
        # expose every GPU; "void" makes that runtime behave like runc.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    return env


def task_command(task: dict) -> dict:
    """`command` (argv after the image's entrypoint) or the real agent's entry point for a
    train/inference task without one; {} runs the image's own CMD."""
    command = task.get("command")
    if command:
        return {"command": shlex.split(command) if isinstance(command, str) else [str(c) for c in command]}
    default = DEFAULT_ENTRYPOINTS.get(str(task.get("type")))
    if default:
        # As the Supervisely agent starts it; legacy NN plugin images have no CMD.
        return {"entrypoint": ["sh", "-c", shlex.join(default)]}
    return {}


def create_kwargs(ctx) -> dict:
    """Everything `containers.create` gets for this task (docs/workers.md, docs/security-agent.md)."""
    task, cfg = ctx.task, ctx.config
    res = task.get("resources") or {}
    ensure_mount_sources(ctx)
    mounts = [Mount(f"{TASK_ROOT}/{name}", bind_source(ctx, ctx.task_dir / name), type="bind", read_only=ro)
              for name, ro in MOUNTS]
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
        **task_command(task),
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
        kw["memswap_limit"] = mem      # no swap beyond the limit: over it is an OOM kill, not thrashing
    shm = _size(res.get("shm_size")) or _size(cfg.task_shm_size)
    if shm is not None:
        kw["shm_size"] = shm
    return kw


def _create(client, kw: dict):
    """containers.create without its follow-up inspect (one round trip less on every pickup)."""
    from docker.models.containers import _create_container_args
    args = _create_container_args(dict(kw, detach=True, version=client.api._version))
    answer = client.api.create_container(**args)
    return client.containers.prepare_model({"Id": answer["Id"], "Name": "/" + kw["name"],
                                            "Config": {"Labels": kw["labels"]}, "State": {"Status": "created"}})


def spawn_container(client, ctx):
    """Create and start the task's container. A stale one of ours with the same name is removed
    first; where another agent on this engine (another server's task with the same id) holds
    the name, ours gets the name with this agent's identity appended instead."""
    kw = create_kwargs(ctx)
    kw.pop("detach", None)
    try:
        for name in (kw["name"], f"{kw['name']}_{ctx.config.identity[:8]}"):
            kw["name"] = name
            try:
                container = _create(client, kw)
                break
            except docker.errors.APIError as e:
                if e.status_code != 409:
                    raise
                stale = client.containers.get(name)
                if stale.labels.get(LABEL_AGENT) == kw["labels"][LABEL_AGENT]:
                    stale.remove(force=True)    # ours, from an attempt that did not get to run it
                    container = _create(client, kw)
                    break
        else:
            raise TaskError(f"containers named {container_name(ctx.task_id)} of other agents exist on this host")
    except docker.errors.ImageNotFound:
        raise TaskError(f"image {kw['image']} is not on this node") from None
    except docker.errors.APIError as e:
        raise TaskError(f"cannot create the container: {e.explanation or e}") from None
    try:
        container.start()
    except docker.errors.APIError as e:
        container.remove(force=True)
        raise TaskError(f"cannot start the container: {e.explanation or e}") from None
    return container


def find_container(client, task_id: int, identity: str):
    """This agent's container of the task (found by labels, whatever its name), or None."""
    found = client.containers.list(all=True, filters={"label": [f"{LABEL_AGENT}={identity}",
                                                                f"{LABEL_TASK}={task_id}"]})
    return found[0] if found else None


class LogPump(threading.Thread):
    """Thread: the container's output -> ctx.emit batches (<= BATCH_LINES lines, <= 50 ms old)."""

    def __init__(self, ctx, client, container, since_ns: int | None = None, on_event=None, tail_lines: int = 20):
        super().__init__(name="log-pump", daemon=True)
        self.ctx, self.client, self.container = ctx, client, container
        self.since_ns = since_ns
        self.on_event = on_event
        self.tail = collections.deque(maxlen=tail_lines)
        self.lines = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()    # the batch; emits happen under it, so lines stay in order
        self.batch: list = []
        self.first_pending = 0.0
        self.done = False

    def _open(self, since_ns: int | None, follow: bool):
        api = self.client.api
        params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": int(follow)}
        if since_ns:
            params["since"] = f"{since_ns // 1_000_000_000}.{since_ns % 1_000_000_000:09d}"
        r = api._get(api._url("/containers/{0}/logs", self.container.id), params=params, stream=True, timeout=None)
        api._raise_for_status(r)
        return r

    def run(self) -> None:
        try:
            self._pump()
        except BaseException as e:  # noqa: BLE001 - the handler reports it
            self.error = e

    def _pump(self) -> None:
        ctx = self.ctx

        def on_event(line):
            if line.get("event_type") == "progress":
                cur, tot = line.get("current"), line.get("total")
                if isinstance(cur, (int, float)) and isinstance(tot, (int, float)):
                    ctx.progress(cur, tot)
            if self.on_event is not None:
                self.on_event(line)

        decoder = FrameDecoder(skip_until_ns=self.since_ns, on_event=on_event)
        ticker = threading.Thread(target=self._tick, name="log-flush", daemon=True)
        ticker.start()
        follow = True
        try:
            path = self._log_file() if os.environ.get(LOG_SOURCE_ENV) != "api" else None
            if path is not None:
                decoder.resume_since()
                self._read_file(path, decoder)
                return
            while True:
                self._read(self._open(decoder.resume_since(), follow), decoder)
                if not follow:
                    break
                # The engine (20.10, json-file) may end a follow stream when the container exits
                # before it has sent everything: once the container is down, read the rest plainly.
                try:
                    self.container.reload()
                except docker.errors.NotFound:
                    break
                if self.container.status not in ("running", "paused", "restarting"):
                    follow = False
        finally:
            rest: list = []
            decoder.finish(rest)
            with self.lock:
                self.batch.extend(rest)
                self._flush_locked()
                self.done = True

    def _log_file(self) -> str | None:
        """The container's json-file log, when this process can read it and it never rotates.

        Reading it directly spares the Engine the cost of serving the log over its API (about
        2 CPU-seconds per 300,000 lines on the test box) and keeps each line's stamp. An agent in
        a container without the Engine's data dir mounted reads through the API instead."""
        try:
            self.container.reload()
        except docker.errors.APIError:
            return None
        attrs = self.container.attrs
        log_config = (attrs.get("HostConfig") or {}).get("LogConfig") or {}
        path = attrs.get("LogPath") or ""
        if log_config.get("Type") != "json-file" or (log_config.get("Config") or {}).get("max-size"):
            return None
        if not path or not os.access(path, os.R_OK):
            return None
        return path

    def _read_file(self, path: str, decoder: FrameDecoder) -> None:
        """Follow the log file until the container has exited and the file has stopped growing."""
        exited = threading.Event()

        def wait_exit():
            try:
                self.container.wait()
            except Exception:  # noqa: BLE001 - the container is gone: nothing more comes
                pass
            exited.set()
        threading.Thread(target=wait_exit, name="log-exit", daemon=True).start()
        quiet_after_exit = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(READ_SIZE)
                if data:
                    quiet_after_exit = 0
                    out: list = []
                    decoder.feed_jsonfile(data, out)
                    if out:
                        self._push(out)
                    continue
                if exited.is_set():
                    # The Engine writes the last lines while it handles the exit: read until
                    # the file has been quiet for a while.
                    quiet_after_exit += 1
                    if quiet_after_exit >= FILE_QUIET_READS:
                        return
                    time.sleep(FILE_POLL_S)
                else:
                    exited.wait(FILE_POLL_S)    # the exit wakes this at once (the quiet reads start)

    def _push(self, out: list) -> None:
        with self.lock:
            if not self.batch:
                self.first_pending = time.monotonic()
            self.batch.extend(out)
            if len(self.batch) >= BATCH_LINES:
                self._flush_locked()

    def _read(self, r, decoder: FrameDecoder) -> None:
        try:
            for data in _body_chunks(r):
                out: list = []
                decoder.feed(data, out)
                if out:
                    self._push(out)
        finally:
            r.close()

    def _tick(self) -> None:
        """Thread: a line never waits more than about BATCH_INTERVAL_S for its batch to fill."""
        while True:
            time.sleep(BATCH_INTERVAL_S / 2)
            with self.lock:
                if self.done:
                    return
                if self.batch and time.monotonic() - self.first_pending >= BATCH_INTERVAL_S:
                    self._flush_locked()

    def _flush_locked(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        self.lines += len(batch)
        self.tail.extend(line["message"] for line in batch[-self.tail.maxlen:])
        self.ctx.emit(batch)


def _body_chunks(r):
    """The body of a streamed HTTP response, as it arrives, in large pieces.

    The engine sends one HTTP chunk per log line; urllib3 hands them out one by one, which costs
    more than the line itself. With a chunked body this reads the connection in large reads and
    undoes the chunked encoding here."""
    fp = getattr(getattr(r.raw, "_fp", None), "fp", None)
    if fp is None or not getattr(r.raw._fp, "chunked", False) or r.raw._fp.chunk_left is not None:
        read = r.raw.read1 if hasattr(r.raw, "read1") else r.raw.read
        while data := read(READ_SIZE):
            yield data
        return
    buf = b""
    while True:
        data = fp.read1(READ_SIZE)
        if not data:
            return
        buf = buf + data if buf else data
        pos, parts, end = 0, [], False
        while True:
            i = buf.find(b"\r\n", pos)
            if i < 0:
                break
            size = int(buf[pos:i].split(b";", 1)[0], 16)
            if size == 0:
                end = True
                break
            if len(buf) < i + 4 + size:
                break
            parts.append(buf[i + 2:i + 2 + size])
            pos = i + 4 + size
        buf = buf[pos:]
        if parts:
            yield b"".join(parts)
        if end:
            return


def stop_container(container, grace_s: float) -> None:
    """SIGTERM, `grace_s`, SIGKILL (the engine does the escalation)."""
    try:
        container.stop(timeout=max(0, int(round(grace_s))))
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError:
        kill_container(container)


def kill_container(container) -> None:
    try:
        container.kill()
    except (docker.errors.NotFound, docker.errors.APIError):
        pass


def remove_container(container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if "already in progress" not in str(e):
            raise
