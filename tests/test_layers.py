"""The one import-layer check: every package's dependencies point one way.

- agent -> workers -> node -> protocol; client and tools sit on protocol alone (they drive the
  server and the agent over HTTP and start them only as processes).
- Inside server/: a router (`router.py`, `*_router.py`) imports no other router and no SQL
  (sqlalchemy, the schema in server.db); no other server module imports a router.

Read from the source (every import statement, at any depth, including those inside functions),
so a lazy import cannot slip past. protocol's own rule (standard library only) is pinned in
tests/protocol/test_protocol_pkg.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages of this repository it must never import
FORBIDDEN = {
    "protocol": {"agent", "workers", "node", "server", "client"},
    "agent": {"server", "client"},
    "workers": {"agent", "server", "client"},
    "node": {"agent", "workers", "server", "client"},
    "client": {"agent", "workers", "node", "server", "tools", "tests", "bench"},
    "tools": {"agent", "workers", "node", "server", "tests", "bench"},
}


def imported_packages(path: Path, package: str) -> dict[str, int]:
    """Top-level package of every import in the file -> the first line importing it."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package] if node.level else [node.module or ""]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
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
    bad = [
        f"{py.relative_to(ROOT)}:{line} imports {mod}"
        for py in files
        for mod, line in imported_packages(py, package).items()
        if mod in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_lazy_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import os\n\ndef f():\n    from agent.x import y\n    import server.app\n"
        "    importlib.import_module('client.cli')\n"
    )
    assert set(imported_packages(src, "node")) == {"os", "agent", "server", "client"}


def imported_modules(path: Path) -> dict[str, int]:
    """Every module named by an import in the file (`from a import b` names a and a.b) -> line."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.setdefault(node.module, node.lineno)
            for a in node.names:
                out.setdefault(f"{node.module}.{a.name}", node.lineno)
    return out


def _is_router(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return module.startswith("server.") and (leaf == "router" or leaf.endswith("_router"))


SERVER = sorted((ROOT / "server").rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    [p for p in SERVER if _is_router(".".join(p.relative_to(ROOT).with_suffix("").parts))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_a_router_imports_no_other_router_and_no_sql(path):
    me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    bad = [
        f"{mod} (line {line})"
        for mod, line in imported_modules(path).items()
        if (_is_router(mod) and mod != me) or mod.split(".")[0] == "sqlalchemy" or mod == "server.db"
    ]
    assert not bad, f"{me} imports " + ", ".join(bad)


def test_only_the_router_list_imports_routers():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in SERVER
        if not _is_router(".".join(p.relative_to(ROOT).with_suffix("").parts)) and p.name != "routers.py"
        for mod, line in imported_modules(p).items()
        if _is_router(mod)
    ]
    assert not bad, "\n".join(bad)


def test_importing_the_client_loads_no_server_or_agent_module():
    code = (
        "import sys, client, client.cli, client.upload; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'agent', 'workers', 'node', 'tools'}))"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert p.stdout.strip() == "[]"
