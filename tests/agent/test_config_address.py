"""SERVER_ADDRESS must be an http(s) URL: anything else is a configuration error at start, not "server unreachable"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.exitcodes import EXIT_CONFIG
from node.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
TOKEN = "Tok3nTok3nTok3nTok3nTok3nTok3n12"


def _env(tmp_path, address: str) -> dict:
    return {"SERVER_ADDRESS": address, "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path / "root")}


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:8700", "10.0.0.5", "localhost:8700/", "ftp://10.0.0.5:8700", "http://", "http:/10.0.0.5:8700"],
)
def test_an_address_without_scheme_or_host_is_a_config_error(tmp_path, address):
    with pytest.raises(ConfigError, match="must start with http:// or https://"):
        load_config(_env(tmp_path, address))


@pytest.mark.parametrize(
    "address, kept",
    [
        ("http://127.0.0.1:8700/", "http://127.0.0.1:8700"),
        ("https://sly.example.org/base", "https://sly.example.org/base"),
        (" HTTP://10.0.0.5:8700 ", "HTTP://10.0.0.5:8700"),
    ],
)
def test_http_and_https_urls_are_taken(tmp_path, address, kept):
    assert load_config(_env(tmp_path, address)).server_address == kept


def test_the_agent_exits_with_the_config_code_and_says_why(tmp_path):
    env = dict(os.environ, **_env(tmp_path, "127.0.0.1:8700"))
    r = subprocess.run([sys.executable, "-m", "agent"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stderr)
    assert "SERVER_ADDRESS='127.0.0.1:8700' is not a URL" in r.stderr
    assert "unreachable" not in r.stderr.lower()
    assert TOKEN not in r.stdout + r.stderr
