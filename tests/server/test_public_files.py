"""Team files and task output through the public API (server/public/files.py, tasks.py), and the
user API that reads the tree (server/files/router.py): raw requests as the SDK makes them, and one
run of the real SDK in a subprocess.

The session server is shared: each test writes under a folder of its own task id.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
from sqlalchemy import create_engine, select

from server import db
from server.http.strict import ID_MAX
from tests.support.apps import start_app


@pytest.fixture
def app(server, client, make_agent):
    a = start_app(server, client, make_agent)
    yield a
    a.agent.state(a.task_id, "finished", exit_code=0)


def upload(app, files: list[tuple[str, bytes]], team_id=1, method="file-storage.bulk.upload"):
    """POST files as the SDK's MultipartEncoder sends them: name, path (the folder), file; per file."""
    fields = []
    for dst, data in files:
        folder, name = dst.rsplit("/", 1)
        fields += [("name", (None, name)), ("path", (None, folder + "/")), ("file", (name, io.BytesIO(data)))]
    return app.call(f"{method}?teamId={team_id}", files=fields)


def b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def refs_of(server, file_id: int) -> set[str]:
    eng = create_engine(server.db_url)
    try:
        with eng.connect() as conn:
            r = db.blob_refs.c
            q = select(r.sha256).where(r.kind == "file", r.owner_id == file_id)
            return set(conn.execute(q).scalars())
    finally:
        eng.dispose()


def test_upload_list_info_download_and_replace(app, server, client):
    root = f"/t{app.task_id}"
    a, b = os.urandom(300_000), b"{}"
    r = upload(app, [(f"{root}/ck/a.bin", a), (f"{root}/b.json", b)])
    assert r.status_code == 200, r.text
    infos = r.json()
    assert [i["path"] for i in infos] == [f"{root}/ck/a.bin", f"{root}/b.json"]
    assert infos[0]["hash"] == b64(a) and infos[0]["meta"]["size"] == len(a) and infos[0]["isDir"] is False
    assert infos[1]["meta"] == {"ext": "json", "mime": "application/json", "size": 2}
    assert infos[0]["storagePath"] == f"/files/{infos[0]['id']}"

    # list: recursive (files only), not recursive (files and sub-folders), a file's own path
    rec = app.json("file-storage.list", {"teamId": 1, "path": root, "recursive": True})
    assert sorted(i["path"] for i in rec) == [f"{root}/b.json", f"{root}/ck/a.bin"]
    flat = app.json("file-storage.list", {"teamId": 1, "path": root + "/", "recursive": False})
    assert [(i["path"], i["isDir"]) for i in flat] == [(f"{root}/b.json", False), (f"{root}/ck", True)]
    one = app.json("file-storage.list", {"teamId": 1, "path": f"{root}/b.json", "recursive": True})
    assert [i["path"] for i in one] == [f"{root}/b.json"]
    assert app.json("file-storage.list", {"teamId": 1, "path": f"{root}/nothing", "recursive": True}) == []
    assert app.json("file-storage.info", {"id": infos[0]["id"]})["path"] == f"{root}/ck/a.bin"

    r = app.call("file-storage.download", {"teamId": 1, "path": f"{root}/ck/a.bin"})
    assert r.status_code == 200 and r.content == a

    # a folder comes as a tar under a top folder named as it (what download_directory unpacks)
    r = app.call("file-storage.download", {"teamId": 1, "path": f"{root}/"})
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert got == {f"t{app.task_id}/ck/a.bin": a, f"t{app.task_id}/b.json": b}

    # writing a path again replaces its blob (same id), and its blob reference moves with it
    fid = infos[0]["id"]
    assert refs_of(server, fid) == {hashlib.sha256(a).hexdigest()}
    r = upload(app, [(f"{root}/ck/a.bin", b"new")], method="file-storage.upload")
    assert r.status_code == 200 and r.json()["id"] == fid and r.json()["hash"] == b64(b"new")
    assert refs_of(server, fid) == {hashlib.sha256(b"new").hexdigest()}
    assert app.call("file-storage.download", {"teamId": 1, "path": f"{root}/ck/a.bin"}).content == b"new"

    # people read the same tree through the user API
    page = client.request("GET", "/api/v1/files", params={"path": root}).json()
    assert page["type"] == "folder" and page["path"] == root + "/"
    assert [(e["type"], e["name"]) for e in page["items"]] == [("file", "b.json"), ("folder", "ck")]
    entry = page["items"][0]
    assert entry["task_id"] == app.task_id and entry["sha256"] == hashlib.sha256(b).hexdigest()
    r = client.request("GET", "/api/v1/files/download", params={"path": f"{root}/ck/a.bin"})
    assert r.content == b"new" and 'filename="a.bin"' in r.headers["content-disposition"]
    r = client.request(
        "GET", "/api/v1/files/download", params={"path": f"{root}/b.json"}, headers={"range": "bytes=1-"}, expect=(206,)
    )
    assert r.content == b"}"


def test_bad_paths_other_teams_and_huge_ids_are_refused_and_store_nothing(app, client):
    root = f"/t{app.task_id}"
    for bad in ("/a/../b", "/a/./b", "/a\x00b", "/a\nb", "/" + "x" * 1100):
        r = upload(app, [(root + bad, b"x")])
        assert r.status_code == 400 and r.json()["details"]["field"] == "path", (bad, r.text)
        r = app.call("file-storage.list", {"teamId": 1, "path": root + bad})
        assert r.status_code == 400, bad
    # a good file, then a bad part in the same request: nothing of it is stored
    fields = [
        ("name", (None, "ok.txt")),
        ("path", (None, root + "/")),
        ("file", ("ok.txt", b"ok")),
        ("name", (None, "x")),
        ("file", ("x", b"no path field before me")),
    ]
    r = app.call("file-storage.bulk.upload?teamId=1", files=fields)
    assert r.status_code == 400 and r.json()["details"]["field"] == "path"
    assert app.json("file-storage.list", {"teamId": 1, "path": root, "recursive": True}) == []

    for team in (2, ID_MAX, ID_MAX + 1, -1, "1x", True):
        r = app.call("file-storage.list", {"teamId": team, "path": "/"})
        assert r.status_code in (400, 403) and r.json()["details"]["field"] == "teamId", team
    assert upload(app, [(f"{root}/a", b"x")], team_id=2).status_code == 403
    for fid in (ID_MAX, ID_MAX + 1, 10**30, -1, "x", 1.5):
        r = app.call("file-storage.info", {"id": fid})
        assert r.status_code in (400, 404), fid
    assert app.call("file-storage.list", {"teamId": 1, "path": "/", "recursive": "yes"}).status_code == 400
    r = app.call("file-storage.bulk.upload?teamId=1", data=b"not multipart", headers={"content-type": "text/plain"})
    assert r.status_code == 400

    # a file and a folder never share a path
    assert upload(app, [(f"{root}/f", b"1")]).status_code == 200
    r = upload(app, [(f"{root}/f/g", b"2")])
    assert r.status_code == 409 and "is a file" in r.json()["error"]
    assert upload(app, [(f"{root}/d/e", b"3")]).status_code == 200
    assert upload(app, [(f"{root}/d", b"4")]).status_code == 409

    # the user API: bad path 400, nothing there 404, a cursor from elsewhere 400
    client.request("GET", "/api/v1/files", params={"path": "/a/../b"}, expect=(400,))
    client.request("GET", "/api/v1/files", params={"path": root + "/none"}, expect=(404,))
    client.request("GET", "/api/v1/files", params={"path": root, "cursor": "/elsewhere"}, expect=(400,))
    client.request("GET", "/api/v1/files/download", params={"path": root + "/none"}, expect=(404,))


def test_listing_pages_skip_sub_folders(app, client):
    root = f"/t{app.task_id}"
    files = [(f"{root}/big/{i:03}", b"x") for i in range(30)] + [(f"{root}/f{i}", b"y") for i in range(5)]
    files += [(f"{root}/sub{i}/z", b"z") for i in range(4)]
    assert upload(app, files).status_code == 200
    seen, cursor = [], None
    while True:
        params = {"path": root + "/", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.request("GET", "/api/v1/files", params=params).json()
        assert len(page["items"]) <= 3
        seen += [e["path"] for e in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    expect = [f"{root}/big/"] + [f"{root}/f{i}" for i in range(5)] + [f"{root}/sub{i}/" for i in range(4)]
    assert seen == expect
    rec = client.request("GET", "/api/v1/files", params={"path": root, "recursive": 1, "limit": 1000}).json()
    assert len(rec["items"]) == 39 and all(e["type"] == "file" for e in rec["items"])
    assert client.list_files(root, recursive=True) == rec["items"]
    client.request("GET", "/api/v1/files", params={"path": root, "limit": 1001}, expect=(422, 400))


def test_task_info_and_output(app, server, client):
    root = f"/t{app.task_id}"
    info = app.json("tasks.info", {"id": app.task_id})
    assert info["id"] == app.task_id and info["status"] == "started" and info["teamId"] == 1
    assert "config" not in info and "api_token" not in json.dumps(info)
    assert app.call("tasks.info", {"id": ID_MAX}).status_code == 404
    assert app.call("tasks.info", {"id": ID_MAX + 1}).status_code == 400

    fid = upload(app, [(f"{root}/out.tar", b"tar")]).json()[0]["id"]
    general = {"title": "out.tar", "titleUrl": f"/files/{fid}", "description": "Download archive", "download": True}
    assert app.json("tasks.output.set", {"taskId": app.task_id, "output": {"general": general}}) == {"success": True}
    out = client.get_task(app.task_id)["output"]
    assert out == {"type": "file", "file_id": fid, "path": f"{root}/out.tar", "name": "out.tar"}
    assert app.json("tasks.info", {"id": app.task_id})["meta"]["output"]["general"]["titleUrl"] == f"/files/{fid}"

    folder = {"title": root + "/", "titleUrl": f"/files/{fid}", "description": "Directory"}
    app.json("tasks.output.set", {"taskId": app.task_id, "output": {"general": folder}})
    assert client.get_task(app.task_id)["output"]["type"] == "directory"
    assert client.get_task(app.task_id)["output"]["path"] == root + "/"

    project = client.create_project(f"out-{app.task_id}", [{"name": "ds", "items": []}])
    app.json("tasks.output.set", {"taskId": app.task_id, "output": {"project": {"id": project["id"], "title": "x"}}})
    assert client.get_task(app.task_id)["output"] == {
        "type": "project",
        "project_id": project["id"],
        "name": f"out-{app.task_id}",
    }

    # another task's output, a missing project or file, a URL that names no file: refused, nothing changes
    other = {"taskId": app.task_id + 1, "output": {"project": {"id": project["id"]}}}
    assert app.call("tasks.output.set", other).status_code == 403
    assert (
        app.call("tasks.output.set", {"taskId": app.task_id, "output": {"project": {"id": ID_MAX}}}).status_code == 404
    )
    bad_url = {"general": {**general, "titleUrl": "https://example.com/x"}}
    r = app.call("tasks.output.set", {"taskId": app.task_id, "output": bad_url})
    assert r.status_code == 400 and r.json()["details"]["field"] == "output.general.titleUrl"
    gone = {"general": {**general, "titleUrl": f"/files/{ID_MAX}"}}
    assert app.call("tasks.output.set", {"taskId": app.task_id, "output": gone}).status_code == 404
    assert app.call("tasks.output.set", {"taskId": app.task_id, "output": {"x": 1}}).status_code == 400
    assert client.get_task(app.task_id)["output"]["type"] == "project"


SDK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import supervisely as sly

    api = sly.Api.from_env()
    team, task, root, big = int(os.environ["TEAM_ID"]), int(os.environ["TASK_ID"]), sys.argv[1], sys.argv[2]
    timings = {}
    t0 = time.monotonic()
    info = api.file.upload(team, big, root + "/big.bin")
    timings["upload_s"] = time.monotonic() - t0
    api.file.upload(team, sys.argv[3], root + "/conf/c.json")
    assert api.file.exists(team, root + "/big.bin")
    assert not api.file.exists(team, root + "/none.bin")
    assert api.file.dir_exists(team, root + "/conf/")
    assert api.file.get_info_by_path(team, root + "/conf/c.json").sizeb == os.path.getsize(sys.argv[3])
    names = sorted(os.path.basename(p) for p in api.file.listdir(team, root + "/"))
    assert names == ["big.bin", "conf"], names
    assert [i.name for i in api.file.list2(team, root)] == ["big.bin", "c.json"]
    t0 = time.monotonic()
    api.file.download(team, root + "/big.bin", sys.argv[4])
    timings["download_s"] = time.monotonic() - t0
    up = api.file.upload_directory(team, os.path.dirname(sys.argv[3]), root + "/dir")
    api.file.download_directory(team, up, sys.argv[4] + ".dir")
    api.task.set_output_archive(task, info.id, "big.bin")
    print(json.dumps({"id": info.id, "dir": up, **timings}))
    """
)


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_the_real_sdk_uploads_lists_downloads_and_sets_the_output(app, client, tmp_path, sdk_site):
    site = sdk_site
    root = f"/t{app.task_id}"
    big, conf = tmp_path / "big.bin", tmp_path / "conf" / "c.json"
    big.write_bytes(os.urandom(int(os.environ.get("SLY_TEST_FILE_MB", "4")) * (1 << 20)))
    conf.parent.mkdir()
    conf.write_text('{"lr": 0.1}')
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(site),
        "SERVER_ADDRESS": app.url,
        "API_TOKEN": app.token,
        "TASK_ID": str(app.task_id),
        "TEAM_ID": "1",
        "WORKSPACE_ID": "1",
        "SUPERVISELY_PUBLIC_API_RETRIES": "1",
    }
    got = tmp_path / "got.bin"
    p = subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT, root, str(big), str(conf), str(got)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert got.read_bytes() == big.read_bytes()
    assert (tmp_path / "got.bin.dir" / "c.json").read_text() == '{"lr": 0.1}'
    assert result["dir"] == root + "/dir"
    output = client.get_task(app.task_id)["output"]
    assert output == {"type": "file", "file_id": result["id"], "path": root + "/big.bin", "name": "big.bin"}
    mb = big.stat().st_size / (1 << 20)
    print(f"SDK: {mb:.0f} MB up {mb / result['upload_s']:.0f} MB/s, down {mb / result['download_s']:.0f} MB/s")
