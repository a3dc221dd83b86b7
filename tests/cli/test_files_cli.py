"""`sly files list|download` against the session server: team files an App wrote through the public API."""

from __future__ import annotations

import io
import os

import pytest

from client import UserClient
from tests.cli.test_cli import cli, cli_json
from tests.support.apps import start_app
from tests.support.fake_agent import FakeAgent


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_files_list_and_download_a_file_and_a_folder(server, tmp_path):
    client = UserClient(server.url, server.admin_token)

    def make_agent(name, types):
        a = client.create_agent(name, types)
        return FakeAgent(server.url, a["token"], a["id"])

    app = start_app(server, client, make_agent)
    root = f"/cli{app.task_id}"
    files = {
        f"{root}/run/ck/e1.pth": os.urandom(2_000_000),
        f"{root}/run/log.txt": b"epoch 1\n",
        f"{root}/a b.txt": b"x",
    }
    fields = []
    for dst, data in files.items():
        folder, name = dst.rsplit("/", 1)
        fields += [("name", (None, name)), ("path", (None, folder + "/")), ("file", (name, io.BytesIO(data)))]
    assert app.call("file-storage.bulk.upload?teamId=1", files=fields).status_code == 200
    app.agent.state(app.task_id, "finished", exit_code=0)  # people read what the App left behind

    out = cli(server, "files", "list", root).stdout.splitlines()
    assert out[0].split() == ["SIZE", "UPDATED", "TASK", "NAME"]
    assert [ln.rstrip().rsplit("  ", 1)[-1].strip() for ln in out[1:]] == ["a b.txt", "run/"]
    listed = cli_json(server, "files", "list", root, "--recursive")
    assert [x["path"] for x in listed] == sorted(files)
    assert all(x["task_id"] == app.task_id for x in listed)

    # a folder: its files under LOCAL_PATH, paths kept, byte for byte
    got = cli_json(server, "files", "download", f"{root}/run", str(tmp_path / "run"))
    assert got["type"] == "folder" and got["files"] == 2
    assert (tmp_path / "run" / "ck" / "e1.pth").read_bytes() == files[f"{root}/run/ck/e1.pth"]
    assert (tmp_path / "run" / "log.txt").read_bytes() == b"epoch 1\n"
    p = cli(server, "files", "download", f"{root}/run", str(tmp_path / "run"), ok=False)
    assert p.returncode == 1 and "not empty" in p.stderr

    # a file: to a path, or into an existing folder under its own name
    cli(server, "files", "download", f"{root}/a b.txt", str(tmp_path / "copy.txt"))
    assert (tmp_path / "copy.txt").read_bytes() == b"x"
    p = cli(server, "--progress", "files", "download", f"{root}/run/ck/e1.pth", str(tmp_path))
    assert (tmp_path / "e1.pth").read_bytes() == files[f"{root}/run/ck/e1.pth"]
    assert "100%" in p.stderr

    p = cli(server, "files", "download", f"{root}/none", str(tmp_path / "none"), ok=False)
    assert p.returncode == 1 and "404 path_not_found" in p.stderr
    p = cli(server, "files", "list", "/a/../b", ok=False)
    assert p.returncode == 1 and "400 bad_path" in p.stderr
