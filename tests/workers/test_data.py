"""Downloads into the cache, results uploads, disk limits, cleanup: handlers against the real server."""
from __future__ import annotations

import os
import secrets

import pytest

from workers import cache, cleanup, custom, inference, train
from workers.downloads import Downloader, Job, plan
from workers.errors import TaskError

pytestmark = pytest.mark.docker


def make_project(user, name, files: dict[str, dict[str, bytes]]) -> dict:
    datasets = [{"name": ds, "items": [{"name": n, "sha256": user.upload_bytes(b), "size": len(b)}
                                       for n, b in items.items()]} for ds, items in files.items()]
    return user.create_project(name, datasets)


def make_model(user, name, files: dict[str, bytes]) -> dict:
    return user.create_model(name, [{"path": p, "sha256": user.upload_bytes(b), "size": len(b)} for p, b in files.items()])


@pytest.fixture
def project(user):
    tag = secrets.token_hex(4)
    return make_project(user, f"p-{tag}", {"ds1": {f"img{i}.png": f"{tag} image {i}".encode() for i in range(5)},
                                           "ds2": {"sub/a.jpg": f"{tag} deep".encode()}})


def test_train_downloads_runs_uploads_model_and_checkpoints(node, user, project, task_image):
    model = make_model(user, f"m-{project['name']}", {"cfg/model.json": b'{"arch": "tiny"}', "w.bin": b"\x00" * 1000})
    ctx = node.ctx(type="train", image=task_image, command="train.sh", project_id=project["id"],
                   model_id=model["id"], config={"model_name": "trained"})
    outcome = train.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert "found 6 input files" in ctx.messages("stdout")
    data = ctx.task_dir / "data"
    item = data / "projects" / project["name"] / "ds2" / "sub" / "a.jpg"
    cached = cache.image_path(node.config(), project["datasets"][1]["items"][0]["sha256"], "a.jpg")
    assert item.read_bytes() == cached.read_bytes() and item.stat().st_ino == cached.stat().st_ino
    assert (data / "model" / "cfg" / "model.json").read_bytes() == b'{"arch": "tiny"}'
    assert (cache.model_dir(node.config(), model["hash"]) / "w.bin").stat().st_size == 1000
    assert [p for p in ctx.progress_values if p == (3, 3)], "progress events become task progress"
    events = [ln for ln in ctx.container_lines() if ln.get("event_type")]
    assert {e["event_type"] for e in events} == {"progress", "metrics", "checkpoint"}
    assert next(e for e in events if e["event_type"] == "checkpoint")["subdir"] == "checkpoints"
    done = next(ln for ln in ctx.container_lines() if ln["message"] == "training done")
    assert done["level"] == "warning" and done["accuracy"] == 0.93
    task = user.get_task(ctx.task_id)
    results = task["results"]
    arts = {a["path"] for a in results["artifacts"]}
    assert {"checkpoints/ep1.txt", "checkpoints/ep2.txt", "checkpoints/ep3.txt"} <= arts
    m = user.get_model(results["model_id"])
    assert m["name"] == "trained" and {f["path"] for f in m["files"]} == {"weights.bin", "w.bin"}
    assert user.download_blob(next(f["sha256"] for f in m["files"] if f["path"] == "w.bin")) == b"\x00" * 1000


def test_inference_uploads_project_and_second_task_downloads_nothing(node, user, project, task_image):
    ctx = node.ctx(type="inference", image=task_image, command="infer.sh", project_id=project["id"])
    assert inference.run(ctx).state == "finished"
    agent_lines = ctx.messages("agent")
    assert "data ready: 6 files (0 cached, 6 downloaded" in " ".join(agent_lines)
    assert "downloading 6 of 6 files (0.0 MB); 0 cached" in agent_lines
    assert agent_lines.index("downloading 6/6 files, 0.0 MB") < agent_lines.index("data ready: 6 files (0 cached, "
                                                                                  "6 downloaded, 0.0 MB)")
    assert (6, 6) in ctx.progress_values     # download progress while preparing
    out = user.get_project(user.get_task(ctx.task_id)["results"]["project_id"])
    assert {ds["name"]: sorted(i["name"] for i in ds["items"]) for ds in out["datasets"]} == \
        {"ds1": [f"img{i}.png.json" for i in range(5)], "ds2": ["a.jpg.json"]}
    again = node.ctx(type="inference", image=task_image, command="infer.sh", project_id=project["id"])
    assert inference.run(again).state == "finished"
    assert "data ready: 6 files (6 cached, 0 downloaded, 0.0 MB)" in again.messages("agent")


def test_corrupt_blob_fails_after_retries_and_caches_nothing(node, user, server, task_image):
    tag = secrets.token_hex(4)
    good = make_project(user, f"bad-{tag}", {"ds": {"x.png": f"{tag} bytes".encode()}})
    sha = good["datasets"][0]["items"][0]["sha256"]
    blob = server.data_dir / "blobs" / sha[0:2] / sha[2:5] / sha
    blob.write_bytes(b"evil " + blob.read_bytes()[5:])           # same size, other bytes
    ctx = node.ctx(type="custom", image=task_image, command="env.sh", project_id=good["id"])
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "do not match sha256" in outcome.error, outcome
    assert not cache.image_path(ctx.config, sha, "x.png").exists()
    assert not list(ctx.config.tmp_dir.glob(f"{sha}.part"))


def test_unsafe_names_fail_the_task(node, user, project, task_image):
    for bad in ("../evil.png", "/etc/passwd", "a\\b.png", "x\x00.png", "a/../../b"):
        ctx = node.ctx(type="custom", image=task_image, command="env.sh", project_id=project["id"])
        ctx.task["project"]["datasets"][0]["items"][0]["name"] = bad     # the server refuses them; defend anyway
        outcome = custom.run(ctx)
        assert outcome.state == "failed" and "unsafe item name" in outcome.error, (bad, outcome)
        assert not (ctx.task_dir / "data").exists() or not any((ctx.task_dir / "data").rglob("*.png"))


def test_interrupted_download_resumes_with_range(node, user):
    data = os.urandom(300_000)
    sha = user.upload_bytes(data)
    ctx = node.ctx(type="custom", image="none")
    cfg = ctx.config
    cfg.tmp_dir.mkdir(parents=True)
    (cfg.tmp_dir / f"{sha}.part").write_bytes(data[:200_000])     # what an interrupted fetch left
    dl = Downloader(ctx)
    job = Job(sha, len(data), cache.image_path(cfg, sha, "r.bin"), ctx.task_dir / "r.bin", "r.bin")
    dl.fetch(job)
    assert dl.done_bytes == 100_000 and job.cache_path.read_bytes() == data


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
    assert any(m.startswith("cache: evicted 1") for m in ctx.messages("agent"))
    big = make_project(user, f"q3-{secrets.token_hex(4)}", {"ds": {"c.bin": os.urandom(1_200_000)}})
    ctx = node.ctx(cfg=cfg, type="custom", image=task_image, command="env.sh", project_id=big["id"])
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "cache quota exceeded" in outcome.error


def test_symlink_in_results_is_refused(node, task_image):
    ctx = node.ctx(type="custom", image=task_image,
                   command=["sh", "-c", "ln -s /etc/passwd /sly_task_data/results/leak"])
    outcome = custom.run(ctx)
    assert outcome.state == "failed" and "leak is a symlink; refused" in outcome.error, outcome


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
    assert cache.cache_entries(ctx.config) and (ctx.task_dir / "data").exists()
    clean = node.ctx(type="cleanup", image=None)
    outcome = cleanup.run(clean)
    assert outcome.state == "finished"
    assert cache.cache_entries(ctx.config) == []
    assert not (ctx.task_dir / "data").exists() and (ctx.task_dir / "task_config.json").exists() is False
    assert any(m.startswith("cleanup: removed 6 cache entries") for m in clean.messages("agent"))


def test_plan_rejects_bad_model_hash(node):
    ctx = node.ctx(type="custom", image="none")
    ctx.task["model"] = {"id": 1, "name": "m", "hash": "../x", "files": []}
    with pytest.raises(TaskError, match="model hash"):
        plan(ctx)


def test_link_into_copies_across_filesystems(tmp_path):
    """The task dir on another filesystem than the cache (a tmpfs here): the file is copied."""
    import subprocess

    from workers.downloads import link_into
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(other_fs)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src = tmp_path / "cached.bin"
        src.write_bytes(b"x" * 1000)
        dest = other_fs / "task" / "data" / "a.bin"
        link_into(src, dest)
        assert dest.read_bytes() == src.read_bytes()
        assert dest.stat().st_ino != src.stat().st_ino and dest.stat().st_dev != src.stat().st_dev
        same_fs = tmp_path / "task" / "a.bin"
        link_into(src, same_fs)
        assert same_fs.stat().st_ino == src.stat().st_ino      # same filesystem: a hard link
    finally:
        subprocess.run(["umount", str(other_fs)], check=False)
