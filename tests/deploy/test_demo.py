"""The README's first command, non-interactively: it must end with a finished task and a new model."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.docker
@pytest.mark.timeout(400)
def test_demo_runs_the_whole_lifecycle(tmp_path, docker_client):
    data = tmp_path / "demo-data"
    args = ["demo", "--exit-when-done", "--epochs", "2", "--data", str(data), "--port", str(free_port())]
    if sys.prefix != sys.base_prefix:   # in a venv (as under ./run.sh test): go through run.sh itself
        cmd = ["bash", str(REPO / "run.sh"), *args]
        env = dict(os.environ, SLY_VENV=sys.prefix)
    else:
        cmd = [sys.executable, "-m", "tools.demo", *args[1:]]
        env = dict(os.environ)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "ended finished" in out
    assert "new model" in out and "weights.bin" in out
    assert "progress [" in out, "the live progress bar was printed"
    assert "[stdout] task" in out, "the container's own output was streamed"
    # No token-shaped string (32 letters and digits) in what the demo printed or in the logs.
    token_re = re.compile(r"\b[A-Za-z0-9]{32}\b")
    for text in (out, (data / "agent.log").read_text(), (data / "server.log").read_text()):
        assert not token_re.search(text), token_re.search(text)
    # Nothing keeps running after --exit-when-done.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(data) not in ps
