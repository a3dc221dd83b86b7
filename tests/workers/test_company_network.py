"""A task on a company network, through the real Engine: the custom task's default entry point
(`/workdir/src/main.py`), proxy variables reaching the container while the agent itself reaches a
loopback server through NO_PROXY, the CA bundle mounted read-only, and pulls from a registry that
wants credentials (tests/support/registry.py with basic auth)."""

from __future__ import annotations

import base64
import json
import os

import pytest
import requests

from node.config import proxy_env
from tests.support.images import build_image
from tests.support.registry import Registry
from workers import custom
from workers.container_spec import CUSTOM_FALLBACK, task_command

NO_CMD_IMAGE = "sly-test/no-cmd:latest"
PASSWORD = "reg-pa55-9f3k"

# busybox has no Python: a stand-in that says how it was called, then runs the script with sh
FAKE_PYTHON = '#!/bin/sh\necho "python $*"\n[ "$1" = -u ] && shift\nexec sh "$@"\n'


@pytest.fixture(scope="module")
def no_cmd_image(docker_client, busybox_image):
    """An image with neither CMD nor entrypoint, and a /workdir/src/main.py."""
    tag = build_image(
        docker_client,
        NO_CMD_IMAGE,
        f"FROM {busybox_image}\nCOPY python /bin/python\nCOPY main.py /workdir/src/main.py\nCMD []\n",
        {"python": FAKE_PYTHON, "main.py": 'echo "main.py ran in $(pwd)"\n'},
    )
    config = docker_client.images.get(tag).attrs["Config"]
    assert not config.get("Cmd") and not config.get("Entrypoint")
    return tag


def test_the_entry_point_follows_the_image():
    none = {"Cmd": None, "Entrypoint": None}
    assert task_command({"type": "custom"}, none) == {"command": CUSTOM_FALLBACK}
    assert task_command({"type": "custom"}, {"Cmd": [], "Entrypoint": []}) == {"command": CUSTOM_FALLBACK}
    assert task_command({"type": "custom"}, {"Cmd": ["/bin/sh"]}) == {}  # the image's own CMD
    assert task_command({"type": "custom"}, {"Entrypoint": ["/run.sh"]}) == {}  # its entrypoint, unchanged
    assert task_command({"type": "custom"}, None) == {}  # not known: the image's own
    assert task_command({"type": "custom", "command": "a b"}, none) == {"command": ["a", "b"]}
    assert task_command({"type": "train"}, none)["entrypoint"][-1] == "python -u /workdir/src/train.py"


@pytest.mark.docker
@pytest.mark.slow
def test_a_custom_task_without_cmd_runs_workdir_src_main_py(node, no_cmd_image):
    ctx = node.ctx(type="custom", image=no_cmd_image)
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert ctx.messages("stdout")[:2] == ["python -u /workdir/src/main.py", "main.py ran in /"]
    ctx = node.ctx(type="custom", image=no_cmd_image, command=["echo", "own command"])
    assert custom.run(ctx).state == "finished" and ctx.messages("stdout") == ["own command"]


@pytest.mark.docker
def test_proxies_reach_the_container_while_the_agent_reaches_loopback_by_no_proxy(node, task_image, monkeypatch):
    dead_proxy = "http://127.0.0.1:9"  # nothing listens: a request sent through it fails
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    monkeypatch.setenv("https_proxy", dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(requests.exceptions.ProxyError):  # the proxy is really in the way...
        requests.get(node.server.url + "/agent/v1/connect", timeout=5)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # ...until NO_PROXY names the server
    cfg = node.config(proxy_env=proxy_env(os.environ))
    ctx = node.ctx(cfg, type="custom", image=task_image, command=["env"])
    outcome = custom.run(ctx)  # its phases and logs go to the loopback server from this process
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    assert ctx.phases == ["preparing", "running", "uploading"]
    env = dict(line.partition("=")[::2] for line in ctx.messages("stdout"))
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        assert env.get(name) == dead_proxy, (name, env)
    assert env["NO_PROXY"] == env["no_proxy"] == "127.0.0.1,localhost"


@pytest.mark.docker
def test_the_ca_bundle_is_mounted_read_only(node, task_image, tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nMIIBsly-test-company-ca\n-----END CERTIFICATE-----\n"
    (tmp_path / "company-ca.pem").write_text(pem)
    script = (
        'echo "REQUESTS_CA_BUNDLE=$REQUESTS_CA_BUNDLE SSL_CERT_FILE=$SSL_CERT_FILE"; cat /etc/sly-ca.pem; '
        "(echo x >> /etc/sly-ca.pem) 2>/dev/null && echo WRITABLE || echo read-only"
    )
    ctx = node.ctx(
        node.config(ca_bundle=str(tmp_path / "company-ca.pem")),
        type="custom",
        image=task_image,
        command=["sh", "-c", script],
    )
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-10:])
    out = ctx.messages("stdout")
    assert out[0] == "REQUESTS_CA_BUNDLE=/etc/sly-ca.pem SSL_CERT_FILE=/etc/sly-ca.pem"
    assert "\n".join(out[1:4]) + "\n" == pem and out[-1] == "read-only"
    assert (tmp_path / "company-ca.pem").read_text() == pem


@pytest.fixture
def private_registry(docker_client):
    reg = Registry(auth=("alice", PASSWORD)).start()
    yield reg
    reg.stop()
    for image in docker_client.images.list(name=f"{reg.host}/*"):
        docker_client.images.remove(image.id, force=True)


@pytest.mark.docker
@pytest.mark.slow
def test_a_private_registry_refuses_without_credentials_and_accepts_with_them(node, private_registry, tmp_path):
    reg = private_registry
    image = reg.add_image("sly/private", "1", cmd=["env"])
    no_config = str(tmp_path / "no-docker-config")

    ctx = node.ctx(node.config(docker_config=no_config), type="custom", image=image)
    out = custom.run(ctx)
    assert out.state == "failed" and out.error.startswith(f"cannot pull image {image}: the registry {reg.host}")
    assert "needs credentials" in out.error and "DOCKER_LOGIN" in out.error, out.error

    wrong = node.config(
        docker_config=no_config, docker_registry=reg.host, docker_login="alice", docker_password="wrong-password"
    )
    out = custom.run(node.ctx(wrong, type="custom", image=image))
    assert out.state == "failed" and "refused the credentials from DOCKER_LOGIN" in out.error, out.error
    assert "wrong-password" not in out.error

    right = node.config(
        docker_config=no_config, docker_registry=f"http://{reg.host}/", docker_login="alice", docker_password=PASSWORD
    )
    ctx = node.ctx(right, type="custom", image=image)
    out = custom.run(ctx)
    assert out.state == "finished", (out, ctx.messages()[-10:])
    assert f"pulling image {image} (credentials for {reg.host} from DOCKER_LOGIN)" in ctx.messages("agent")
    assert not [ln for ln in ctx.lines if PASSWORD in json.dumps(ln)], "the password reached the task log"
    assert "HOSTNAME=" in "\n".join(ctx.messages("stdout"))  # the container's env, without the password


@pytest.mark.docker
def test_credentials_from_the_hosts_docker_config_json(node, private_registry, tmp_path):
    reg = private_registry
    image = reg.add_image("sly/private", "2", cmd=["echo", "pulled with config.json"])
    folder = tmp_path / "docker-config"
    folder.mkdir()
    auth = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {f"http://{reg.host}": {"auth": auth}}}))
    ctx = node.ctx(node.config(docker_config=str(folder)), type="custom", image=image)
    out = custom.run(ctx)
    assert out.state == "finished", (out, ctx.messages()[-10:])
    assert ctx.messages("stdout") == ["pulled with config.json"]
    assert any(f"from {folder / 'config.json'}" in m for m in ctx.messages("agent"))
    assert not [ln for ln in ctx.lines if PASSWORD in json.dumps(ln)]
