"""Inside workers/, the planner uses the cache and the container's lifecycle uses its parts, never the
other way round (tests/test_layers.py pins the packages' directions; this pins the modules')."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKERS = Path(__file__).resolve().parents[2] / "workers"

# module -> the only workers modules it may import
ALLOWED = {
    "cache": set(),
    "downloads": {"cache", "errors"},
    "container_spec": {"errors"},
    "image_pull": {"errors", "registry_auth"},
    "registry_auth": set(),
    "http_stream": set(),
    "log_pump": {"http_stream", "logparse"},
    "container": {"container_spec", "errors"},
    # results: the per-type collection -> the live uploader -> reading results/ and sending files.
    "uploads": {"cache", "errors"},
    "results_dir": {"errors", "safefs", "uploads"},
    "checkpoints": {"cache", "errors", "results_dir", "results_watch", "safefs", "uploads"},
    "results": {"checkpoints", "errors", "results_dir", "safefs", "uploads"},
    # The App's API forwarder (in the task process) and the relay (inside the sidecar container,
    # run by the App image's python3 from a copy: it can import nothing of ours).
    "app_proxy": set(),
    "app_sidecar": set(),
    "app": {"app_proxy", "base", "container", "container_spec", "docker_task", "errors"},
}


def workers_imports(path: Path) -> set[str]:
    """Every workers module the file imports, at any depth (lazy imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("workers.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "workers":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workers."):
            out.add(node.module.split(".")[1])
    return out


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_workers_modules_depend_one_way(module):
    extra = workers_imports(WORKERS / f"{module}.py") - ALLOWED[module]
    assert not extra, f"workers/{module}.py imports {sorted(extra)}"


def test_the_checker_sees_every_form(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "import workers.a\nfrom workers import b\nfrom workers.c import d\n\ndef f():\n    from workers.e.f import g\n"
    )
    assert workers_imports(src) == {"a", "b", "c", "e"}
