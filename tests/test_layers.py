"""The packages' dependencies point one way: agent -> workers -> node -> protocol.

Read from the source (every import statement, at any depth, including those inside functions),
so a lazy import cannot slip past. protocol's own rule (standard library only) is pinned in
tests/protocol/test_protocol_pkg.py.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages of this repository it must never import
FORBIDDEN = {
    "protocol": {"agent", "workers", "node", "server", "client"},
    "agent": {"server", "client"},
    "workers": {"agent", "server", "client"},
    "node": {"agent", "workers", "server", "client"},
}


def imported_packages(path: Path, package: str) -> dict[str, int]:
    """Top-level package of every import in the file -> the first line importing it."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            out.setdefault(name.split(".")[0], node.lineno)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = [f"{py.relative_to(ROOT)}:{line} imports {mod}"
           for py in files for mod, line in imported_packages(py, package).items() if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from agent.x import y\n    import server.app\n"
                   "    importlib.import_module('client.cli')\n")
    assert set(imported_packages(src, "node")) == {"os", "agent", "server", "client"}
