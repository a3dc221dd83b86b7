"""Shared fixtures: a real server on a free loopback port, a real Docker engine, local images."""

from __future__ import annotations

import shutil

import pytest

from tests.support.server import db_kind, fixture_server


def pytest_report_header(config):
    return f"server database: {db_kind()} (SLY_TEST_DB_URL)"


def pytest_collection_modifyitems(config, items):
    on_sqlite = db_kind() == "sqlite"
    for item in items:
        # Every test gets a hang guard unless it sets its own.
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120))
        mark = item.get_closest_marker("sqlite_only")
        if mark is not None and not on_sqlite:
            why = mark.args[0] if mark.args else "a fact of the SQLite file"
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {why}"))
        mark = item.get_closest_marker("any_database")
        if mark is not None and not on_sqlite:
            why = mark.args[0] if mark.args else "it does not touch the database"
            item.add_marker(pytest.mark.skip(reason=f"the same on every database (run on SQLite): {why}"))


def _wants_process(request) -> bool:
    return request.node.get_closest_marker("server_process") is not None


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server for the whole test session (tests create their own agents/tasks)."""
    # Every telemetry sample a test posts becomes a history point (by default, one per half interval).
    srv = fixture_server(tmp_path_factory.mktemp("server") / "data", extra_args=["--telemetry-min-gap-s", "0"]).start()
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def sdk_site():
    """The real Supervisely SDK (tools/sdk_image.SDK_VERSION) pip-installed into a folder of its own,
    for a subprocess to import (PYTHONPATH): the public API's tests run it on this host against the
    test server. Installed once (minutes) and cached; without PyPI the tests that need it skip."""
    from pathlib import Path

    from tools.sdk_image import SiteUnavailable, ensure_site

    try:
        return Path(ensure_site(log=lambda *_: None))
    except SiteUnavailable as e:
        pytest.skip(f"the Supervisely SDK could not be installed (is PyPI reachable?): {e}")


@pytest.fixture
def fresh_server(tmp_path, request):
    """A server of this test's own, which the test may stop and start again (same port, same data);
    a subprocess where the test is marked `server_process`."""
    srv = fixture_server(tmp_path / "server-data", process=_wants_process(request)).start()
    yield srv
    srv.close()


@pytest.fixture
def admin(server):
    return server.admin()


@pytest.fixture(scope="session")
def docker_client():
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"no Docker engine answers ({e}); run .ci/docker-up.sh")
    return client


@pytest.fixture(scope="session")
def busybox_image(docker_client):
    from tools.images import ensure_busybox_image

    return ensure_busybox_image(docker_client)


@pytest.fixture(scope="session")
def chromium_path():
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not shutil.which(path):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    return path
