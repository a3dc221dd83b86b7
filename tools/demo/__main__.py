"""The whole lifecycle on embedded defaults: `./run.sh demo` (python -m tools.demo).

Starts the reference server on SQLite in ./demo-data, adds a node, starts the agent, uploads a
small project and a model made on the spot, builds a tiny task image locally (no registry),
runs a `train` task while printing its live log and progress, prints the resulting model, and
leaves the server (and agent) running with the console's address, until Ctrl-C.
`--exit-when-done` stops everything once the task ends (exit 0 only if it finished with a model).
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
from tools.images import ensure_demo_train_image

REPO = Path(__file__).resolve().parents[2]


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def _token() -> str:
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))


def make_sample_data(root: Path, images: int = 12) -> tuple[Path, Path]:
    """A project of tiny PPM images in two datasets, and a model folder, made on the spot."""
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


def _bar(current: float, total: float, width: int = 30) -> str:
    frac = 0.0 if not total else max(0.0, min(1.0, current / total))
    done = int(frac * width)
    return f"[{'#' * done}{'.' * (width - done)}] {current:g}/{total:g}"


class Demo:
    def __init__(self, args):
        self.args = args
        self.data = Path(args.data).resolve()
        self.procs: list[subprocess.Popen] = []

    def start_server(self) -> tuple[str, str]:
        self.data.mkdir(parents=True, exist_ok=True)
        token_file = self.data / "admin_token"
        if not token_file.exists():
            token_file.write_text(_token())
            token_file.chmod(0o600)
        admin = token_file.read_text().strip()
        port = _free_port(self.args.port)
        url = f"http://127.0.0.1:{port}"
        log = open(self.data / "server.log", "ab")
        env = dict(os.environ, SERVER_ADMIN_TOKEN=admin, PYTHONUNBUFFERED="1")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "server", "--host", self.args.host, "--port", str(port),
             "--data", str(self.data / "server")], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/healthz", timeout=1).ok:
                    return url, admin
            except requests.RequestException:
                pass
            if self.procs[-1].poll() is not None:
                break
            time.sleep(0.1)
        raise SystemExit(f"demo: the server did not start; see {self.data / 'server.log'}")

    def start_agent(self, url: str, token: str) -> None:
        env = dict(os.environ, SERVER_ADDRESS=url, ACCESS_TOKEN=token, PYTHONUNBUFFERED="1",
                   AGENT_HOST_DIR=str(self.data / "agent"), TELEMETRY_INTERVAL="2",
                   MIN_FREE_DISK_MB=os.environ.get("MIN_FREE_DISK_MB", "256"))
        log = open(self.data / "agent.log", "ab")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "agent"], cwd=REPO, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    def run(self) -> int:
        say = lambda *a: print("demo:", *a, flush=True)  # noqa: E731
        url, admin = self.start_server()
        say(f"server on {url} (data in {self.data})")
        client = UserClient(url, admin)
        agent = client.create_agent("demo-node")
        say(f"added node {agent['name']} (id {agent['id']}); starting the agent")
        self.start_agent(url, agent["token"])
        image = ensure_demo_train_image()
        say(f"built task image {image} locally")
        project_dir, model_dir = make_sample_data(self.data / "samples")
        project = client.upload_project_dir(project_dir, name="demo-project")
        model = client.upload_model_dir(model_dir, name="demo-base-model")
        say(f"uploaded project {project['id']} and model {model['id']}")
        task = client.create_task(agent_id=agent["id"], type="train", image=image,
                                  config={"epochs": self.args.epochs, "epoch_seconds": 0.5},
                                  project_id=project["id"], model_id=model["id"], timeout_s=600)
        say(f"task {task['id']} created; its live log:")
        for line in client.iter_logs(task["id"], follow=True):
            ev = line.get("event_type")
            if ev == "progress":
                print(f"  progress {_bar(line.get('current', 0), line.get('total', 0))}", flush=True)
            else:
                print(f"  [{line.get('stream', '?'):6}] {line.get('message', '')}", flush=True)
        final = client.wait_task(task["id"], states=("finished", "failed", "stopped", "lost"), timeout=120)
        say(f"task {task['id']} ended {final['state']}" + (f": {final.get('error')}" if final.get("error") else ""))
        model_id = (final.get("results") or {}).get("model_id")
        if model_id:
            new_model = client.get_model(model_id)
            say(f"new model {new_model['id']} '{new_model['name']}':")
            for f in new_model.get("files", []):
                print(f"  {f['path']:24} {f['size']:>8} bytes  sha256 {f['sha256'][:16]}...")
        ok = final["state"] == "finished" and bool(model_id)
        if self.args.exit_when_done:
            return 0 if ok else 1
        say(f"console: {url}/  (sign in with the admin token in {self.data / 'admin_token'})")
        say("the server and the agent keep running; Ctrl-C stops both")
        try:
            while all(p.poll() is None for p in self.procs):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        return 0 if ok else 1


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./run.sh demo", description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="demo-data", help="folder for the server, the agent and samples")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8700, help="server port (the next free one if taken)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--exit-when-done", action="store_true", help="stop everything when the task ends")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C so the agent and server are stopped too.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = Demo(args)
    try:
        return demo.run()
    except KeyboardInterrupt:
        return 130
    finally:
        demo.stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
