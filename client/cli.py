"""Command-line client of the server's user API: `sly [--server URL] [--token T] ...`.

Also runs as `python -m client`.

    nodes add NAME [--types train,custom]      create a node; prints its token (once) and run commands
    nodes list | nodes edit ID [--name N] [--types T,...] | nodes rotate ID | nodes delete ID
    projects upload DIR [--name N] [--parallel N] | projects download ID DIR [--force] [--parallel N]
    models upload DIR [--name N] [--parallel N] | models download ID DIR [--force] [--parallel N]
    projects list | models list
    tasks submit --node ID --type T [--image I --project ID --dataset ID --model ID --config JSON --gpus N --timeout S]
                 [--retry N [--retry-nodes ID,...]]   a lost task continues from its last checkpoint
    tasks list [--node ID] [--state S] | tasks logs ID [--follow] | tasks stop ID
    files list [REMOTE_DIR] [--recursive] | files download REMOTE_PATH LOCAL_PATH [--force] [--parallel N]

The server and admin token come from --server/--token or SLY_SERVER/SLY_ADMIN_TOKEN. Progress bars
(files and bytes) go to stderr when it is a terminal (or with --progress), results to stdout (`--json` prints the
server's answers as JSON). It speaks only the user API, through client.UserClient.

`projects upload` sends a Supervisely project folder (meta.json at its top, <ds>/img/, <ds>/ann/)
with its meta and annotations; any other folder is plain (each sub-folder a dataset, top files:
ds0). `projects download` writes a Supervisely project folder the SDK opens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

from client import download, sly_format, upload
from client.api import UserClient
from client.term import safe
from client.transfer import MAX_PARALLEL, PARALLEL, Counts
from protocol.errors import APIError
from protocol.tasks import TASK_TYPES

DEFAULT_SERVER = "http://127.0.0.1:8700"
PARALLEL_HELP = f"bulk requests in flight at once, 1..{MAX_PARALLEL} (default %(default)s)"


class TextBar:
    """A one-line text progress bar on stderr, in files and bytes, redrawn at most every 0.1 s (and
    whenever a stage starts or ends). Call it as a transfer's progress callback: bar(counts).

        project roads sending [############..................]  41% 8,200/20,000 files, 1.2 MiB/2.9 MiB
    """

    def __init__(self, label: str, stream=sys.stderr, width: int = 30):
        self.label, self.stream, self.width = label, stream, width
        self._drawn, self._stage, self._len = 0.0, "", 0

    def __call__(self, counts: Counts) -> None:
        now = time.monotonic()
        if now - self._drawn >= 0.1 or counts.stage != self._stage or counts.fraction() >= 1.0:
            self._drawn, self._stage = now, counts.stage
            self.draw(counts)

    def draw(self, c: Counts) -> None:
        frac = c.fraction()
        fill = int(frac * self.width)
        size = human(c.nbytes) + (f"/{human(c.bytes_total)}" if c.bytes_total is not None else "")
        line = (
            f"{self.label} {c.stage} [{'#' * fill}{'.' * (self.width - fill)}] {frac:4.0%} "
            f"{c.files:,}/{c.files_total:,} files, {size} {safe(c.note)[:40]}"
        )
        self.stream.write("\r" + line.ljust(self._len))  # blanks what a longer line left
        self._len = len(line)
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def parallel_arg(s: str) -> int:
    n = int(s)
    if not 1 <= n <= MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"--parallel must be 1..{MAX_PARALLEL}")
    return n


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def types_arg(s: str) -> list[str]:
    types = [t.strip() for t in s.split(",") if t.strip()]
    bad = [t for t in types if t not in TASK_TYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task type(s) {', '.join(bad)}; known: {', '.join(TASK_TYPES)}")
    return types


def id_list(s: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] (node ids)."""
    try:
        ids = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of node ids") from None
    if not ids:
        raise argparse.ArgumentTypeError("no node id given")
    return ids


def table(rows: list[list], header: list[str]) -> str:
    rows = [[safe(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def pct(x) -> str:
    if isinstance(x, (int, float)):
        return f"{x:.0f}%"
    if isinstance(x, dict):
        for k in ("percent", "usage_percent"):
            if isinstance(x.get(k), (int, float)):
                return f"{x[k]:.0f}%"
        if x.get("total"):
            return f"{100 * x.get('used', 0) / x['total']:.0f}%"
    return "-"


def fmt_ts(ts) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else str(ts or "")


# --- commands: each takes (client, args) and returns an exit status ---


def show_token(answer: dict) -> None:
    print(f"node {answer['id']} {safe(answer.get('name'))}")
    print(f"token: {answer['token']}   (shown only now)")
    rc = answer.get("run_command")
    for label, cmd in rc.items() if isinstance(rc, dict) else [("run", rc)] if rc else []:
        print(f"\n# {label}\n{cmd}")


def nodes_add(c: UserClient, a) -> int:
    answer = c.create_agent(a.name, a.types, gpus=a.gpus)
    print(json.dumps(answer)) if a.json else show_token(answer)
    return 0


def nodes_list(c: UserClient, a) -> int:
    agents = c.list_agents()
    if a.json:
        print(json.dumps(agents))
        return 0
    rows = []
    for x in agents:
        t = x.get("telemetry") or {}
        running = x.get("running_tasks")
        rows.append(
            [
                x["id"],
                x["name"],
                x.get("status", "?"),
                fmt_ts(x.get("last_seen")) or "never",
                len(running) if isinstance(running, list) else (running or 0),
                pct(t.get("cpu")),
                pct(t.get("memory")),
                ",".join(x.get("allowed_task_types") or []),
            ]
        )
    print(table(rows, ["ID", "NAME", "STATUS", "LAST SEEN", "RUNNING", "CPU", "MEM", "TYPES"]))
    return 0


def nodes_edit(c: UserClient, a) -> int:
    if a.name is None and a.types is None:
        raise SystemExit("error: nothing to change (give --name and/or --types)")
    x = c.patch_agent(a.id, name=a.name, allowed_task_types=a.types)
    print(
        json.dumps(x)
        if a.json
        else f"node {x['id']} {safe(x['name'])}: {safe(','.join(x.get('allowed_task_types') or []))}"
    )
    return 0


def nodes_rotate(c: UserClient, a) -> int:
    answer = c.rotate_token(a.id, gpus=a.gpus)
    print(json.dumps(answer)) if a.json else show_token(answer)
    return 0


def nodes_delete(c: UserClient, a) -> int:
    answer = c.delete_agent(a.id)
    if a.json:
        print(json.dumps(answer))
        return 0
    failed = answer.get("failed_tasks") or []
    print(
        f"deleted node {a.id}"
        + (f"; tasks failed with 'node deleted': {', '.join(map(str, failed))}" if failed else "")
        + (f"; {answer['kept_tasks']} final tasks kept" if answer.get("kept_tasks") else "")
    )
    return 0


def upload_dir(c: UserClient, a, kind: str) -> int:
    root = Path(a.dir).resolve()
    name = a.name or root.name
    bar = TextBar(f"{kind} {name}") if a.progress else None
    try:
        if kind == "project":
            x = upload.upload_project(c, root, name, bar, a.parallel)
        else:
            x = upload.upload_model(c, root, name, bar, a.parallel)
    finally:
        if bar:
            bar.close()
    print(json.dumps(x) if a.json else f"{kind} {x['id']} {safe(x.get('name'))}: {_count(x, kind)} files")
    return 0


def _count(x: dict, kind: str) -> int:
    if kind == "project":
        return sum(int(d.get("items_count") or 0) for d in x.get("datasets") or [])
    return len(x.get("files") or [])


def download_dir(c: UserClient, a, kind: str) -> int:
    bar = TextBar(f"{kind} {a.id}") if a.progress else None
    try:
        if kind == "project":
            x = download.download_project(c, a.id, Path(a.dir), a.force, bar, a.parallel)
        else:
            x = download.download_model(c, a.id, Path(a.dir), a.force, bar, a.parallel)
    finally:
        if bar:
            bar.close()
    print(
        json.dumps(x)
        if a.json
        else f"{kind} {x['id']} {safe(x.get('name'))}: {_count(x, kind)} files -> {safe(x['dir'])}"
    )
    return 0


def collection_list(c: UserClient, a, kind: str) -> int:
    items = c.list_projects() if kind == "project" else c.list_models()
    if a.json:
        print(json.dumps(items))
        return 0
    if kind == "project":
        rows = [
            [
                x["id"],
                x["name"],
                len(x.get("datasets") or []),
                sum(d.get("items_count", len(d.get("items") or [])) for d in x.get("datasets") or []),
            ]
            for x in items
        ]
        print(table(rows, ["ID", "NAME", "DATASETS", "ITEMS"]))
    else:
        rows = [
            [
                x["id"],
                x["name"],
                x.get("files_count", len(x.get("files") or [])),
                human(x.get("size") or 0),
                (x.get("hash") or "")[:12],
            ]
            for x in items
        ]
        print(table(rows, ["ID", "NAME", "FILES", "SIZE", "HASH"]))
    return 0


def tasks_submit(c: UserClient, a) -> int:
    try:
        config = json.loads(a.config) if a.config else None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --config is not JSON: {e}") from None
    resources = {
        k: v
        for k, v in {"gpus": a.gpus, "cpus": a.cpus, "memory": a.memory, "shm_size": a.shm_size}.items()
        if v is not None
    } or None
    if a.retry_nodes and a.retry is None:
        raise SystemExit("error: --retry-nodes needs --retry N")
    retry = None if a.retry is None else {"max": a.retry, **({"agent_ids": a.retry_nodes} if a.retry_nodes else {})}
    t = c.create_task(
        a.node,
        a.type,
        a.image,
        command=a.command,
        config=config,
        project_id=a.project,
        dataset_id=a.dataset,
        model_id=a.model,
        resources=resources,
        timeout_s=a.timeout,
        retry=retry,
    )
    print(json.dumps(t) if a.json else f"task {t['id']} {safe(t['state'])}")
    waiting = t.get("waiting") or {}
    if not a.json and waiting.get("reason") not in (None, "waiting_for_poll"):
        print(f"waits: {safe(waiting.get('detail'))}")
    return 0


def tasks_list(c: UserClient, a) -> int:
    tasks = c.list_tasks(agent_id=a.node, state=a.state)
    if a.json:
        print(json.dumps(tasks))
        return 0
    rows = []
    for t in tasks:
        p = t.get("progress") or {}
        rows.append(
            [
                t["id"],
                t["state"],
                t["agent_id"],
                t["type"],
                t.get("image") or "",
                f"{p.get('current')}/{p.get('total')}" if p.get("total") else "",
            ]
        )
    print(table(rows, ["ID", "STATE", "NODE", "TYPE", "IMAGE", "PROGRESS"]))
    return 0


def tasks_logs(c: UserClient, a) -> int:
    """Print a task's log; with --follow, live until it ends, and on through its continuations:
    a task that ends `lost` with `continued_by` goes on as that task (docs/resume.md)."""
    task_id = a.id
    while True:
        _print_log(c, task_id, a)
        if not a.follow:
            return 0
        t = c.get_task(task_id)
        if t["state"] == "lost" and t.get("continued_by") is not None:
            task_id = t["continued_by"]
            print(safe(_continued(t, c.get_task(task_id))), file=sys.stderr, flush=True)
            continue
        extra = f" exit_code={t['exit_code']}" if t.get("exit_code") is not None else ""
        print(
            safe(f"task {task_id} {t['state']}{extra}" + (f": {t['error']}" if t.get("error") else "")), file=sys.stderr
        )
        return 0 if t["state"] == "finished" else 1


def _print_log(c: UserClient, task_id: int, a) -> None:
    for line in c.iter_logs(task_id, follow=a.follow):
        if a.json:
            print(json.dumps(line), flush=True)
            continue
        stream = line.get("stream", "stdout")
        level = line.get("level", "info")
        tag = ("" if stream == "stdout" else f"[{stream}] ") + ("" if level == "info" else f"{level.upper()}: ")
        print(safe(f"{fmt_ts(line.get('ts'))} {tag}{line.get('message', '')}"), flush=True)


def _continued(lost: dict, cont: dict) -> str:
    """'task 7 lost; continued as task 8 on node 2 from checkpoint epoch 3'."""
    resume = (cont.get("config") or {}).get("resume") or {}
    if resume.get("epoch") is not None:
        where = f"checkpoint epoch {resume['epoch']}"
    elif (cont.get("config") or {}).get("weights_init_type") == "continue_training":
        where = f"checkpoint model {cont.get('model_id')}"
    else:
        where = "the start"
    return f"task {lost['id']} lost; continued as task {cont['id']} on node {cont['agent_id']} from {where}"


def tasks_stop(c: UserClient, a) -> int:
    t = c.stop_task(a.id)
    print(json.dumps(t) if a.json else f"task {a.id}: stop requested ({safe(t.get('state'))})")
    return 0


def tasks_delete(c: UserClient, a) -> int:
    answer = c.delete_task(a.id)
    if a.json:
        print(json.dumps(answer))
        return 0
    d, kept = answer.get("deleted", {}), answer.get("kept", {})
    print(f"deleted task {a.id} ({d.get('log_lines', 0)} log lines, {d.get('metrics', 0)} metrics points)")
    for kind in ("models", "projects"):
        if kept.get(kind):
            print(f"kept {kind}: {', '.join(str(i) for i in kept[kind])}")
    return 0


def files_list(c: UserClient, a) -> int:
    """The team files in a folder (files and sub-folders), or every file under it with --recursive."""
    items = c.list_files(a.remote, recursive=a.recursive)
    if a.json:
        print(json.dumps(items))
        return 0
    rows = [
        [
            human(x["size"]) if x["type"] == "file" else "-",
            fmt_date(x.get("updated_at")),
            x.get("task_id") or "",
            x["path"] if a.recursive else x["name"] + ("/" if x["type"] == "folder" else ""),
        ]
        for x in items
    ]
    print(table(rows, ["SIZE", "UPDATED", "TASK", "PATH" if a.recursive else "NAME"]))
    return 0


def fmt_date(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if isinstance(ts, (int, float)) else ""


def files_download(c: UserClient, a) -> int:
    """A team file into LOCAL_PATH (into it, named as the file, when it is a folder), or a team
    folder's files into the folder LOCAL_PATH, paths kept; every file verified by its sha256."""
    bar = TextBar(f"files {a.remote}") if a.progress else None
    try:
        x = c.download_file(a.remote, a.local, a.force, bar, a.parallel)
    finally:
        if bar:
            bar.close()
    print(json.dumps(x) if a.json else f"{x['files']} files, {human(x['bytes'])} -> {safe(x['dest'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sly", description="Client of the sly-agent server's user API.")
    p.add_argument(
        "--server",
        default=os.environ.get("SLY_SERVER", DEFAULT_SERVER),
        help="server URL (env SLY_SERVER; default %(default)s)",
    )
    p.add_argument(
        "--token", default=None, help="admin token (env SLY_ADMIN_TOKEN; prefer the env: argv is visible in ps)"
    )
    p.add_argument("--json", action="store_true", help="print the server's answers as JSON")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show upload and download progress bars on stderr (default: when stderr is a terminal)",
    )
    top = p.add_subparsers(dest="group", required=True)

    nodes = top.add_parser("nodes", help="agents (nodes)").add_subparsers(dest="cmd", required=True)
    x = nodes.add_parser("add", help="create a node; prints its token once and the run commands")
    x.add_argument("name")
    x.add_argument("--types", type=types_arg, default=None, help="allowed task types, comma-separated (default: all)")
    x.add_argument("--gpus", action="store_true", help="the node has GPUs: its docker run command gets --gpus all")
    x.set_defaults(func=nodes_add)
    nodes.add_parser("list", help="list nodes").set_defaults(func=nodes_list)
    x = nodes.add_parser("edit", help="rename a node or change its allowed task types")
    x.add_argument("id", type=int)
    x.add_argument("--name")
    x.add_argument("--types", type=types_arg, help="allowed task types, comma-separated ('' for none)")
    x.set_defaults(func=nodes_edit)
    x = nodes.add_parser("rotate", help="give a node a new token (the old one stops working)")
    x.add_argument("id", type=int)
    x.add_argument(
        "--gpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the docker run command with (--gpus) or without (--no-gpus) --gpus all (default: as the node reported)",
    )
    x.set_defaults(func=nodes_rotate)
    x = nodes.add_parser("delete", help="remove a node")
    x.add_argument("id", type=int)
    x.set_defaults(func=nodes_delete)

    for kind in ("project", "model"):
        g = top.add_parser(kind + "s", help=kind + "s").add_subparsers(dest="cmd", required=True)
        x = g.add_parser("upload", help=f"upload a folder as a {kind}")
        x.add_argument("dir")
        x.add_argument("--name", help="(default: the folder's name)")
        x.add_argument("--parallel", type=parallel_arg, default=PARALLEL, help=PARALLEL_HELP)
        x.set_defaults(func=lambda c, a, k=kind: upload_dir(c, a, k))
        x = g.add_parser(
            "download",
            help=f"download a {kind} into a folder" + (" as a Supervisely project" if kind == "project" else ""),
        )
        x.add_argument("id", type=int)
        x.add_argument("dir")
        x.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
        x.add_argument("--parallel", type=parallel_arg, default=PARALLEL, help=PARALLEL_HELP)
        x.set_defaults(func=lambda c, a, k=kind: download_dir(c, a, k))
        g.add_parser("list", help=f"list {kind}s").set_defaults(func=lambda c, a, k=kind: collection_list(c, a, k))

    tasks = top.add_parser("tasks", help="tasks").add_subparsers(dest="cmd", required=True)
    x = tasks.add_parser("submit", help="start a task on a node")
    x.add_argument("--node", type=int, required=True, help="node (agent) id")
    x.add_argument("--type", required=True, choices=TASK_TYPES)
    x.add_argument("--image", help="docker image (not needed for cleanup)")
    x.add_argument("--command", help="command, split as a shell would (default: the image's own)")
    x.add_argument("--project", type=int, help="input project id")
    x.add_argument("--dataset", type=int, help="an app's dataset id (its DATASET_ID; the project is the dataset's)")
    x.add_argument("--model", type=int, help="input model id")
    x.add_argument("--config", help="task config as JSON (an app: its modal state, MODAL_STATE)")
    x.add_argument("--gpus", type=int)
    x.add_argument("--cpus", type=float)
    x.add_argument("--memory", help="memory limit, e.g. 2g")
    x.add_argument("--shm-size", dest="shm_size", help="shared memory, e.g. 1g")
    x.add_argument("--timeout", type=float, help="seconds")
    x.add_argument(
        "--retry",
        type=int,
        metavar="N",
        help="when the node is lost (silent past the lease), continue the task from its last checkpoint, "
        "at most N times in its chain",
    )
    x.add_argument(
        "--retry-nodes",
        type=id_list,
        metavar="ID,...",
        help="nodes that may take it over, in order of preference (default: its own node)",
    )
    x.set_defaults(func=tasks_submit)
    x = tasks.add_parser("list", help="list tasks")
    x.add_argument("--node", type=int)
    x.add_argument("--state")
    x.set_defaults(func=tasks_list)
    x = tasks.add_parser(
        "logs", help="print a task's log; --follow streams it until the task ends, on through its continuations"
    )
    x.add_argument("id", type=int)
    x.add_argument("--follow", "-f", action="store_true")
    x.set_defaults(func=tasks_logs)
    x = tasks.add_parser("stop", help="stop a task")
    x.add_argument("id", type=int)
    x.set_defaults(func=tasks_stop)
    x = tasks.add_parser(
        "delete",
        help="delete a finished, failed, stopped or lost task and its log (the models and projects it made are kept)",
    )
    x.add_argument("id", type=int)
    x.set_defaults(func=tasks_delete)

    files = top.add_parser("files", help="team files (what Apps write)").add_subparsers(dest="cmd", required=True)
    x = files.add_parser("list", help="list a team-files folder")
    x.add_argument("remote", nargs="?", default="/", metavar="REMOTE_DIR", help="(default: /)")
    x.add_argument("--recursive", "-r", action="store_true", help="every file under the folder")
    x.set_defaults(func=files_list)
    x = files.add_parser("download", help="download a team file, or a folder with everything under it")
    x.add_argument("remote", metavar="REMOTE_PATH")
    x.add_argument("local", metavar="LOCAL_PATH")
    x.add_argument("--force", action="store_true", help="write a folder into LOCAL_PATH even if it is not empty")
    x.add_argument("--parallel", type=parallel_arg, default=PARALLEL, help=PARALLEL_HELP)
    x.set_defaults(func=files_download)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    token = args.token or os.environ.get("SLY_ADMIN_TOKEN")
    if not token:
        print("error: no admin token (give --token or set SLY_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    client = UserClient(args.server, token)
    try:
        return args.func(client, args)
    except APIError as e:
        print(safe(f"error: {e.status} {e.code}: {e.detail}"), file=sys.stderr)
        return 1
    except (upload.NotAFolder, upload.UploadError, sly_format.BadProject, download.DownloadError) as e:
        print(safe(f"error: {e}"), file=sys.stderr)
        return 1
    except requests.ConnectionError:
        print(f"error: no answer from {args.server}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
