"""A task's results cost the agent and the server a bounded amount, whatever the task writes:
live artifacts are posted in batches, a task's result files and bytes read are capped, sparse
files and unchanged checkpoints are not read, the results watch holds a capped number of inotify
watches, and the uploader keeps a few bytes per file. Unit tests with a recording API, and real
containers with the real server (docker)."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

import psutil
import pytest

from node.config import Config
from protocol.errors import APIError
from tests.support.procs import poll_for
from workers import custom, results_dir, train
from workers.checkpoints import CheckpointUploader
from workers.results import upload_artifacts
from workers.results_watch import WATCH_DIRS, ResultsWatch
from workers.uploads import Budget, ResultsLimit


def inotify_watches(pid: int | str = "self") -> int:
    """inotify watches held by a process: the `inotify wd:` lines of its inotify fds' fdinfo."""
    n = 0
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            n += sum(
                1
                for ln in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                if ln.startswith("inotify wd:")
            )
        except OSError:
            continue
    return n


def artifacts(user, task_id: int) -> list[dict]:
    if hasattr(user, "task_artifacts"):
        return list(user.task_artifacts(task_id))
    return user.get_task(task_id)["results"]["artifacts"]


# --- unit: a recording API, no server ------------------------------------------------------


def posted(api) -> set[str]:
    return {e["path"] for p in api.posts for e in p}


class RecordingAPI:
    def __init__(self, refuse: APIError | None = None):
        self.posts: list[list[dict]] = []
        self.refuse = refuse

    def blob_exists(self, sha):
        return True

    def check_blobs(self, hashes):
        return set()  # the server has every blob

    def post_results(self, task_id, kind, name, files, **extra):
        if self.refuse is not None:
            raise self.refuse
        self.posts.append(files)
        return {"results": {}}


class Ctx:
    def __init__(self, root: Path, api, **config):
        self.task = {"id": 7, "type": "custom"}
        self.config = Config(
            server_address="http://x", access_token="t" * 32, host_dir=str(root), agent_dir=str(root), **config
        )
        self.api = api
        self.lines: list[str] = []

    task_id = 7

    @property
    def task_dir(self) -> Path:
        return self.config.task_dir(7)

    def log(self, message, level="info", **extra):
        self.lines.append(message)


@pytest.fixture
def unit(tmp_path):
    def make(api=None, **config):
        ctx = Ctx(tmp_path / f"agent{len(list(tmp_path.iterdir()))}", api or RecordingAPI(), **config)
        (ctx.task_dir / "results").mkdir(parents=True)
        return ctx

    return make


def write_files(root: Path, n: int, per_dir: int = 100) -> None:
    # Plain strings: pathlib interns every name it parses, which would count in the memory test.
    for i in range(n):
        d = f"{root}/d{i // per_dir}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/f{i}.txt", "w") as f:
            f.write(str(i))


def test_the_watch_never_holds_more_than_its_cap(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    watch = ResultsWatch(fd, cap=WATCH_DIRS)
    try:
        most = 0
        for i in range(2000):
            (root / f"d{i}" / "sub").mkdir(parents=True)
            if i % 50 == 0:
                watch.changes()
                most = max(most, inotify_watches())
        watch.changes()
        assert most <= WATCH_DIRS and 0 < most
        assert watch.scanning and watch.why == f"more than {WATCH_DIRS} folders"
        assert inotify_watches() == 0, "falling back released every watch"
    finally:
        watch.close()
        os.close(fd)


@pytest.mark.slow
def test_live_files_are_posted_in_batches_and_fall_back_to_scanning(unit):
    api = RecordingAPI()
    ctx = unit(api)
    live = CheckpointUploader(ctx).start()
    try:
        write_files(ctx.task_dir / "results", 1500, per_dir=1500)
        poll_for(lambda: len(posted(api)) == 1500, timeout=30, what="1500 files posted")
        assert len(api.posts) <= 5, [len(p) for p in api.posts]
        # 3,000 more files in 300 folders: past the cap, results/ is scanned, and all arrive.
        write_files(ctx.task_dir / "results" / "many", 3000, per_dir=10)
        poll_for(lambda: len(posted(api)) == 4500, timeout=30, what="4500 files posted")
        assert inotify_watches() == 0 and live.watch.scanning
        assert any("scanned every" in m for m in ctx.lines), ctx.lines
    finally:
        live.stop()
    assert len(api.posts) <= 12, [len(p) for p in api.posts]
    assert all(len(p) == len({e["path"] for e in p}) for p in api.posts), "a path at most once a post"
    # The final pass reads again only what changed since the live uploads.
    (ctx.task_dir / "results" / "d0" / "f0.txt").write_text("changed")
    upload_artifacts(ctx, "r", live)
    assert [e["path"] for e in api.posts[-1]] == ["d0/f0.txt"]
    assert ctx.lines[-1].startswith("uploaded 1 files") and "4499 unchanged" in ctx.lines[-1], ctx.lines[-1]


@pytest.mark.slow
def test_the_uploader_keeps_a_few_bytes_per_file(unit):
    api = RecordingAPI()
    ctx = unit(api)
    live = CheckpointUploader(ctx).start()
    try:
        write_files(ctx.task_dir / "results", 200, per_dir=200)  # warm up
        poll_for(lambda: len(posted(api)) == 200, timeout=30, what="200 files posted")
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        write_files(ctx.task_dir / "results" / "more", 10000, per_dir=2000)
        poll_for(lambda: len(posted(api)) == 10200, timeout=60, what="10000 files posted")
        api.posts.clear()  # what the recording API holds is not the uploader's
        gc.collect()
        per_file = (tracemalloc.get_traced_memory()[0] - before) / 10000
        tracemalloc.stop()
    finally:
        live.stop()
    assert per_file < 200, f"{per_file:.0f} bytes kept per file"


def test_a_task_past_its_file_or_byte_limit_fails_its_upload(unit):
    ctx = unit(task_results_max_files=50)
    write_files(ctx.task_dir / "results", 60)
    with pytest.raises(ResultsLimit, match=r"more than 50 files \(TASK_RESULTS_MAX_FILES\)"):
        upload_artifacts(ctx, "r")
    ctx = unit(task_results_max_mb=1)
    (ctx.task_dir / "results" / "big").write_bytes(os.urandom(3 << 20))
    with pytest.raises(ResultsLimit, match=r"more than 1 MB read from results/ \(TASK_RESULTS_MAX_MB\)"):
        upload_artifacts(ctx, "r")
    assert not ctx.api.posts


def test_the_servers_results_limit_stops_live_uploads_and_fails_the_task(unit):
    api = RecordingAPI(refuse=APIError(413, "results_limit", "more than 10 artifacts"))
    ctx = unit(api)
    live = CheckpointUploader(ctx).start()
    try:
        write_files(ctx.task_dir / "results", 20)
        poll_for(lambda: live.budget.exceeded, timeout=30, what="the refusal seen")
    finally:
        live.stop()
    assert "results_limit: more than 10 artifacts" in live.budget.exceeded
    assert [m for m in ctx.lines if "nothing more is uploaded" in m] == [ctx.lines[-1]]
    with pytest.raises(ResultsLimit, match="results_limit"):
        upload_artifacts(ctx, "r", live)


def test_a_sparse_file_is_not_read(unit):
    ctx = unit()
    with open(ctx.task_dir / "results" / "big", "wb") as f:
        f.truncate(2 << 30)
    (ctx.task_dir / "results" / "small").write_text("x")
    budget = Budget(ctx.config)
    res = results_dir.ResultsDir(ctx).open()
    try:
        got = [(rel, f.close()) for rel, f in res.admit(res.files(), budget)]
    finally:
        res.close()
    assert [rel for rel, _ in got] == ["small"] and budget.bytes == 0
    assert ctx.lines == [
        f"results: big is sparse ({2 << 30} bytes, 0 on disk); skipped (its holes would be uploaded as bytes)"
    ]


def test_skips_are_logged_a_bounded_number_of_times(unit):
    ctx = unit()
    r = ctx.task_dir / "results"
    for i in range(1000):
        os.symlink("/etc/passwd", r / f"l{i}")
    assert upload_artifacts(ctx, "r") is None
    assert len(ctx.lines) == results_dir.SKIP_LOG_MAX + 2


# --- real containers, the real server ------------------------------------------------------

pytest_docker = pytest.mark.docker


def read_chars() -> int:
    return psutil.Process().io_counters().read_chars


@pytest.mark.slow
@pytest_docker
def test_1500_closed_files_arrive_in_few_posts(node, user, task_image):
    ctx = node.ctx(
        type="custom",
        image=task_image,
        command=[
            "sh",
            "-c",
            """
        cd /sly_task_data/results; i=0
        while [ $i -lt 1500 ]; do echo $i > f$i; i=$((i+1)); done
        sleep 3; echo wrote $i""",
        ],
    )
    posts = []
    post = ctx.api.post_results
    ctx.api.post_results = lambda *a, **kw: (posts.append(a[1]), post(*a, **kw))[1]
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert 2 <= len(posts) <= 20, len(posts)  # was one post per file closed (913 for 1,500)
    assert sorted(a["path"] for a in artifacts(user, ctx.task_id)) == sorted(f"f{i}" for i in range(1500))


@pytest.mark.slow
@pytest_docker
def test_a_checkpoint_announced_again_unchanged_is_not_copied_again(node, user, task_image):
    line = '{"message": "checkpoint", "event_type": "EventType.CHECKPOINT", "subdir": "ck"}'
    ctx = node.ctx(
        type="train",
        image=task_image,
        config={"model_name": "m"},
        command=[
            "sh",
            "-c",
            f"""
        mkdir /sly_task_data/results/ck; head -c 20000000 /dev/urandom > /sly_task_data/results/ck/w.bin
        i=0; while [ $i -lt 12 ]; do echo '{line}'; sleep 0.3; i=$((i+1)); done
        echo more >> /sly_task_data/results/ck/w.bin; echo '{line}'""",
        ],
    )
    before = read_chars()
    outcome = train.run(ctx)
    read = read_chars() - before
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    said = ctx.messages("agent")
    assert len([m for m in said if m.startswith("model 'm checkpoint ck' from results/ck")]) == 2, said
    assert len([m for m in said if m.startswith("results: checkpoint ck is unchanged")]) == 11, said
    # Two copies of 20 MB, each hashed and sent once more from the cache (120 MB); 12 announcements
    # read over 500 MB before.
    assert read < 200_000_000, read
    final = user.get_model(user.get_task(ctx.task_id)["results"]["model_id"])
    assert [f["size"] for f in final["files"]] == [20_000_005]


@pytest_docker
def test_limits_and_sparse_files_in_a_real_task(node, user, task_image):
    ctx = node.ctx(
        cfg=node.config(task_results_max_files=100),
        type="custom",
        image=task_image,
        command=[
            "sh",
            "-c",
            "cd /sly_task_data/results; truncate -s 2G a-sparse; i=0; "
            "while [ $i -lt 300 ]; do echo $i > f$i; i=$((i+1)); done",
        ],
    )
    before = read_chars()
    outcome = custom.run(ctx)
    assert read_chars() - before < 50_000_000, "the sparse file was read"
    assert outcome.state == "failed", outcome
    assert outcome.error == "results: more than 100 files (TASK_RESULTS_MAX_FILES); upload refused"
    said = ctx.messages("agent")
    assert any(m.startswith(f"results: a-sparse is sparse ({2 << 30} bytes") for m in said), said
    assert all(a["path"] != "a-sparse" for a in artifacts(user, ctx.task_id))


def test_names_the_server_refuses_are_skipped_not_posted(tmp_path):
    """A file whose name holds a control character, a backslash or non-UTF-8 bytes is skipped with
    a reason (the server refuses such names, which would fail the whole result); the rest is read."""
    from workers import safefs

    root = tmp_path / "results"
    (root / "dir\x07").mkdir(parents=True)
    (root / "dir\x07" / "inside.txt").write_text("x")
    for name in ("ok.txt", "a\nb.txt", "c\x1b[2Jd.txt", "back\\slash.txt", "\x85next.txt"):
        (root / name).write_text("x")
    os.mkdir(os.fsencode(root) + b"/raw")
    open(os.fsencode(root) + b"/raw/\xff.txt", "w").close()
    skipped = []
    fd = safefs.open_dir(root)
    try:
        got = []
        for rel, f in safefs.walk_files(fd, lambda rel, why: skipped.append((rel, why))):
            f.close()
            got.append(rel)
        with pytest.raises(safefs.Skipped, match="control character"):
            safefs.open_rel_file(fd, "a\nb.txt")
    finally:
        os.close(fd)
    assert got == ["ok.txt"]
    reasons = dict(skipped)
    assert set(reasons) == {
        "dir\x07",
        "a\nb.txt",
        "c\x1b[2Jd.txt",
        "back\\slash.txt",
        "\x85next.txt",
        "raw/" + os.fsdecode(b"\xff.txt"),
    }
    assert reasons["back\\slash.txt"] == "has a backslash in its name"
    assert reasons["raw/" + os.fsdecode(b"\xff.txt")] == "has a name that is not UTF-8"
