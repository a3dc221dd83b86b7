"""Session fixtures: the real Supervisely SDK image and the legacy NN plugin image, built once.

Both are cached (tools/sdk_image.py): an existing image is reused, pip's SITE is kept under the
cache directory. Without PyPI the SDK cannot be installed, and the tests that need it skip with
pip's reason; any other build failure is a failure.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sdk_image(docker_client):
    from tools.sdk_image import BuildError, SiteUnavailable, ensure_sdk_image

    try:
        return ensure_sdk_image(docker_client)
    except SiteUnavailable as e:
        pytest.skip(f"the Supervisely SDK could not be installed (is PyPI reachable?): {e}")
    except BuildError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def plugin_image(docker_client, sdk_image):
    from tools.sdk_image import ensure_plugin_image

    return ensure_plugin_image(docker_client, base=sdk_image)


@pytest.fixture(scope="session")
def sample_project(tmp_path_factory):
    """The annotated sample project (tools/sample_project.py): path, name and expected items."""
    from tools.sample_project import write_sample_project

    return write_sample_project(str(tmp_path_factory.mktemp("sample")), name="sample")


@pytest.fixture(scope="module")
def user(server):
    """The user API's client on the session server."""
    from client import UserClient

    return UserClient(server.url, server.admin_token)


@pytest.fixture(scope="module")
def original(sdk_image, sample_project):
    """What the SDK itself reads of the sample project (tests/sdk/sdk_check.project_summary)."""
    from tests.sdk.sdk_check import project_summary

    return project_summary(sample_project["path"], sdk_image)
