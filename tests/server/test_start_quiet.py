"""A server's start says what it does, not what its libraries load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_migrating_logs_no_alembic_plugin_lines(tmp_path):
    # A process of its own: Alembic names its plugins once per process, at the first migration.
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        "from server import db; from server.db import migrate; "
        "migrate.upgrade(db.make_engine('sqlite:///' + sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "server.db")], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "setup plugin" not in out.stderr
    assert "database schema upgraded from nothing" in out.stderr, "the server's own line still shows"
