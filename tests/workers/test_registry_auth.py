"""Choosing pull credentials, without Docker: the registry an image names, the agent's settings
before the host's config.json, config.json's forms, and the password never shown."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from agent.agentlog import MaskingFormatter
from node.config import Config, ConfigError, load_config, proxy_env
from node.masking import Masker
from workers.registry_auth import (
    DOCKER_HUB,
    credentials_for,
    from_docker_config,
    image_registry,
    normalize_registry,
    refusal_error,
    refused,
)

TOKEN = "R" * 32
PASSWORD = "pa55-w0rd-xyz"


def cfg(tmp_path, **over) -> Config:
    values = dict(
        server_address="http://127.0.0.1:1",
        access_token=TOKEN,
        host_dir=str(tmp_path),
        agent_dir=str(tmp_path),
        docker_config=str(tmp_path / "no-docker-config"),
    )
    values.update(over)
    return Config(**values)


def write_docker_config(folder, auths: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"auths": auths}))
    return str(folder)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "image, registry",
    [
        ("python:3.11", DOCKER_HUB),
        ("supervisely/base-py:6.0", DOCKER_HUB),
        ("docker.io/library/busybox", DOCKER_HUB),
        ("index.docker.io/a/b:1", DOCKER_HUB),
        ("127.0.0.1:5000/sly/private:1", "127.0.0.1:5000"),
        ("localhost/x", "localhost"),
        ("Registry.Example.com/team/img@sha256:" + "0" * 64, "registry.example.com"),
        ("team/img", DOCKER_HUB),  # no dot, colon or localhost: a Docker Hub user, not a registry
    ],
)
def test_the_registry_of_an_image(image, registry):
    assert image_registry(image) == registry


def test_registry_spellings():
    assert normalize_registry("https://index.docker.io/v1/") == DOCKER_HUB
    assert normalize_registry("") == DOCKER_HUB
    assert normalize_registry("http://127.0.0.1:5000/") == "127.0.0.1:5000"
    assert normalize_registry(" Registry.Example.com ") == "registry.example.com"


def test_settings_name_the_registry_they_are_for(tmp_path):
    c = cfg(tmp_path, docker_registry="registry.example.com", docker_login="bob", docker_password=PASSWORD)
    creds = credentials_for("registry.example.com/team/img:1", c)
    assert creds.auth_config == {"username": "bob", "password": PASSWORD} and creds.source == "DOCKER_LOGIN"
    assert credentials_for("other.example.com/team/img:1", c) is None  # not for another registry
    assert credentials_for("python:3.11", c) is None
    hub = cfg(tmp_path, docker_login="bob", docker_password=PASSWORD)  # no DOCKER_REGISTRY: Docker Hub
    assert credentials_for("supervisely/base-py", hub).registry == DOCKER_HUB


def test_comma_lists_as_the_supervisely_agent(tmp_path):
    c = cfg(tmp_path, docker_registry="a.example.com,b.example.com:5000", docker_login="u1,u2", docker_password="p1,p2")
    assert credentials_for("b.example.com:5000/x", c).auth_config == {"username": "u2", "password": "p2"}
    one = cfg(tmp_path, docker_registry="a.example.com", docker_login="u", docker_password="with,comma")
    assert credentials_for("a.example.com/x", one).auth_config["password"] == "with,comma"  # one registry: whole
    base = {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="DOCKER_REGISTRY names 2 registries"):
        load_config({**base, "DOCKER_REGISTRY": "a,b", "DOCKER_LOGIN": "u", "DOCKER_PASSWORD": "p"})


def test_host_docker_config_json(tmp_path):
    folder = write_docker_config(
        tmp_path / "dc",
        {
            "https://index.docker.io/v1/": {"auth": b64("hubuser:" + PASSWORD)},
            "127.0.0.1:5000": {"auth": b64("alice:pw:with:colons")},
            "fields.example.com": {"username": "carol", "password": "pw3"},
            "token.example.com": {"identitytoken": "tok-123"},
            "helper.example.com": {},  # kept by a credential helper: not ours to read
        },
    )
    c = cfg(tmp_path, docker_config=folder)
    assert credentials_for("supervisely/base-py", c).auth_config == {"username": "hubuser", "password": PASSWORD}
    creds = credentials_for("127.0.0.1:5000/sly/private:1", c)
    assert creds.auth_config == {"username": "alice", "password": "pw:with:colons"}
    assert creds.source == str(tmp_path / "dc" / "config.json")
    assert credentials_for("fields.example.com/x", c).auth_config == {"username": "carol", "password": "pw3"}
    assert credentials_for("token.example.com/x", c).auth_config == {"identitytoken": "tok-123"}
    assert credentials_for("helper.example.com/x", c) is None
    # the settings win over config.json for their registry
    both = cfg(tmp_path, docker_config=folder, docker_registry="127.0.0.1:5000", docker_login="s", docker_password="t")
    assert credentials_for("127.0.0.1:5000/x", both).source == "DOCKER_LOGIN"


@pytest.mark.parametrize("text", ["", "not json", "[1]", '{"auths": []}', '{"auths": {"r.io": {"auth": "!!"}}}'])
def test_a_broken_config_json_gives_no_credentials(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    assert from_docker_config(str(tmp_path / "config.json"), "r.io") is None
    assert from_docker_config(str(tmp_path / "absent.json"), "r.io") is None


def test_refusals_are_recognised_and_explained():
    assert refused('Head "http://127.0.0.1:1/v2/x/manifests/1": no basic auth credentials')
    assert refused("unauthorized") and refused("pull access denied for x, repository does not exist")
    assert not refused("manifest for x:1 not found: manifest unknown")
    assert not refused("dial tcp 127.0.0.1:9: connect: connection refused")
    error = refusal_error("127.0.0.1:5000/x:1", None, "no basic auth credentials")
    assert "needs credentials" in error and "DOCKER_LOGIN" in error and "docker login 127.0.0.1:5000" in error


def test_the_password_is_never_shown(tmp_path, caplog):
    c = cfg(tmp_path, docker_registry="r.example.com", docker_login="bob", docker_password=PASSWORD)
    creds = credentials_for("r.example.com/x", c)
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds)
    assert PASSWORD not in repr(c) and TOKEN not in repr(c)
    masker = Masker(*c.secrets)
    assert PASSWORD not in masker(f"pulling with {PASSWORD}") and TOKEN not in masker(f"token {TOKEN}")
    record = logging.LogRecord("agent", logging.INFO, __file__, 1, "login %s", (PASSWORD,), None)
    assert PASSWORD not in MaskingFormatter(masker).format(record)
    error = refusal_error("r.example.com/x", creds, "unauthorized")
    assert PASSWORD not in error and "refused the credentials from DOCKER_LOGIN" in error


def test_proxy_variables_in_both_cases():
    env = {"HTTP_PROXY": "http://proxy:3128", "https_proxy": "http://proxy:3129", "no_proxy": "127.0.0.1,.corp"}
    assert proxy_env(env) == {
        "HTTP_PROXY": "http://proxy:3128",
        "http_proxy": "http://proxy:3128",
        "HTTPS_PROXY": "http://proxy:3129",
        "https_proxy": "http://proxy:3129",
        "NO_PROXY": "127.0.0.1,.corp",
        "no_proxy": "127.0.0.1,.corp",
    }
    assert proxy_env({"HTTP_PROXY": "http://a:1", "http_proxy": "http://b:2"})["http_proxy"] == "http://a:1"
    assert proxy_env({}) == {}


def test_ca_bundle_must_be_readable(tmp_path):
    base = {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path / "r")}
    with pytest.raises(ConfigError, match="CA_BUNDLE"):
        load_config({**base, "CA_BUNDLE": str(tmp_path / "missing.pem")})
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_config({**base, "CA_BUNDLE": str(tmp_path / "ca.pem")}).ca_bundle == str(tmp_path / "ca.pem")
