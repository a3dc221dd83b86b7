"""A task container is untrusted: it cannot poison the cache, and nothing it leaves in results/
makes the agent read a host file. Real containers, the real server."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess

import pytest

from tests.workers.test_data import make_project, png
from workers import cache, custom, safefs, train

pytestmark = pytest.mark.docker


@pytest.fixture
def one_image(user):
    tag = secrets.token_hex(4)
    data = png(16, 9, tag)
    project = make_project(user, f"u-{tag}", {"ds": {"x.png": data}})
    return project, data


def _sha_printed(ctx) -> str:
    return next(m.split()[0] for m in ctx.messages("stdout") if m.endswith("x.png"))


def test_a_task_writing_into_its_input_does_not_reach_the_next_task(node, one_image, task_image):
    project, data = one_image
    path = f"/sly_task_data/data/{project['name']}/ds/img/x.png"
    vandal = node.ctx(
        type="custom",
        image=task_image,
        project_id=project["id"],
        command=["sh", "-c", f"printf EVIL | dd of={path} bs=1 conv=notrunc 2>&1 || true; sha256sum {path}"],
    )
    assert custom.run(vandal).state == "finished"
    cached = cache.image_path(vandal.config, hashlib.sha256(data).hexdigest(), "x.png")
    written = _sha_printed(vandal) != hashlib.sha256(data).hexdigest()
    # Read-only mounts refuse the write; where a write got through, it changed the cache's inode,
    # and the record shows it.
    assert written == (not cache.verify(vandal.config, cached, hashlib.sha256(data).hexdigest()))

    reader = node.ctx(
        type="custom", image=task_image, project_id=project["id"], command=["sh", "-c", f"sha256sum {path}"]
    )
    assert custom.run(reader).state == "finished"
    assert _sha_printed(reader) == hashlib.sha256(data).hexdigest()
    assert cached.read_bytes() == data
    if written:
        assert any(
            m.startswith("cache: 1 cached files changed since they were stored") for m in reader.messages("agent")
        )


def test_a_cache_entry_changed_on_the_host_is_downloaded_again(node, one_image, task_image):
    project, data = one_image
    sha = hashlib.sha256(data).hexdigest()
    first = node.ctx(type="custom", image=task_image, project_id=project["id"], command="env.sh")
    assert custom.run(first).state == "finished"
    cached = cache.image_path(first.config, sha, "x.png")
    ino = cached.stat().st_ino
    with open(cached, "r+b") as f:  # same size, other bytes (we are root: 0444 does not stop us)
        f.write(b"\x00" * 8)
    assert cached.stat().st_size == len(data) and not cache.verify(first.config, cached, sha)

    path = f"/sly_task_data/data/{project['name']}/ds/img/x.png"
    second = node.ctx(
        type="custom", image=task_image, project_id=project["id"], command=["sh", "-c", f"sha256sum {path}"]
    )
    assert custom.run(second).state == "finished"
    assert _sha_printed(second) == sha
    assert "data ready: 1 files (0 cached, 1 downloaded, 0.0 MB)" in second.messages("agent")
    assert cached.read_bytes() == data and cached.stat().st_ino != ino
    assert cache.verify(first.config, cached, sha)
    third = node.ctx(type="custom", image=task_image, project_id=project["id"], command="env.sh")
    assert custom.run(third).state == "finished"
    assert "data ready: 1 files (1 cached, 0 downloaded, 0.0 MB)" in third.messages("agent")


def test_swapping_a_result_with_a_symlink_never_uploads_the_host_file(node, user, task_image, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(f"host secret {secrets.token_hex(8)}\n")
    secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    ctx = node.ctx(
        type="custom",
        image=task_image,
        command=[
            "sh",
            "-c",
            f"""
        cd /sly_task_data/results; i=0
        while [ $i -lt 400 ]; do
          rm -f f; echo "data" > f; rm -f f; ln -s {secret} f
          i=$((i+1))
        done
        echo swapped $i times""",
        ],
    )
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert "swapped 400 times" in ctx.messages("stdout")
    assert not user.blob_exists(secret_sha), "the host file was uploaded"
    arts = list(user.task_artifacts(ctx.task_id))
    assert all(a["sha256"] != secret_sha for a in arts)
    assert all(user.download_blob(a["sha256"]) == b"data\n" for a in arts if a["path"] == "f")
    assert any(m.startswith("results: f is a symlink; skipped") for m in ctx.messages("agent"))


def test_safefs_reads_never_follow_a_swapped_link(tmp_path):
    """The same race without a container: thousands of reads while another thread swaps."""
    root, secret = tmp_path / "results", tmp_path / "secret"
    root.mkdir()
    secret.write_bytes(b"SECRET")
    # Another process (a thread would mostly wait for the GIL at the same point of its loop).
    swapper = subprocess.Popen(
        ["sh", "-c", f"cd {root}; while :; do rm -f f; echo data > f; rm -f f; ln -s {secret} f; done"]
    )
    seen = {"read": 0, "skipped": 0}
    fd = safefs.open_dir(root)
    try:
        for _ in range(5000):
            try:
                with safefs.open_rel_file(fd, "f") as f:
                    assert f.read() in (b"data\n", b"")
                seen["read"] += 1
            except safefs.Skipped as s:
                assert str(s) == "is a symlink" or "cannot be opened" in str(s) or "regular file" in str(s)
                seen["skipped"] += 1
            except FileNotFoundError:
                pass
            for rel, f in safefs.walk_files(fd, lambda r, why: None):
                with f:
                    assert f.read() != b"SECRET", rel
    finally:
        swapper.kill()
        swapper.wait()
        os.close(fd)
    assert seen["read"] and seen["skipped"], seen


def test_a_symlinked_checkpoint_is_skipped(node, user, task_image, tmp_path):
    host = tmp_path / "hostdir"
    host.mkdir()
    (host / "secret.bin").write_bytes(b"host secret " + secrets.token_bytes(8))
    secret_sha = hashlib.sha256((host / "secret.bin").read_bytes()).hexdigest()
    line = '{"message": "checkpoint", "event_type": "EventType.CHECKPOINT", "subdir": "%s"}'
    ctx = node.ctx(
        type="train",
        image=task_image,
        command=[
            "sh",
            "-c",
            f"""
        cd /sly_task_data/results
        mkdir 00000000 && echo one > 00000000/weights.bin && echo '{line % "00000000"}'
        ln -s {host} 00000001 && echo '{line % "00000001"}'
        mkdir 00000002 && echo three > 00000002/weights.bin && ln -s {host}/secret.bin 00000002/leak
        echo '{line % "00000002"}'
        echo '{line % "/sly_task_data/results/../../etc"}'""",
        ],
        config={"model_name": "m"},
    )
    outcome = train.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    said = ctx.messages("agent")
    assert any(m.startswith("results: 00000001 is a symlink; skipped") for m in said), said
    assert any(m.startswith("results: 00000002/leak is a symlink; skipped") for m in said), said
    assert any(m.startswith("results: ../../etc is not a path inside results/; skipped") for m in said), said
    assert [m.split()[3].rstrip("'") for m in said if m.startswith("model 'm checkpoint ")] == ["00000000", "00000002"]
    final = user.get_model(user.get_task(ctx.task_id)["results"]["model_id"])
    assert [(f["path"], user.download_blob(f["sha256"])) for f in final["files"]] == [("weights.bin", b"three\n")]
    assert not user.blob_exists(secret_sha)
