"""The GPU policy: what a task that names no GPU count gets (DEFAULT_TASK_GPUS), exclusive GPUs for
one that names a count, re-adopted tasks keeping theirs, and `gpu_devices` numbered from 0, on a
fake NVML of 0, 1 and 4 GPUs (the supervisor's real admission, no fork)."""

from __future__ import annotations

import json
import types

import pytest

from agent import admission
from agent.gpus import gpu_pool
from agent.states import SlotState
from node import tasklog
from node.config import ConfigError, load_config
from node.masking import Masker
from node.storage import ensure_layout
from tests.agent.fakes import FakeSpawner
from tests.agent.test_supervisor_logic import DrySupervisor
from tests.agent.test_units import fake_nvml
from workers.container_spec import create_kwargs
from workers.docker_task import task_config, write_task_config

TOKEN = "G" * 32


def make_sup(tmp_path, n_gpus: int, **env) -> DrySupervisor:
    c = load_config(
        {
            "SERVER_ADDRESS": "http://127.0.0.1:1",
            "ACCESS_TOKEN": TOKEN,
            "AGENT_HOST_DIR": str(tmp_path / "root"),
            "MAX_TASKS": "4",
            **env,
        }
    )
    ensure_layout(c)
    sup = DrySupervisor(c, api=None, spawner=FakeSpawner())
    sup.gpu_pool = gpu_pool(c.gpus, fake_nvml(n_gpus))
    return sup


def task(tid: int, gpus="absent", type_: str = "train") -> dict:
    t = {"id": tid, "type": type_, "image": "x", "config": {}, "resources": {"cpus": None}}
    if gpus != "absent":
        t["resources"]["gpus"] = gpus
    return t


def gpus_of(sup) -> dict[int, list[int]]:
    return {tid: gpus for tid, gpus, _adopt in sup.spawned}


def test_absent_or_null_is_not_named_and_cleanup_gets_none():
    for t in (task(1), task(1, None), {"id": 1, "type": "custom"}, {"id": 1, "type": "app", "resources": None}):
        assert admission.gpus_wanted(t) is None, t
    assert admission.gpus_wanted(task(1, 0)) == 0  # named: exactly none
    assert admission.gpus_wanted(task(1, 2)) == 2
    assert admission.gpus_wanted(task(1, ["a", "b"])) == 2
    assert admission.gpus_wanted(task(1, type_="cleanup")) == 0  # no container, no GPU


@pytest.mark.parametrize("n", [0, 1, 4])
def test_a_task_naming_no_count_gets_every_free_gpu_and_never_waits(tmp_path, n):
    sup = make_sup(tmp_path, n)
    assert sup.gpu_pool == list(range(n))
    sup.handle_answer({"tasks": [task(1), task(2, type_="custom")], "stop": []})
    sup.admit_pending()
    # 1 takes every GPU; 2 finds none free and runs on the CPU rather than waiting
    assert gpus_of(sup) == {1: list(range(n)), 2: []}
    sup.update_snapshot()
    assert sup.poller.snapshot.free_gpus == []


@pytest.mark.parametrize("n", [0, 1, 4])
def test_a_named_count_is_exclusive_and_waits_or_is_refused(tmp_path, n):
    sup = make_sup(tmp_path, n)
    sup.handle_answer({"tasks": [task(1, 1), task(2, 1), task(3)], "stop": []})
    sup.admit_pending()
    got = gpus_of(sup)
    if n == 0:  # no GPU at all: a task that needs one can never run here
        assert (
            sup.slots[1].state is SlotState.FINALIZING and "needs 1 GPU(s); this agent has 0" in sup.slots[1].final[1]
        )
        assert got == {3: []}
    elif n == 1:  # 1 holds the only GPU, 2 waits for it, 3 (no count) runs on the CPU
        assert got == {1: [0], 3: []} and sup.slots[2].state is SlotState.PENDING
        sup.release(sup.slots[1], SlotState.DONE)
        sup.admit_pending()
        assert gpus_of(sup)[2] == [0]
    else:  # 1 and 2 one each, 3 the two left; no GPU is handed out twice
        assert got == {1: [0], 2: [1], 3: [2, 3]}
        assert sorted(g for gpus in got.values() for g in gpus) == [0, 1, 2, 3]


def test_default_task_gpus_none_and_a_number(tmp_path):
    sup = make_sup(tmp_path, 4, DEFAULT_TASK_GPUS="none")
    sup.handle_answer({"tasks": [task(1), task(2, 2)], "stop": []})
    sup.admit_pending()
    assert gpus_of(sup) == {1: [], 2: [0, 1]}  # a named count is not touched by the setting
    sup = make_sup(tmp_path / "b", 4, DEFAULT_TASK_GPUS="3")
    sup.handle_answer({"tasks": [task(1), task(2), task(3, type_="app")], "stop": []})
    sup.admit_pending()
    assert gpus_of(sup) == {1: [0, 1, 2], 2: [3], 3: []}  # at most 3, of those free


def test_the_setting_is_checked():
    base = {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": "/tmp/sly-gpu-policy"}
    assert load_config(base).default_task_gpus == "all"
    with pytest.raises(ConfigError, match="DEFAULT_TASK_GPUS"):
        load_config({**base, "DEFAULT_TASK_GPUS": "lots"})


def test_an_adopted_task_keeps_the_gpus_its_container_has(tmp_path):
    """After an agent restart the GPUs a running container holds are not handed out again, even
    when they are not the first free ones."""
    sup = make_sup(tmp_path, 4)
    tdir = sup.config.task_dir(7)
    tdir.mkdir(parents=True)
    (tdir / "agent.json").write_text(json.dumps({"task_id": 7, "gpus": [1, 3]}))
    w = tasklog.TaskLogWriter(sup.config, 7, Masker(TOKEN))
    w.write([{"ts": 1.0, "level": "info", "stream": "stdout", "message": "epoch 1"}])
    w.close()
    sup.handle_answer({"tasks": [task(8, 1), task(7, 2)], "stop": []})
    sup.admit_pending()
    assert sup.spawned[0] == (7, [1, 3], True)  # first, with exactly its own
    assert gpus_of(sup)[8] == [0]


def test_gpu_devices_count_from_zero_inside(tmp_path):
    assert task_config({"config": {"lr": 1, "gpu_devices": [5]}}, [2, 5])["gpu_devices"] == [0, 1]
    assert task_config({"config": {"gpu_devices": [0]}}, []) == {"gpu_devices": []}  # on the CPU: none
    assert task_config({"config": {"lr": 1}}, []) == {"lr": 1}  # no GPU, not named: as given
    assert task_config({"config": None}, [0]) == {"gpu_devices": [0]}
    cfg = load_config({"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path)})
    t = {"id": 9, "type": "train", "image": "x", "config": {"epochs": 2, "gpu_devices": [3]}}
    ctx = types.SimpleNamespace(task=t, config=cfg, gpus=[1, 3], task_id=9, task_dir=cfg.task_dir(9))
    ctx.task_dir.mkdir(parents=True)
    write_task_config(ctx)
    for name in ("task_config.json", "task_settings.json"):
        assert json.loads((ctx.task_dir / name).read_text()) == {"epochs": 2, "gpu_devices": [0, 1]}
    assert json.loads((ctx.task_dir / "agent.json").read_text())["gpus"] == [1, 3]  # the host's, for adoption
    kw = create_kwargs(ctx)
    assert kw["device_requests"][0]["DeviceIDs"] == ["1", "3"] and kw["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
