"""Image pulls against a real (tiny, local) registry: progress in the task log, the pull policies,
and a slow pull for one task that does not hold up another task's start."""

from __future__ import annotations

import threading

import pytest

from tests.support.procs import poll_for
from tests.support.registry import Registry
from workers import custom

pytestmark = pytest.mark.docker


@pytest.fixture
def registry(docker_client):
    reg = Registry().start()
    yield reg
    reg.stop()
    for image in docker_client.images.list(name=f"{reg.host}/*"):
        docker_client.images.remove(image.id, force=True)


@pytest.mark.slow
def test_missing_image_is_pulled_with_progress_in_the_task_log(node, registry):
    registry.delay_s = 2.0  # long enough for progress lines (at most one a second)
    image = registry.add_image("sly/pulled", "1", cmd=["echo", "hello from a pulled image"])
    ctx = node.ctx(type="custom", image=image)
    outcome = custom.run(ctx)
    assert outcome.state == "finished", outcome
    agent_lines = ctx.messages("agent")
    assert f"pulling image {image}" in agent_lines and f"pulled image {image}" in agent_lines
    progress = [m for m in agent_lines if m.startswith(f"pull {image}:")]
    assert progress, agent_lines
    assert "hello from a pulled image" in ctx.messages("stdout")


def test_always_pulls_again_and_never_refuses_a_missing_image(node, registry, docker_client):
    image = registry.add_image("sly/policy", "1", cmd=["true"])
    assert custom.run(node.ctx(type="custom", image=image)).state == "finished"  # pulled once
    before = sum("/manifests/" in r for r in registry.requests)
    ctx = node.ctx(node.config(pull_policy="always"), type="custom", image=image)
    assert custom.run(ctx).state == "finished"
    assert sum("/manifests/" in r for r in registry.requests) > before, "always must ask the registry"
    missing = registry.add_image("sly/policy", "2", cmd=["true"])
    out = custom.run(node.ctx(node.config(pull_policy="never"), type="custom", image=missing))
    assert out.state == "failed" and "PULL_POLICY=never" in out.error
    assert not docker_client.images.list(name=missing.rsplit(":", 1)[0] + ":2")


@pytest.mark.slow
def test_a_slow_pull_does_not_hold_up_another_task(node, registry, task_image):
    registry.delay_s = 6.0
    slow_image = registry.add_image("sly/slow", "1", cmd=["true"])
    slow_ctx = node.ctx(type="custom", image=slow_image)
    quick_ctx = node.ctx(type="custom", image=task_image, command=["sh", "-c", "echo quick"])
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("slow", custom.run(slow_ctx)))
    t.start()
    poll_for(lambda: any("/blobs/" in r for r in registry.requests), timeout=20, what="the slow pull to start")
    assert custom.run(quick_ctx).state == "finished"
    assert f"pulled image {slow_image}" not in slow_ctx.messages("agent"), "the quick task waited for the pull"
    t.join(60)
    assert result["slow"].state == "finished", result
