"""The whole lifecycle on embedded defaults: `./run.sh demo` (python -m tools.demo).

Starts the reference server on SQLite in ./demo-data and prints the console's address with a
one-time sign-in link; adds a node (or reuses `demo-node`) and starts its agent; uploads an
annotated sample project and a base model (or reuses `demo-project` and `demo-base-model`);
builds a tiny task image locally (busybox, no registry, no SDK); trains on the project while
printing the live log (SDK-style progress, train and val metrics, checkpoints); runs inference
with the trained model and prints where to see the predictions; then runs one App (an `app` task:
tools/demo/app/export_project.py, which exports the project to team files through the public
API, as a Supervisely export App does) and prints where its archive is. Then it leaves the
server and the agent running until Ctrl-C, which stops the agent (its tasks first), then the
server.

`--exit-when-done` stops everything once the App ends (exit 0 only if training made a model,
inference made a project and the App an archive). `--signin-link` prints a fresh one-time link
for a running demo.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import requests

from client import UserClient
from protocol import endpoints
from tools.demo.app_image import APP_COMMAND, ensure_demo_app_image
from tools.images import ensure_demo_image
from tools.sample_project import write_sample_project

REPO = Path(__file__).resolve().parents[2]
NODE, PROJECT, BASE_MODEL = "demo-node", "demo-project", "demo-base-model"
FINAL = ("finished", "failed", "stopped", "lost")
TASK_TYPES = ("train", "inference", "app")


def pick_port(host: str, preferred: int) -> int:
    """`preferred` when nothing listens on it, else a free one the kernel picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            # The server binds with SO_REUSEADDR too, so the port of the previous run, whose
            # closed connections sit in TIME_WAIT, is free for it; a listening socket still refuses.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def make_sample_data(root: Path, images: int = 12) -> tuple[Path, Path]:
    """A plain project of tiny PPM images in two datasets, and a model folder (the old task contract;
    tests/deploy/test_agent_image.py still uses it with tools/demo/train.sh)."""
    project = root / "sample-project"
    model = root / "sample-model"
    for i in range(images):
        ds = project / ("train" if i % 4 else "val")
        ds.mkdir(parents=True, exist_ok=True)
        rgb = bytes([(i * 40) % 256, (i * 90) % 256, (i * 150) % 256]) * 16 * 16
        (ds / f"img_{i:03d}.ppm").write_bytes(b"P6 16 16 255\n" + rgb)
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"arch": "tiny-cnn", "classes": ["a", "b"]}))
    (model / "weights.bin").write_bytes(os.urandom(2048))
    return project, model


def write_base_model(root: Path) -> Path:
    """The starting point of training: the same bytes on every run, so a re-upload changes nothing."""
    model = root / "base-model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"arch": "demo-box", "epoch": 0, "box": {"width": 16, "height": 16}}))
    (model / "weights.bin").write_bytes(bytes(range(256)) * 8)
    return model


def _bar(current: float, total: float, width: int = 30) -> str:
    frac = 0.0 if not total else max(0.0, min(1.0, current / total))
    done = int(frac * width)
    return f"[{'#' * done}{'.' * (width - done)}] {current:g}/{total:g}"


def _event(line: dict) -> str:
    """`EventType.PROGRESS` and `progress` alike -> `progress`."""
    return str(line.get("event_type") or "").removeprefix("EventType.").lower()


def show_line(line: dict) -> None:
    ev = _event(line)
    if ev == "progress":
        current, total = line.get("current", 0), line.get("total", 0)
        if total > 10 and current != total and current % (total // 5 or 1):
            return  # a long run shows about five steps
        print(f"  {line.get('subtask') or 'progress'} {_bar(line.get('current', 0), line.get('total', 0))}", flush=True)
    elif ev == "metrics":
        values = " ".join(
            f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in (line.get("metrics") or {}).items()
        )
        print(f"  metrics {line.get('type', '?'):5} epoch {line.get('epoch', '?')}: {values}", flush=True)
    elif ev == "checkpoint":
        print(f"  checkpoint {line.get('subdir') or line.get('path', '')} ({line.get('sizeb', '?')} bytes)", flush=True)
    else:
        print(f"  [{line.get('stream', '?'):6}] {line.get('message', '')}", flush=True)


def say(*parts) -> None:
    print("demo:", *parts, flush=True)


class Demo:
    def __init__(self, args):
        self.args = args
        self.data = Path(args.data).resolve()
        self.server: subprocess.Popen | None = None
        self.agent: subprocess.Popen | None = None

    # --- processes
    def _log(self, name: str):
        """This run's log file; the previous run's is kept as <name>.1."""
        path = self.data / name
        if path.exists():
            path.replace(path.with_name(name + ".1"))
        return open(path, "wb")

    def start_server(self) -> tuple[str, str]:
        self.data.mkdir(parents=True, exist_ok=True)
        token_file = self.data / "admin_token"
        if not token_file.exists():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32)) + "\n")
        admin = token_file.read_text().strip()
        port = pick_port(self.args.host, self.args.port)
        if port != self.args.port:
            say(f"port {self.args.port} is taken; using {port}")
        host = "127.0.0.1" if self.args.host in ("0.0.0.0", "") else self.args.host
        url = f"http://{host}:{port}"
        env = dict(os.environ, SERVER_ADMIN_TOKEN=admin, PYTHONUNBUFFERED="1")
        # Its own session: a terminal's Ctrl-C reaches only the demo, which stops the agent first.
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--host",
                self.args.host,
                "--port",
                str(port),
                "--data",
                str(self.data / "server"),
            ],
            cwd=REPO,
            env=env,
            stdout=self._log("server.log"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    (self.data / "url").write_text(url + "\n")
                    return url, admin
            except requests.RequestException:
                pass
            if self.server.poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"demo: the server did not start; see {self.data / 'server.log'}")

    def start_agent(self, url: str, token: str) -> None:
        env = dict(
            os.environ,
            SERVER_ADDRESS=url,
            ACCESS_TOKEN=token,
            PYTHONUNBUFFERED="1",
            AGENT_HOST_DIR=str(self.data / "agent"),
            TELEMETRY_INTERVAL="2",
            STOP_GRACE="3",
            MIN_FREE_DISK_MB=os.environ.get("MIN_FREE_DISK_MB", "256"),
        )
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "agent"],
            cwd=REPO,
            env=env,
            stdout=self._log("agent.log"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_all(self) -> None:
        """The agent first (SIGINT: it stops its tasks, reports them and exits), then the server."""
        for proc, sig in ((self.agent, signal.SIGINT), (self.server, signal.SIGTERM)):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(sig)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- things on the server, reused by name
    def ensure_node(self, client: UserClient, url: str) -> tuple[dict, str]:
        token_file = self.data / "node_token"
        nodes = sorted((a for a in client.list_agents() if a["name"] == NODE), key=lambda a: a["id"])
        if not nodes:
            made = client.create_agent(NODE, list(TASK_TYPES))
            node, token, how = made, made["token"], "added"
        else:
            node = nodes[0]
            token = token_file.read_text().strip() if token_file.exists() else ""
            how = "reused"
            if not token or not _agent_token_works(url, token):
                token, how = client.rotate_token(node["id"])["token"], "reused (new token)"
            missing = [t for t in TASK_TYPES if t not in node["allowed_task_types"]]
            if missing:
                client.patch_agent(node["id"], allowed_task_types=node["allowed_task_types"] + missing)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        say(f"node {NODE} (id {node['id']}) {how}; starting its agent (log: {self.data / 'agent.log'})")
        return node, token

    def ensure_project(self, client: UserClient) -> dict:
        mine = [p for p in client.list_projects() if p["name"] == PROJECT and p.get("task_id") is None]
        if mine:
            project = min(mine, key=lambda p: p["id"])
            say(f"project {PROJECT} (id {project['id']}) reused")
            return project
        sample = write_sample_project(str(self.data / "samples"), PROJECT, {"train": 9, "val": 3})
        project = client.upload_project_dir(sample["path"], name=PROJECT)
        say(
            f"project {PROJECT} (id {project['id']}) uploaded: {len(sample['items'])} annotated images "
            f"(rectangles, polygons, bitmaps; image and object tags)"
        )
        return project

    def ensure_base_model(self, client: UserClient) -> dict:
        mine = [m for m in client.list_models() if m["name"] == BASE_MODEL and m.get("task_id") is None]
        if mine:
            model = min(mine, key=lambda m: m["id"])
            say(f"model {BASE_MODEL} (id {model['id']}) reused")
            return model
        model = client.upload_model_dir(write_base_model(self.data / "samples"), name=BASE_MODEL)
        say(f"model {BASE_MODEL} (id {model['id']}) uploaded")
        return model

    # --- tasks
    def run_task(self, client: UserClient, url: str, **spec) -> dict:
        task = client.create_task(timeout_s=600, **spec)
        say(f"{spec['type']} task {task['id']} ({url}/tasks/{task['id']}); its live log:")
        for line in client.iter_logs(task["id"], follow=True):
            show_line(line)
        final = client.wait_task(task["id"], states=FINAL, timeout=120)
        say(
            f"{spec['type']} task {task['id']} ended {final['state']}"
            + (f": {final.get('error')}" if final.get("error") else "")
        )
        return final

    def train(self, client: UserClient, url: str, node: dict, project: dict, base: dict, image: str) -> int | None:
        final = self.run_task(
            client,
            url,
            agent_id=node["id"],
            type="train",
            image=image,
            command=["sh", "/workdir/src/train.sh"],
            config={"epochs": self.args.epochs, "epoch_seconds": 0.5},
            project_id=project["id"],
            model_id=base["id"],
        )
        results = final.get("results") or {}
        for mid in results.get("checkpoints") or []:
            m = client.get_model(mid)
            print(
                f"  checkpoint model {mid} '{m['name']}' epoch {(m.get('config') or {}).get('epoch', '?')}", flush=True
            )
        model_id = results.get("model_id")
        if final["state"] != "finished" or not model_id:
            return None
        model = client.get_model(model_id)
        say(
            f"trained model {model_id} '{model['name']}' ({url}/models): "
            + ", ".join(f"{f['path']} {f['size']} bytes" for f in model.get("files", []))
        )
        return model_id

    def infer(self, client: UserClient, url: str, node: dict, project: dict, model_id: int, image: str) -> int | None:
        final = self.run_task(
            client,
            url,
            agent_id=node["id"],
            type="inference",
            image=image,
            command=["sh", "/workdir/src/inference.sh"],
            config={},
            project_id=project["id"],
            model_id=model_id,
        )
        pid = (final.get("results") or {}).get("project_id")
        if final["state"] != "finished" or not pid:
            return None
        result = client.get_project(pid)
        items = list(project_items(client, pid))
        labelled = sum(
            any(o.get("classTitle") == "prediction" for o in (it.get("ann") or {}).get("objects", [])) for it in items
        )
        say(
            f"predictions: project {pid} '{result['name']}', {labelled} of {len(items)} images with a "
            f"'prediction' label; see them at {url}/projects/{pid}"
        )
        return pid

    def export_app(self, client: UserClient, url: str, node: dict, project: dict) -> str | None:
        """The App: the project as a .tar in team files (the task's output); that file's path."""
        image = ensure_demo_app_image()
        say(f"App image {image} ready (Python's standard library, built locally)")
        final = self.run_task(
            client,
            url,
            agent_id=node["id"],
            type="app",
            image=image,
            command=APP_COMMAND,
            config={},
            project_id=project["id"],
        )
        if final["state"] != "finished":
            return None
        path = f"/exports/{final['id']}/{project['name']}.tar"
        say(
            f"export: {path} in team files, the task's output ({url}/tasks/{final['id']}); "
            f"download it with: python -m client files download {path} ."
        )
        return path

    def run(self) -> int:
        url, admin = self.start_server()
        say(f"server on {url} (data in {self.data}, log: {self.data / 'server.log'})")
        client = UserClient(url, admin)
        say(f"console: {url}/")
        say(f"sign in once with this link (valid 15 minutes): {signin_link(client, url)}")
        say(f"  or with the admin token: cat {self.data / 'admin_token'}")
        node, token = self.ensure_node(client, url)
        self.start_agent(url, token)
        image = ensure_demo_image()
        say(f"task image {image} ready (busybox, built locally)")
        project = self.ensure_project(client)
        base = self.ensure_base_model(client)
        model_id = self.train(client, url, node, project, base, image)
        predictions = self.infer(client, url, node, project, model_id, image) if model_id else None
        exported = self.export_app(client, url, node, project)
        ok = bool(model_id and predictions and exported)
        if self.args.exit_when_done:
            return 0 if ok else 1
        say(f"console: {url}/ (a fresh sign-in link: ./run.sh demo --signin-link --data {self.args.data})")
        say("the server and the agent keep running; Ctrl-C stops both")
        while self.server.poll() is None and self.agent.poll() is None:
            time.sleep(1)
        say("the server or the agent exited; see their logs")
        return 1


def project_items(client: UserClient, project_id: int):
    """Every item of the project with its annotation (`ann`), page by page."""
    cursor = None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.request(
            "GET", endpoints.path(endpoints.PROJECT_ITEMS, project_id=project_id), params=params
        ).json()
        yield from page["items"]
        cursor = page.get("next")
        if not cursor:
            return


def _agent_token_works(url: str, token: str) -> bool:
    """Whether the server still takes this agent token (it answers 401 to a wrong or rotated one)."""
    r = requests.head(
        url + endpoints.path(endpoints.AGENT_BLOB, sha256="0" * 64),
        headers={endpoints.AGENT_TOKEN_HEADER: token},
        timeout=10,
    )
    return r.status_code != 401


def signin_link(client: UserClient, url: str) -> str:
    """A one-time console sign-in link (POST /api/v1/session/links with the admin token)."""
    return url + client.request("POST", endpoints.SESSION_LINKS).json()["path"]


def print_signin_link(data: Path) -> int:
    """For a running demo: a fresh one-time link from the URL and admin token in its data dir."""
    try:
        url = (data / "url").read_text().strip()
        client = UserClient(url, (data / "admin_token").read_text().strip())
        print(signin_link(client, url))
    except (OSError, requests.RequestException) as e:
        print(f"demo: no demo answers from {data} ({e}); start one with ./run.sh demo", file=sys.stderr)
        return 1
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="demo-data", help="folder for the server, the agent and samples")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8700, help="server port (a free one if it is taken)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--exit-when-done", action="store_true", help="stop everything when the App ends")
    ap.add_argument("--signin-link", action="store_true", help="print a fresh one-time sign-in link for a running demo")
    args = ap.parse_args(argv)
    if args.signin_link:
        return print_signin_link(Path(args.data).resolve())
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C so the agent and the server are stopped too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = Demo(args)
    code = 0
    try:
        code = demo.run()
    except KeyboardInterrupt:
        print(flush=True)
        say("stopping: the agent (and its tasks), then the server")
    finally:
        # A second Ctrl-C must not cut the ordered stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop_all()
    if code == 0 and demo.server is not None:
        say("stopped")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
