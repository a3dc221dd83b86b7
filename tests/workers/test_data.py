"""Downloads into the cache, the task dir's layout, results uploads, disk limits, cleanup:
handlers against the real server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import stat
import zlib

import pytest

from protocol import endpoints, sly_format
from tests.support.server import dataset_counts
from tools.sample_project import png_bytes
from workers import cache, cleanup, custom, inference, train
from workers.downloads import Downloader, Job, plan
from workers.errors import TaskError

pytestmark = pytest.mark.docker


def png(width: int, height: int, tag: str) -> bytes:
    """A real PNG of that size whose pixels depend on `tag` (so each test's blobs are new)."""
    seed = zlib.crc32(tag.encode())
    return png_bytes(width, height, [bytes((seed + x + y) % 256 for x in range(width * 3)) for y in range(height)], 2)


def make_project(user, name, files: dict[str, dict[str, bytes]]) -> dict:
    datasets = [
        {"name": ds, "items": [{"name": n, "sha256": user.upload_bytes(b), "size": len(b)} for n, b in items.items()]}
        for ds, items in files.items()
    ]
    made = user.create_project(name, datasets)
    assert dataset_counts(made["datasets"]) == [{"name": d["name"], "items_count": len(d["items"])} for d in datasets]
    return dict(made, datasets=datasets)  # with the posted items: the answer carries their counts only


def inline_items(ctx, project: dict) -> None:
    """Put the project's items into the poll answer, as an older server sent them (the agent takes
    inline items as given): a test then changes one as a server could."""
    ctx.task["project"]["datasets"] = [
        {"name": d["name"], "items": [dict(i) for i in d["items"]]} for d in project["datasets"]
    ]


def make_model(user, name, files: dict[str, bytes]) -> dict:
    return user.create_model(
        name, [{"path": p, "sha256": user.upload_bytes(b), "size": len(b)} for p, b in files.items()]
    )


@pytest.fixture
def project(user):
    tag = secrets.token_hex(4)
    return make_project(
        user,
        f"p-{tag}",
        {"ds1": {f"img{i}.png": png(10 + i, 20 + i, tag) for i in range(5)}, "ds2": {"a.png": png(7, 3, tag + "a")}},
    )


def test_task_dir_is_the_real_agents(node, user, project, task_image):
    """task_config.json = task_settings.json = the config; data/<project>/ a Supervisely project
    (meta.json, <ds>/img hard-linked read-only from the cache, <ds>/ann); model/ at its root."""
    model = make_model(user, f"m-{project['name']}", {"cfg/model.json": b'{"arch": "tiny"}', "w.bin": b"\x00" * 1000})
    config = {"model_name": "trained", "lr": 0.5, "nested": {"a": [1, 2]}}
    ctx = node.ctx(
        type="train",
        image=task_image,
        command="train.sh",
        project_id=project["id"],
        model_id=model["id"],
        config=config,
    )
    ann = {
        "description": "",
        "size": {"height": 20, "width": 10},
        "tags": [{"name": "weather", "value": "sunny"}],
        "objects": [],
        "customBigData": {},
    }
    inline_items(ctx, project)
    ctx.task["project"]["datasets"][0]["items"][0]["ann"] = ann  # as the server sends a stored one
    ctx.task["project"]["meta"] = {
        "classes": [],
        "tags": [{"name": "weather", "value_type": "any_string", "color": "#F9A825"}],
    }
    assert train.run(ctx).state == "finished", ctx.messages()[-10:]
    tdir = ctx.task_dir
    for name in ("task_config.json", "task_settings.json"):
        assert json.loads((tdir / name).read_text()) == config
    agent = json.loads((tdir / "agent.json").read_text())
    assert agent["task_id"] == ctx.task_id and agent["type"] == "train" and agent["model"]["hash"] == model["hash"]
    assert sorted(p.name for p in (tdir / "data").iterdir()) == [project["name"]]
    pdir = tdir / "data" / project["name"]
    assert json.loads((pdir / "meta.json").read_text()) == ctx.task["project"]["meta"]
    assert (pdir / "meta.json").read_text() == sly_format.dumps(ctx.task["project"]["meta"])
    assert sorted(p.name for p in pdir.iterdir()) == ["ds1", "ds2", "meta.json"]
    assert sorted(p.name for p in (pdir / "ds1" / "img").iterdir()) == [f"img{i}.png" for i in range(5)]
    assert json.loads((pdir / "ds1" / "ann" / "img0.png.json").read_text()) == ann
    # no annotation from the server: the SDK's empty annotation, with the size read from the image
    assert (pdir / "ds1" / "ann" / "img3.png.json").read_text() == sly_format.dumps(sly_format.empty_ann(23, 13))
    assert json.loads((pdir / "ds2" / "ann" / "a.png.json").read_text())["size"] == {"height": 3, "width": 7}
    item = pdir / "ds2" / "img" / "a.png"
    cached = cache.image_path(node.config(), project["datasets"][1]["items"][0]["sha256"], "a.png")
    assert item.read_bytes() == cached.read_bytes() and item.stat().st_ino == cached.stat().st_ino
    assert stat.S_IMODE(item.stat().st_mode) == 0o444, "a link into the cache is never writable"
    assert (tdir / "model" / "cfg" / "model.json").read_bytes() == b'{"arch": "tiny"}'
    assert stat.S_IMODE((tdir / "model" / "w.bin").stat().st_mode) == 0o444
    assert (cache.model_dir(node.config(), model["hash"]) / "w.bin").stat().st_size == 1000
    assert (tdir / "tmp").is_dir() and (tdir / "results").is_dir()
    assert "found 6 input files" in ctx.messages("stdout")


def test_train_checkpoints_become_models_and_the_last_is_the_tasks(node, user, project, task_image):
    model = make_model(user, f"m2-{project['name']}", {"cfg/model.json": b'{"arch": "tiny"}', "w.bin": b"\x01" * 99})
    ctx = node.ctx(
        type="train",
        image=task_image,
        command="train.sh",
        project_id=project["id"],
        model_id=model["id"],
        config={"model_name": "trained"},
    )
    outcome = train.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert [p for p in ctx.progress_values if p == (3, 3)], "progress events become task progress"
    events = [ln for ln in ctx.container_lines() if ln.get("event_type")]
    assert {e["event_type"] for e in events} == {"progress", "metrics", "checkpoint"}
    done = next(ln for ln in ctx.container_lines() if ln["message"] == "training done")
    assert done["level"] == "warning" and done["accuracy"] == 0.93
    saved = [m for m in ctx.messages("agent") if m.startswith("model 'trained checkpoint ")]
    assert [m.split()[3].rstrip("'") for m in saved] == ["00000000", "00000001", "00000002"], saved
    # each checkpoint is in the node's model cache under its hash, copied (not linked) from results/
    cfg = node.config()
    hashes = []
    for i in range(3):
        files = [
            {"path": p, "sha256": hashlib.sha256(b).hexdigest()}
            for p, b in {
                "weights.bin": f"weights of epoch {i + 1}\n".encode(),
                "w.bin": b"\x01" * 99,
                "cfg/model.json": b'{"arch": "tiny"}',
            }.items()
        ]
        h = cache.manifest_hash(files)
        hashes.append(h)
        entry = cache.model_dir(cfg, h)
        assert (entry / "weights.bin").read_bytes() == f"weights of epoch {i + 1}\n".encode()
        assert cache.verify(cfg, entry / "weights.bin", files[0]["sha256"])
        src = ctx.task_dir / "results" / f"{i:08d}" / "weights.bin"
        assert src.stat().st_ino != (entry / "weights.bin").stat().st_ino
    task = user.get_task(ctx.task_id)
    final = user.get_model(task["results"]["model_id"])
    assert final["hash"] == hashes[-1], "the task's model is the last checkpoint"
    assert {f["path"] for f in final["files"]} == {"weights.bin", "w.bin", "cfg/model.json"}
    assert any(m.startswith("the task's model is its last checkpoint, results/00000002") for m in ctx.messages("agent"))
    # the empty folder the SDK leaves behind (no CHECKPOINT line names it) is not a model
    assert not any("00000003" in m for m in ctx.messages("agent"))


def test_results_model_folder_wins(node, user, project, task_image):
    ctx = node.ctx(
        type="train",
        image=task_image,
        command=["train.sh", "model"],
        project_id=project["id"],
        config={"model_name": "own"},
    )
    assert train.run(ctx).state == "finished", ctx.messages()[-10:]
    m = user.get_model(user.get_task(ctx.task_id)["results"]["model_id"])
    assert m["name"] == "own" and {f["path"] for f in m["files"]} == {"weights.bin"}
    assert (cache.model_dir(ctx.config, m["hash"]) / "weights.bin").exists()


def test_train_without_a_checkpoint_fails(node, project, task_image):
    ctx = node.ctx(
        type="train",
        image=task_image,
        project_id=project["id"],
        command=[
            "sh",
            "-c",
            "mkdir -p /sly_task_data/results/00000000; "
            "echo '{\"message\": \"checkpoint\", \"event_type\": \"EventType.CHECKPOINT\", "
            "\"subdir\": \"00000000\"}'",
        ],
    )
    outcome = train.run(ctx)
    assert outcome.state == "failed" and outcome.error.startswith("train: no checkpoint was produced"), outcome
    assert "results: 00000000 holds no regular file; no model made of it" in ctx.messages("agent")


def test_inference_uploads_project_and_second_task_downloads_nothing(node, user, project, task_image):
    ctx = node.ctx(type="inference", image=task_image, command="infer.sh", project_id=project["id"])
    assert inference.run(ctx).state == "finished", ctx.messages()[-10:]
    agent_lines = ctx.messages("agent")
    assert "data ready: 6 files (0 cached, 6 downloaded" in " ".join(agent_lines)
    assert agent_lines.index("downloading 6/6 files, 0.0 MB") < agent_lines.index(
        "data ready: 6 files (0 cached, 6 downloaded, 0.0 MB)"
    )
    assert (6, 6) in ctx.progress_values  # download progress while preparing
    assert (
        f"uploading project '{project['name']} (task {ctx.task_id})' from results/{project['name']}/: "
        f"6 items, 6 annotations" in agent_lines
    )
    pid = user.get_task(ctx.task_id)["results"]["project_id"]
    out = user._list(endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid))
    assert {ds: sorted(i["name"] for i in out if i["dataset"] == ds) for ds in {i["dataset"] for i in out}} == {
        "ds1": [f"img{i}.png" for i in range(5)],
        "ds2": ["a.png"],
    }
    again = node.ctx(type="inference", image=task_image, command="infer.sh", project_id=project["id"])
    assert inference.run(again).state == "finished"
    assert "data ready: 6 files (6 cached, 0 downloaded, 0.0 MB)" in again.messages("agent")


def test_inference_uploads_a_big_result_project_in_pages(node, user, project, task_image, monkeypatch):
    from workers import results

    monkeypatch.setattr(results, "RESULT_PAGE_ITEMS", 2)  # 6 items: 3 pages
    ctx = node.ctx(type="inference", image=task_image, command="infer.sh", project_id=project["id"])
    assert inference.run(ctx).state == "finished", ctx.messages()[-10:]
    agent_lines = ctx.messages("agent")
    assert f"uploaded project '{project['name']} (task {ctx.task_id})': 6 items in 3 pages" in agent_lines
    pid = user.get_task(ctx.task_id)["results"]["project_id"]
    out = user._list(endpoints.path(endpoints.PROJECT_ITEMS, project_id=pid))
    assert sorted((i["dataset"], i["name"]) for i in out) == [("ds1", f"img{i}.png") for i in range(5)] + [
        ("ds2", "a.png")
    ]
    assert all(i["ann"]["objects"] is not None for i in out)


def test_inference_without_a_project_fails(node, project, task_image):
    ctx = node.ctx(
        type="inference",
        image=task_image,
        project_id=project["id"],
        command=["sh", "-c", "mkdir -p /sly_task_data/results/x; echo hi > /sly_task_data/results/x/f"],
    )
    outcome = inference.run(ctx)
    assert outcome.state == "failed" and outcome.error.startswith("inference: the task wrote no project"), outcome


def test_corrupt_blob_fails_after_retries_and_caches_nothing(node, user, server, task_image):
    tag = secrets.token_hex(4)
    good = make_project(user, f"bad-{tag}", {"ds": {"x.png": f"{tag} bytes".encode()}})
    sha = good["datasets"][0]["items"][0]["sha256"]
    blob = server.data_dir / "blobs" / sha[0:2] / sha[2:5] / sha
    blob.write_bytes(b"evil " + blob.read_bytes()[5:])  # same size, other bytes
    ctx = node.ctx(type="custom", image=task_image, command="env.sh", project_id=good["id"])
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "do not match sha256" in outcome.error, outcome
    assert not cache.image_path(ctx.config, sha, "x.png").exists()
    assert not list(ctx.config.tmp_dir.rglob(f"{sha}*.part"))


def test_unsafe_names_fail_the_task(node, user, project, task_image):
    for bad in ("../evil.png", "/etc/passwd", "a\\b.png", "x\x00.png", "a/../../b"):
        ctx = node.ctx(type="custom", image=task_image, command="env.sh", project_id=project["id"])
        inline_items(ctx, project)
        ctx.task["project"]["datasets"][0]["items"][0]["name"] = bad  # the server refuses them; defend anyway
        outcome = custom.run(ctx)
        assert outcome.state == "failed" and "unsafe item name" in outcome.error, (bad, outcome)
        assert not (ctx.task_dir / "data").exists() or not any((ctx.task_dir / "data").rglob("*.png"))


def test_interrupted_download_resumes_with_range(node, user):
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    ctx = node.ctx(type="custom", image="none")
    ctx.api.put_blob(sha, io.BytesIO(data))  # this node's own upload: a blob it may read
    cfg = ctx.config
    cfg.tmp_dir.mkdir(parents=True)
    (cfg.tmp_dir / f"{sha}.part").write_bytes(data[:200_000])  # what an interrupted fetch left
    dl = Downloader(ctx)
    job = Job(sha, len(data), cache.image_path(cfg, sha, "r.bin"), ctx.task_dir / "r.bin", "r.bin")
    dl.fetch(job)
    assert dl.done_bytes == 100_000 and open(job.cache_path, "rb").read() == data


def test_not_enough_disk_and_quota_eviction(node, user, task_image):
    ctx = node.ctx(cfg=node.config(min_free_disk_mb=10**9), type="custom", image=task_image, command="env.sh")
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and outcome.error.startswith("not enough disk"), outcome
    status = cache.disk_status(ctx.config)
    assert status["ok"] is False and status["reason"].startswith("not enough disk") and status["free_mb"] > 0
    # quota: 1 MB; two projects of 0.6 MB each -> the second evicts the first
    cfg = node.config(cache_quota_mb=1)
    first = make_project(user, f"q1-{secrets.token_hex(4)}", {"ds": {"a.bin": os.urandom(600_000)}})
    second = make_project(user, f"q2-{secrets.token_hex(4)}", {"ds": {"b.bin": os.urandom(600_000)}})
    for p in (first, second):
        ctx = node.ctx(cfg=cfg, type="custom", image=task_image, command="env.sh", project_id=p["id"])
        assert custom.run(ctx).state == "finished"
    a, b = first["datasets"][0]["items"][0]["sha256"], second["datasets"][0]["items"][0]["sha256"]
    assert not cache.image_path(cfg, a, "a.bin").exists() and cache.image_path(cfg, b, "b.bin").exists()
    # the image of the first project (and, when its annotation text was last used before the image
    # was, that text too: a page's annotations are written while its blobs are fetched)
    assert any(
        re.fullmatch(r"cache: evicted [12] least recently used entries \(0\.6 MB\)", m) for m in ctx.messages("agent")
    )
    big = make_project(user, f"q3-{secrets.token_hex(4)}", {"ds": {"c.bin": os.urandom(1_200_000)}})
    ctx = node.ctx(cfg=cfg, type="custom", image=task_image, command="env.sh", project_id=big["id"])
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "cache quota exceeded" in outcome.error


def test_symlink_fifo_device_in_results_are_skipped(node, user, task_image):
    ctx = node.ctx(
        type="custom",
        image=task_image,
        command=[
            "sh",
            "-c",
            """
        cd /sly_task_data/results && echo fine > ok.txt && ln -s /etc/passwd leak && mkfifo pipe
        mkdir -p sub && ln -s /etc sub/dirlink && mknod sub/null c 1 3 || true""",
        ],
    )
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    arts = {a["path"] for a in user.task_artifacts(ctx.task_id)}
    assert arts == {"ok.txt"}
    said = ctx.messages("agent")
    for line in (
        "results: leak is a symlink; skipped",
        "results: pipe is a fifo; skipped",
        "results: sub/dirlink is a symlink; skipped",
    ):
        assert any(m.startswith(line) for m in said), (line, said)
    if (ctx.task_dir / "results" / "sub" / "null").exists():
        assert any(m.startswith("results: sub/null is a device; skipped") for m in said), said


def test_task_dir_cleanup_keeps_logs(node, project, task_image):
    cfg = node.config(task_dir_cleanup="on-success")
    ctx = node.ctx(cfg=cfg, type="custom", image=task_image, command="env.sh", project_id=project["id"])
    (ctx.task_dir / "logs").mkdir(parents=True)
    (ctx.task_dir / "logs" / "log_x.txt").write_text("kept")
    assert custom.run(ctx).state == "finished"
    assert sorted(p.name for p in ctx.task_dir.iterdir()) == ["logs"]


def test_cleanup_task_clears_cache_and_old_task_dirs(node, project, task_image):
    ctx = node.ctx(type="custom", image=task_image, command="env.sh", project_id=project["id"])
    assert custom.run(ctx).state == "finished"
    entries = cache.cache_entries(ctx.config)  # 6 images and their annotations' texts
    assert len([e for e in entries if "/images/" in str(e[2])]) == 6 and (ctx.task_dir / "data").exists()
    clean = node.ctx(type="cleanup", image=None)
    outcome = cleanup.run(clean)
    assert outcome.state == "finished"
    assert cache.cache_entries(ctx.config) == []
    assert not (ctx.task_dir / "data").exists() and (ctx.task_dir / "task_config.json").exists() is False
    assert any(m.startswith(f"cleanup: removed {len(entries)} cache entries") for m in clean.messages("agent"))
    assert not list((ctx.config.images_dir.parent / "records" / "images").rglob("*.png")), "records go too"


def test_plan_rejects_bad_model_hash(node):
    ctx = node.ctx(type="custom", image="none")
    ctx.task["model"] = {"id": 1, "name": "m", "hash": "../x", "files": []}
    with pytest.raises(TaskError, match="model hash"):
        plan(ctx)


def test_link_into_copies_across_filesystems(tmp_path):
    """The task dir on another filesystem than the cache (a tmpfs here): the file is copied."""
    import subprocess

    from workers.cache import link_into

    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(other_fs)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = tmp_path / "cached.bin"
        src.write_bytes(b"x" * 1000)
        dest = other_fs / "task" / "data" / "a.bin"
        link_into(src, dest)
        assert dest.read_bytes() == src.read_bytes()
        assert dest.stat().st_ino != src.stat().st_ino and dest.stat().st_dev != src.stat().st_dev
        assert stat.S_IMODE(dest.stat().st_mode) == 0o444, "a copy of a cached file is read-only too"
        same_fs = tmp_path / "task" / "a.bin"
        link_into(src, same_fs)
        assert same_fs.stat().st_ino == src.stat().st_ino  # same filesystem: a hard link
    finally:
        subprocess.run(["umount", str(other_fs)], check=False)
