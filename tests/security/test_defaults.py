"""The container defaults, the token-free storage root and the log writer on a full disk, without
Docker: create_kwargs() and load_config() are pure enough to pin exactly."""

from __future__ import annotations

import errno
import json
import os
import types

import pytest

from node import storage, tasklog
from node.config import Config, ConfigError, hashed_root_name, load_config
from node.masking import Masker
from protocol import logline
from tests.security.conftest import tmpfs
from workers.container_spec import create_kwargs
from workers.errors import TaskError

TOKEN = "Tok3n" + "x" * 27


def ctx_for(tmp_path, task: dict, gpus=(), **settings):
    cfg = Config(
        server_address="http://127.0.0.1:1",
        access_token=TOKEN,
        host_dir=str(tmp_path / "root"),
        agent_dir=str(tmp_path / "root"),
        **settings,
    )
    task = {"id": 5, "image": "img", **task}
    ctx = types.SimpleNamespace(task=task, config=cfg, gpus=list(gpus), task_id=5, task_dir=cfg.task_dir(5))
    return ctx


def test_assigned_host_gpus_become_device_requests_numbered_from_zero_inside(tmp_path):
    kw = create_kwargs(ctx_for(tmp_path, {"type": "train"}, gpus=[1, 3]))
    (req,) = kw["device_requests"]
    assert req["DeviceIDs"] == ["1", "3"] and req["Capabilities"] == [["gpu"]] and req["Driver"] == ""
    assert kw["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "NVIDIA_VISIBLE_DEVICES" not in kw["environment"]
    kw = create_kwargs(ctx_for(tmp_path, {"type": "train"}))
    assert "device_requests" not in kw and "CUDA_VISIBLE_DEVICES" not in kw["environment"]
    assert kw["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"  # an nvidia default runtime exposes nothing


def test_defaults_and_environment(tmp_path):
    kw = create_kwargs(ctx_for(tmp_path, {"type": "custom", "command": "run.sh --fast"}))
    assert kw["environment"] == {
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "DEBUG",
        "LANG": "C.UTF-8",
        "TASK_ID": "5",
        "TASK_TYPE": "custom",
        "NVIDIA_VISIBLE_DEVICES": "void",
    }
    assert kw["command"] == ["run.sh", "--fast"] and "entrypoint" not in kw
    assert kw["security_opt"] == ["no-new-privileges"] and kw["privileged"] is False
    assert {"NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE", "SETFCAP"} <= set(kw["cap_drop"])
    assert kw["pids_limit"] == 4096 and kw["network_mode"] == "bridge" and kw["shm_size"] == "5g"
    assert "mem_limit" not in kw and "user" not in kw and "read_only" not in kw
    assert not any(TOKEN in json.dumps(v, default=str) for v in kw.values())
    targets = {m["Target"]: m["ReadOnly"] for m in kw["mounts"]}
    assert targets == {
        "/sly_task_data/task_config.json": True,
        "/sly_task_data/task_settings.json": True,
        "/sly_task_data/data": True,
        "/sly_task_data/model": True,
        "/sly_task_data/results": False,
        "/sly_task_data/tmp": False,
    }
    task_dir = tmp_path / "root" / "tasks" / "5"
    assert all((task_dir / name).exists() for name in ("data", "model", "results", "tmp", "task_settings.json"))
    assert not (task_dir / "logs").exists() or "/sly_task_data/logs" not in targets


def test_settings_change_the_defaults(tmp_path):
    kw = create_kwargs(
        ctx_for(
            tmp_path,
            {"type": "custom", "resources": {"memory": "1g", "shm_size": "64m"}},
            task_pids_limit=0,
            task_memory="8g",
            task_network="none",
            task_user="1000:1000",
            task_read_only_root=True,
            task_cap_drop="ALL",
            task_log_level="INFO",
        )
    )
    assert "pids_limit" not in kw and kw["network_mode"] == "none" and kw["user"] == "1000:1000"
    assert kw["mem_limit"] == "1g" and kw["shm_size"] == "64m"  # the task's own ask wins
    assert kw["read_only"] is True and "/tmp" in kw["tmpfs"] and kw["cap_drop"] == ["ALL"]
    assert kw["environment"]["LOG_LEVEL"] == "INFO"
    assert oct((tmp_path / "root" / "tasks" / "5" / "results").stat().st_mode & 0o777) == "0o777"
    kw = create_kwargs(ctx_for(tmp_path, {"type": "custom"}, task_memory="8g"))
    assert kw["mem_limit"] == "8g" and kw["memswap_limit"] == "8g"


@pytest.mark.parametrize("task_type", ["train", "inference"])
def test_default_entry_points_are_the_real_agents(tmp_path, task_type):
    kw = create_kwargs(ctx_for(tmp_path, {"type": task_type}))
    script = "train.py" if task_type == "train" else "inference.py"
    assert kw["entrypoint"] == ["sh", "-c", f"python -u /workdir/src/{script}"] and "command" not in kw
    kw = create_kwargs(ctx_for(tmp_path, {"type": "custom"}))
    assert "entrypoint" not in kw and "command" not in kw  # the image's own CMD


def test_task_settings_json_is_the_task_config(tmp_path):
    ctx = ctx_for(tmp_path, {"type": "train", "config": {"lr": 0.01, "epochs": 3}})
    create_kwargs(ctx)
    d = ctx.task_dir
    assert json.loads((d / "task_config.json").read_text()) == {"lr": 0.01, "epochs": 3}
    assert (d / "task_settings.json").read_bytes() == (d / "task_config.json").read_bytes()


def test_a_symlinked_mount_source_is_refused(tmp_path):
    ctx = ctx_for(tmp_path, {"type": "custom"})
    ctx.task_dir.mkdir(parents=True)
    (ctx.task_dir / "results").symlink_to("/etc")
    with pytest.raises(TaskError, match="symbolic link"):
        create_kwargs(ctx)


def test_a_bind_source_naming_the_token_is_refused(tmp_path):
    (tmp_path / TOKEN).mkdir()
    (tmp_path / "root").symlink_to(tmp_path / TOKEN)  # a root that resolves to a token-named dir
    with pytest.raises(TaskError, match="contains the node token"):
        create_kwargs(ctx_for(tmp_path, {"type": "custom"}))


# --- the storage root ---


def env(**kw) -> dict:
    return {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, **kw}


def test_default_root_is_token_free_with_the_documented_path_a_link(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(env())
    real = tmp_path / ".supervisely-agent" / hashed_root_name(TOKEN)
    assert cfg.host_dir == cfg.agent_dir == str(real) and TOKEN not in cfg.host_dir
    storage.ensure_layout(cfg)
    link = tmp_path / ".supervisely-agent" / TOKEN
    assert link.is_symlink() and os.readlink(link) == real.name and (link / "tasks").is_dir()
    storage.ensure_layout(cfg)  # again: nothing to do
    # The documented path given explicitly is the same thing.
    assert load_config(env(AGENT_HOST_DIR=str(link))).host_dir == str(real)


def test_an_old_token_named_root_is_moved_and_linked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    old = tmp_path / ".supervisely-agent" / TOKEN
    (old / "storage" / "images").mkdir(parents=True)
    (old / "storage" / "images" / "blob").write_bytes(b"cached")
    cfg = load_config(env())
    storage.ensure_layout(cfg)
    assert old.is_symlink()
    assert (cfg.root / "storage" / "images" / "blob").read_bytes() == b"cached"


def test_an_explicit_root_naming_the_token_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="contains the node's token") as e:
        load_config(env(AGENT_HOST_DIR=str(tmp_path / f"agent-{TOKEN}")))
    assert TOKEN not in str(e.value) and hashed_root_name(TOKEN) in str(e.value)
    with pytest.raises(ConfigError, match="AGENT_DIR contains"):
        load_config(env(AGENT_HOST_DIR=str(tmp_path / "ok"), AGENT_DIR=f"/inside/{TOKEN}"))


def test_agent_dir_without_host_dir_is_a_config_error():
    # was a TypeError (`token in None`): where the Docker host keeps the storage is unknown
    with pytest.raises(ConfigError, match="AGENT_DIR is set without AGENT_HOST_DIR"):
        load_config(env(AGENT_DIR="/inside"))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="TASK_NETWORK"):
        load_config(env(AGENT_HOST_DIR="/x", TASK_NETWORK="host"))
    with pytest.raises(ConfigError, match="TASK_READ_ONLY_ROOT"):
        load_config(env(AGENT_HOST_DIR="/x", TASK_READ_ONLY_ROOT="maybe"))
    assert load_config(env(AGENT_HOST_DIR="/x", TASK_READ_ONLY_ROOT="false")).task_read_only_root is False
    assert load_config(env(AGENT_HOST_DIR="/x", TASK_READ_ONLY_ROOT="1")).task_read_only_root is True


# --- the log writer on a full disk ---


@pytest.fixture
def small_root(tmp_path):
    unmount = tmpfs(tmp_path / "small", "256k")
    yield tmp_path / "small"
    unmount()


def seqs(path) -> list[int]:
    return [logline.seq_of(raw) for raw in path.read_bytes().splitlines()]


def test_writer_on_a_full_disk_writes_no_seq_twice(small_root):
    cfg = Config(server_address="http://x", access_token=TOKEN, host_dir=str(small_root), agent_dir=str(small_root))
    storage.ensure_layout(cfg)
    tasklog.write_cursor(cfg, 1, {"file": None, "offset": 0, "seq": -1})
    filler = small_root / "filler"
    filler.write_bytes(b"\0" * 64 * 1024)
    w = tasklog.TaskLogWriter(cfg, 1, Masker(TOKEN))
    batch = [{"ts": 1.0, "level": "info", "stream": "stdout", "message": "x" * 300} for _ in range(50)]
    failures = 0
    for _ in range(100):
        try:
            w.write(batch)
        except tasklog.LogWriteError as e:
            assert e.errno == errno.ENOSPC
            failures += 1
            if failures == 3:
                break
    assert failures == 3 and w.error.startswith("disk full") and "ENOSPC" in w.error
    kept = seqs(w.path)
    assert kept == list(range(len(kept))) and w.seq == kept[-1], "whole lines only, numbered once"
    # The shipper's cursor still advances on the full disk.
    tasklog.write_cursor(cfg, 1, {"file": w.path.name, "offset": 123456, "seq": w.seq})
    assert tasklog.acked_seq(cfg, 1) == w.seq
    tasklog.mark_closed(cfg, 1, "failed")
    assert tasklog.is_closed(cfg, 1)
    # Space comes back: the seqs go on from the last kept line, in this writer and in a new one.
    filler.unlink()
    w.write(batch[:5])
    w.close()
    w2 = tasklog.TaskLogWriter(cfg, 1, Masker(TOKEN))
    w2.write(batch[:5])
    w2.close()
    after = seqs(w2.path)
    assert after == list(range(len(kept) + 10))
