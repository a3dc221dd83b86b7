"""`pip install .` as users run it: a wheel of the working tree, installed into a fresh virtualenv,
gives console scripts that work from any directory; requirement files include one another; the
agent image takes only the agent's layers and requirements."""

from __future__ import annotations

import email
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port, poll_for

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"fastapi", "uvicorn", "sqlalchemy", "jinja2", "alembic"}


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (building in place would leave build/ behind)."""
    src = tmp_path_factory.mktemp("src") / "sly-agent"
    files = subprocess.run(
        ["git", "ls-files", "-c", "-o", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: the test venv's setuptools builds it, so no network is needed.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("sly_agent-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv with only the wheel installed; its dependencies come from the test venv (a .pth
    appended after its own site-packages), so the project's code can only come from the wheel."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    py = path / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return path


def _run(venv: Path, cwd: Path, *argv: str, env: dict | None = None, timeout: float = 60):
    env = dict(env or os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_holds_every_package_and_the_console_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("protocol", "agent", "workers", "server", "client", "tools", "tools/demo"):
        assert f"{pkg}/__init__.py" in names, pkg
    if (REPO / "node" / "__init__.py").exists():
        assert "node/__init__.py" in names
    assert "server/console/templates/base.html" in names and "server/console/static/console.js" in names
    assert "tools/demo/train.sh" in names and "tools/demo/task/inference.sh" in names
    for migration in (REPO / "server" / "migrations").rglob("*.py"):
        assert migration.relative_to(REPO).as_posix() in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    meta = email.message_from_bytes(
        next(zipfile.ZipFile(wheel).read(n) for n in names if n.endswith(".dist-info/METADATA"))
    )
    required = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in meta.get_all("Requires-Dist")}
    assert required == _requirement_names(REPO / "requirements-agent.txt") | _requirement_names(
        REPO / "requirements-server.txt"
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_console_scripts_work_from_anywhere(venv, tmp_path):
    where = _run(venv, tmp_path, "python", "-c", "import client, server, agent, tools; print(client.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv)), "the code came from the wheel, not the checkout"

    p = _run(venv, tmp_path, "sly", "--help")
    assert p.returncode == 0 and "usage: sly" in p.stdout and "projects" in p.stdout, p.stderr
    p = _run(venv, tmp_path, "sly-server", "--help")
    assert p.returncode == 0 and "--data" in p.stdout, p.stderr
    # The agent without settings: its configuration error, one line, exit 2.
    env = {k: v for k, v in os.environ.items() if k not in ("SERVER_ADDRESS", "ACCESS_TOKEN", "AGENT_CONFIG")}
    p = _run(venv, tmp_path, "sly-agent", env=env)
    assert p.returncode == 2 and p.stderr.startswith("sly-agent: config error"), (p.returncode, p.stderr)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_installed_server_serves_the_console_and_the_cli_talks_to_it(venv, tmp_path):
    token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SERVER_ADMIN_TOKEN=token)
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [
            str(venv / "bin" / "sly-server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        poll_for(lambda: requests.get(url + "/healthz", timeout=1).ok, timeout=60, what="the installed server")
        page = requests.get(url + "/signin", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()  # templates shipped
        assert requests.get(url + "/console/static/console.css", timeout=10).status_code == 200  # static files shipped
        p = _run(
            venv,
            tmp_path,
            "sly",
            "--server",
            url,
            "--json",
            "nodes",
            "add",
            "wheel-node",
            env=dict(env, SLY_ADMIN_TOKEN=token),
        )
        assert p.returncode == 0, p.stderr
        assert len(__import__("json").loads(p.stdout)["token"]) == 32
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_requirement_files_include_one_another():
    agent = _requirement_names(REPO / "requirements-agent.txt")
    server = _requirement_names(REPO / "requirements-server.txt")
    assert agent and server and not agent & server, "each requirement is written once"
    assert not agent & SERVER_ONLY, "the agent image installs only what the agent uses"
    assert (REPO / "requirements.txt").read_text().split("\n").count("-r requirements-agent.txt") == 1
    assert "-r requirements-server.txt" in (REPO / "requirements.txt").read_text()
    assert _requirement_names(REPO / "requirements.txt") == set(), "requirements.txt only includes"
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()


def test_agent_image_takes_only_the_agent_layers():
    dockerfile = (REPO / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(\S+)", dockerfile, re.M)
    assert sorted(c.rstrip("/") for c in copies) == ["agent", "node", "protocol", "requirements-agent.txt", "workers"]
    installs = re.findall(r"-r\s+(\S+)", dockerfile)
    assert installs == ["requirements-agent.txt"]


def test_run_sh_stamp_changes_with_an_included_file(tmp_path):
    """run.sh's install stamp covers every file a requirements file includes, at any depth."""
    for name in ("requirements-agent.txt", "requirements-server.txt", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    run_sh = (REPO / "run.sh").read_text()
    fns = "\n".join(
        re.search(rf"^{name}\(\) \{{.*?^\}}", run_sh, re.M | re.S).group(0) for name in ("req_files", "req_hash")
    )

    def bash(call: str) -> str:
        return subprocess.run(
            ["bash", "-c", fns + "\n" + call, "x", str(tmp_path / "requirements-dev.txt")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert sorted(Path(f).name for f in bash('req_files "$1"').split()) == [
        "requirements-agent.txt",
        "requirements-dev.txt",
        "requirements-server.txt",
        "requirements.txt",
    ]
    before = bash('req_hash "$1"')
    with open(tmp_path / "requirements-agent.txt", "a") as f:
        f.write("six>=1.16\n")
    after = bash('req_hash "$1"')
    assert len(before.strip()) == 16 and after != before
