"""client/ and tools/ sit on top of protocol/: they drive the server over HTTP and start it (and the
agent) only as processes, so they import none of the server's or the agent's code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"protocol", "node", "agent", "workers", "server", "client", "tools", "tests", "bench"}
ALLOWED = {"client": {"protocol", "client"}, "tools": {"protocol", "client", "tools"}}


def _imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below(package):
    for py in (ROOT / package).rglob("*.py"):
        wrong = (_imported(py) & PROJECT) - ALLOWED[package]
        assert not wrong, f"{py.relative_to(ROOT)} imports {sorted(wrong)}"


def test_importing_the_client_loads_no_server_or_agent_module():
    code = ("import sys, client, client.cli, client.upload; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'agent', 'workers', 'node', 'tools'}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "[]"
