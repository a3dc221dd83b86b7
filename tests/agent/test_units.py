"""Unit tests of the agent's pure parts: states, restart policy, masking, NVML (faked), the durable log."""

from __future__ import annotations

import json
import logging
import os
import types

import pytest

from agent.agentlog import MaskingFormatter
from agent.gpus import gpu_pool, list_gpus
from agent.states import CHILD_EDGES, SLOT_EDGES, ChildState, SlotState, TransitionError, change_state
from agent.supervisor import RestartPolicy, describe_exit
from node import tasklog
from node.config import load_config
from node.masking import Masker
from node.storage import ensure_layout, wipe_tmp

TOKEN = "Tok3nTok3nTok3nTok3nTok3nTok3n12"


@pytest.fixture
def config(tmp_path):
    c = load_config(
        {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path / "root")}
    )
    ensure_layout(c)
    return c


# --- states ---
def test_child_and_slot_edges():
    s = change_state(ChildState.STOPPED, ChildState.STARTING, CHILD_EDGES)
    s = change_state(s, ChildState.RUNNING, CHILD_EDGES)
    s = change_state(s, ChildState.BACKOFF, CHILD_EDGES)
    s = change_state(s, ChildState.STARTING, CHILD_EDGES)
    assert change_state(s, ChildState.FATAL, CHILD_EDGES) is ChildState.FATAL
    with pytest.raises(TransitionError):
        change_state(ChildState.FATAL, ChildState.STARTING, CHILD_EDGES)
    with pytest.raises(TransitionError):
        change_state(ChildState.STOPPED, ChildState.RUNNING, CHILD_EDGES)
    s = change_state(SlotState.PENDING, SlotState.RUNNING, SLOT_EDGES)
    s = change_state(s, SlotState.RUNNING, SLOT_EDGES)  # re-spawned to adopt its container
    s = change_state(s, SlotState.FINALIZING, SLOT_EDGES)
    assert change_state(s, SlotState.DONE, SLOT_EDGES) is SlotState.DONE
    with pytest.raises(TransitionError):
        change_state(SlotState.DONE, SlotState.RUNNING, SLOT_EDGES)


def test_restart_policy_backs_off_then_goes_fatal():
    p = RestartPolicy(max_deaths=4, window_s=10, base_s=0.1, cap_s=1.0)
    delays = [p.record_death(t) for t in (0.0, 0.5, 1.0)]
    assert all(d is not None for d in delays)
    assert 0.05 <= delays[0] <= 0.15 and 0.2 <= delays[2] <= 0.6  # exponential, with jitter
    assert p.record_death(1.5) is None  # 4th death in 10 s: FATAL
    q = RestartPolicy(max_deaths=3, window_s=10)
    assert q.record_death(0) is not None and q.record_death(20) is not None and q.record_death(40) is not None


def test_describe_exit():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"


# --- masking ---
@pytest.mark.parametrize(
    "text, secret",
    [
        (f"token is {TOKEN}", TOKEN),
        ("connect password=hunter2 ok", "hunter2"),
        ('{"password": "s3cr3t!"}', "s3cr3t!"),
        ("Authorization: Bearer abcdef123456789", "abcdef123456789"),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENGbPxRfiCY", "wJalrXUtnFEMI/K7MDENGbPxRfiCY"),
        ("id AKIAIOSFODNN7EXAMPLE used", "AKIAIOSFODNN7EXAMPLE"),
        ("x-token: Zm9vYmFyYmF6cXV4", "Zm9vYmFyYmF6cXV4"),
        ("git clone https://bob:pa55word@example.com/r.git", "pa55word"),
        ("api_key: 12345678abcdef", "12345678abcdef"),
        ("ACCESS_TOKEN=abcdefgh12345678", "abcdefgh12345678"),
        ("db_password: 'p@ss w'", "p@ss"),
        ("client_secret=xyz12345", "xyz12345"),
    ],
)
def test_masking_hides_secrets(text, secret):
    masked = Masker(TOKEN)(text)
    assert secret not in masked
    assert "***" in masked


@pytest.mark.parametrize(
    "text",
    [
        "epoch 3/10 loss=0.412 acc=0.91",
        "tokens processed: 512",
        "keyboard monkey",
        "train_token_acc=0.93 keypoints=17",
        "tokenizer: bert-base",
    ],
)
def test_masking_keeps_ordinary_lines(text):
    assert Masker(TOKEN)(text) == text


def test_masking_formatter_masks_the_whole_record():
    fmt = MaskingFormatter(Masker(TOKEN))
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "using %s", (TOKEN,), None)
    assert TOKEN not in fmt.format(rec)


# --- NVML, faked (this machine has no GPU) ---
class NVMLError(Exception):
    pass


def fake_nvml(n: int, fail_init: bool = False, broken_sensor: bool = False):
    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def temp(h, sensor):
        if broken_sensor:
            raise NVMLError("Not Supported")
        return 40 + h

    return types.SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: n,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100" if h == 0 else "NVIDIA A100",
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 << 30, used=h << 30, free=0),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=10 * h, memory=0),
        nvmlDeviceGetTemperature=temp,
        NVML_TEMPERATURE_GPU=0,
    )


def test_nvml_lists_gpus():
    gpus = list_gpus(fake_nvml(2))
    assert [g["index"] for g in gpus] == [0, 1]
    assert gpus[0]["name"] == "NVIDIA H100" and gpus[1]["uuid"] == "GPU-1"
    assert gpus[1]["memory_used"] == 1 << 30 and gpus[1]["utilization"] == 10 and gpus[1]["temperature"] == 41


def test_nvml_degrades_to_empty():
    assert list_gpus(fake_nvml(2, fail_init=True)) == []
    assert list_gpus(fake_nvml(0)) == []
    assert "temperature" not in list_gpus(fake_nvml(1, broken_sensor=True))[0]
    assert list_gpus() == []  # the real library: no driver on this machine


def test_gpu_pool_honours_the_setting():
    nv = fake_nvml(4)
    assert gpu_pool("all", nv) == [0, 1, 2, 3]
    assert gpu_pool("none", nv) == []
    assert gpu_pool("2, 0,7", nv) == [2, 0]


# --- storage and the durable task log ---
def test_layout_and_tmp_wipe(config):
    for d in ("logs", "storage/images", "storage/models", "tasks", "tmp", "state/logs"):
        assert (config.root / d).is_dir()
    (config.tmp_dir / "part.bin").write_bytes(b"x")
    (config.tmp_dir / "sub").mkdir()
    (config.tmp_dir / "sub" / "f").write_text("y")
    wipe_tmp(config)
    assert list(config.tmp_dir.iterdir()) == []


def test_task_log_seqs_masking_and_cts(config):
    w = tasklog.TaskLogWriter(config, 7, Masker(TOKEN))
    assert (
        w.write(
            [
                {"ts": 1.0, "level": "info", "stream": "stdout", "message": f"t={TOKEN}", "cts": 5},
                {"ts": 2.0, "level": "info", "stream": "agent", "message": "password=x"},
            ]
        )
        == 1
    )
    w.close()
    rows = [json.loads(line) for line in w.path.read_text().splitlines()]
    assert [r["seq"] for r in rows] == [0, 1]
    assert TOKEN not in w.path.read_text() and "password=***" in rows[1]["message"]
    assert tasklog.last_cts(w.path) == 5 and tasklog.last_seq(w.path) == 1


def test_task_log_masks_json_messages_and_extra_fields(config):
    w = tasklog.TaskLogWriter(config, 6, Masker(TOKEN))
    w.write(
        [{"ts": 1.0, "level": "info", "stream": "stdout", "message": "ok"} for _ in range(50)]
        + [
            {"ts": 1.0, "level": "info", "stream": "stdout", "message": '{"password": "s3cr3t!", "n": 1}'},
            {"ts": 1.0, "level": "info", "stream": "stdout", "message": "m", "url": "s3://k:hidden99@bucket"},
        ]
    )
    w.close()
    text = w.path.read_text()
    assert "s3cr3t!" not in text and "hidden99" not in text
    assert [json.loads(line)["seq"] for line in text.splitlines()] == list(range(52))


def test_task_log_cuts_a_partial_line_and_continues(config):
    w = tasklog.TaskLogWriter(config, 8, Masker(TOKEN))
    w.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": f"m{i}"} for i in range(3)])
    w.close()
    with open(w.path, "a") as f:
        f.write('{"seq":3,"ts":1.0,"mess')  # a writer killed mid-line
    w2 = tasklog.TaskLogWriter(config, 8, Masker(TOKEN))
    assert w2.path == w.path and w2.seq == 2
    w2.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "m3"}])
    w2.close()
    rows = [json.loads(line) for line in w.path.read_text().splitlines()]
    assert [(r["seq"], r["message"]) for r in rows] == [(0, "m0"), (1, "m1"), (2, "m2"), (3, "m3")]


def test_cursor_and_markers(config):
    assert tasklog.acked_seq(config, 9) == -1 and tasklog.fully_acked(config, 9)
    w = tasklog.TaskLogWriter(config, 9, Masker(TOKEN))
    w.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "a"}])
    tasklog.register_active(config, 9)
    assert tasklog.active_task_ids(config) == [9] and not tasklog.fully_acked(config, 9)
    tasklog.write_cursor(config, 9, {"file": w.path.name, "offset": 10, "seq": 0})
    assert tasklog.fully_acked(config, 9)
    tasklog.mark_closed(config, 9, "finished")
    assert tasklog.is_closed(config, 9) and tasklog.active_task_ids(config) == []


def test_task_log_is_fsynced_at_most_once_a_second_and_at_close(config, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(tasklog.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    clock = [100.0]
    monkeypatch.setattr(tasklog.time, "monotonic", lambda: clock[0])
    w = tasklog.TaskLogWriter(config, 9, Masker(TOKEN))
    line = {"ts": 1.0, "level": "info", "stream": "stdout", "message": "x"}
    w.write([line])
    assert len(synced) == 1  # the first write reaches the disk
    clock[0] += 0.3
    w.write([line] * 100)
    assert len(synced) == 1  # within the second: no fsync per write
    clock[0] += 1.0
    w.write([line])
    assert len(synced) == 2
    w.close()
    assert len(synced) == 3  # closing always syncs
