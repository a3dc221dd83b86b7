"""`projects upload|download` and `models upload|download` through the CLI: against the real server,
and against a loopback stub (tests/cli/stub_server.py) for what the real one cannot be made to answer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client import UserClient
from client.transfer import Counts
from protocol.sly_format import dumps, empty_ann
from tests.cli.sly_sample import META, ann, png, write_sample
from tests.cli.stub_server import StubServer
from tests.cli.test_cli import _project_items, cli, cli_json
from tests.support.server import dataset_counts


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- against the real server ---


def test_supervisely_round_trip_is_byte_identical(server, tmp_path):
    src = tmp_path / "roads"
    sent = write_sample(src)
    up = cli_json(server, "projects", "upload", str(src))
    assert up["name"] == "roads" and isinstance(up["id"], int)

    out = tmp_path / "out"
    down = cli_json(server, "projects", "download", str(up["id"]), str(out))
    assert down["id"] == up["id"] and down["dir"] == str(out.resolve())
    got = tree(out)
    # every file uploaded comes back byte for byte; the image that had no ann file gets an empty one
    assert {k: v for k, v in got.items() if k in sent} == sent
    assert set(got) - set(sent) == {"val/ann/bare.png.json"}
    assert json.loads(got["val/ann/bare.png.json"])["size"] == {"height": 7, "width": 9}
    assert json.loads(got["val/ann/bare.png.json"])["objects"] == []


def test_plain_folder_still_uploads_and_downloads_as_a_supervisely_project(server, tmp_path):
    src = tmp_path / "plain"
    (src / "cats").mkdir(parents=True)
    files = {"top.png": png(5, 8), "cats/c1.png": png(12, 4, 30), "cats/notes.txt": b"no image"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    up = cli_json(server, "projects", "upload", str(src))
    shape: dict[str, list[str]] = {}
    for d, i in _project_items(server, up):
        shape.setdefault(d["name"], []).append(i["name"])
    assert shape == {"cats": ["c1.png", "notes.txt"], "ds0": ["top.png"]}

    out = tmp_path / "out"
    p = cli(server, "projects", "download", str(up["id"]), str(out))
    assert p.stdout.strip() == f"project {up['id']} plain: 3 files -> {out.resolve()}"
    got = tree(out)
    assert json.loads(got["meta.json"])["classes"] == [] and json.loads(got["meta.json"])["tags"] == []
    assert got["ds0/img/top.png"] == files["top.png"] and got["cats/img/c1.png"] == files["cats/c1.png"]
    assert got["cats/img/notes.txt"] == b"no image"
    assert json.loads(got["ds0/ann/top.png.json"]) == empty_ann(5, 8)
    assert json.loads(got["cats/ann/c1.png.json"]) == empty_ann(12, 4)
    assert "cats/ann/notes.txt.json" not in got  # the SDK lists only images as items


def test_nested_item_names_are_refused_on_download_and_nothing_is_written(server, tmp_path):
    src = tmp_path / "deep"
    (src / "train" / "sub").mkdir(parents=True)
    (src / "train" / "sub" / "x.png").write_bytes(png(3, 3))
    up = cli_json(server, "projects", "upload", str(src))
    out = tmp_path / "out"
    p = cli(server, "projects", "download", str(up["id"]), str(out), ok=False)
    assert p.returncode == 1 and "'sub/x.png' is not a plain file name" in p.stderr
    assert not out.exists()


@pytest.mark.slow  # over 2 s: outside the fast lane
def test_download_into_a_non_empty_folder_needs_force(server, tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.png").write_bytes(png(2, 2))
    pid = str(cli_json(server, "projects", "upload", str(src))["id"])
    mid = str(cli_json(server, "models", "upload", str(src))["id"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for group, oid in (("projects", pid), ("models", mid)):
        p = cli(server, group, "download", oid, str(out), ok=False)
        assert p.returncode == 1 and "is not empty (give --force" in p.stderr
        assert tree(out) == {"keep.txt": b"mine"}
    cli(server, "projects", "download", pid, str(out), "--force")
    assert tree(out)["ds0/img/a.png"] == png(2, 2) and tree(out)["keep.txt"] == b"mine"


def test_model_round_trip_keeps_subfolders(server, tmp_path):
    src = tmp_path / "resnet"
    (src / "checkpoints" / "e1").mkdir(parents=True)
    files = {"config.json": b'{"lr": 0.1}', "model.pth": os.urandom(1 << 20), "checkpoints/e1/w.pth": b"w1"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    up = cli_json(server, "models", "upload", str(src))
    assert sorted(f["path"] for f in up["files"]) == sorted(files)
    out = tmp_path / "m"
    p = cli(server, "--json", "--progress", "models", "download", str(up["id"]), str(out))
    down = json.loads(p.stdout)
    assert down["id"] == up["id"] and down["hash"] == up["hash"] and down["dir"] == str(out.resolve())
    assert "100%" in p.stderr and "3 files" in p.stderr  # the bar, in bytes, reached its end
    assert tree(out) == files


def test_client_methods_are_the_cli_path(server, tmp_path):
    src = tmp_path / "lib"
    src.mkdir()
    (src / "a.png").write_bytes(png(6, 6))
    c = UserClient(server.url, server.admin_token)
    project = c.upload_project_dir(src)
    seen: list[Counts] = []
    got = c.download_project(project["id"], tmp_path / "out", progress=seen.append)
    assert got["id"] == project["id"] and seen[-1][1:5] == (1, 1, len(png(6, 6)), len(png(6, 6)))
    assert (tmp_path / "out" / "ds0" / "img" / "a.png").read_bytes() == png(6, 6)
    model = c.upload_model_dir(src)
    c.download_model(model["id"], tmp_path / "m")
    assert tree(tmp_path / "m") == {"a.png": png(6, 6)}


def test_broken_project_folder_is_a_clear_error(server, tmp_path):
    src = tmp_path / "bad"
    write_sample(src)
    (src / "val" / "ann" / "c.png.json").write_text('{"size": {"height": 16,}')
    p = cli(server, "projects", "upload", str(src), ok=False)
    assert p.returncode == 1 and p.stderr.startswith("error: val/ann/c.png.json: not valid JSON")


# --- against the loopback stub ---


def test_upload_sends_meta_and_annotations(tmp_path):
    src = tmp_path / "roads"
    sent = write_sample(src)
    with StubServer() as stub:
        up = cli_json(stub, "projects", "upload", str(src), "--name", "r")
    (path, body), *pages = stub.posted
    assert path == "/api/v1/projects" and body["name"] == "r" and up["id"] == 1
    assert body["meta"] == META and dumps(body["meta"]).encode() == sent["meta.json"]
    # the project is made with its datasets empty, and its items come a page at a time
    assert body["datasets"] == [{"name": "train", "items": []}, {"name": "val", "items": []}]
    assert [(p, b["dataset"], len(b["items"])) for p, b in pages] == [
        ("/api/v1/projects/1/items", "train", 2),
        ("/api/v1/projects/1/items", "val", 2),
    ]
    assert dataset_counts(up["datasets"]) == [{"name": "train", "items_count": 2}, {"name": "val", "items_count": 2}]
    items = stub.items()
    assert sorted(items) == [("train", "a.png"), ("train", "b.png"), ("val", "bare.png"), ("val", "c.png")]
    for (ds, name), item in items.items():
        assert item["sha256"] == hashlib.sha256(sent[f"{ds}/img/{name}"]).hexdigest()
        assert stub.blobs[item["sha256"]] == sent[f"{ds}/img/{name}"]
        if name == "bare.png":
            assert "ann" not in item
        else:
            assert dumps(item["ann"]).encode() == sent[f"{ds}/ann/{name}.json"]
    # every blob went in one bulk upload, none by its own PUT
    assert [r for r in stub.requests if "/blobs/" in r] == ["POST /api/v1/blobs/check", "POST /api/v1/blobs/upload"]


def _stub_project(stub: StubServer, datasets: list[tuple[str, list[tuple[str, bytes, dict | None]]]], **extra) -> dict:
    project = {
        "id": 1,
        "name": "p",
        "meta": META,
        "datasets": [
            {
                "name": ds,
                "items": [
                    {"name": n, "sha256": stub.add_blob(b), "size": len(b), **({"ann": a} if a is not None else {})}
                    for n, b, a in items
                ],
            }
            for ds, items in datasets
        ],
        **extra,
    }
    stub.projects[1] = project
    return project


def test_download_writes_stored_annotations_byte_identical(tmp_path):
    a = ann(4, 4, "d\u00e9j\u00e0")
    with StubServer() as stub:
        _stub_project(stub, [("train", [("x.png", png(4, 4), a)])])
        down = cli_json(stub, "projects", "download", "1", str(tmp_path / "out"))
    got = tree(tmp_path / "out")
    assert got["meta.json"] == dumps(META).encode()
    assert got["train/ann/x.png.json"] == dumps(a).encode() and b"d\\u00e9j\\u00e0" in got["train/ann/x.png.json"]
    assert dataset_counts(down["datasets"]) == [{"name": "train", "items_count": 1}]
    assert got["train/img/x.png"] == png(4, 4)


def test_items_named_png_that_are_not_images_download_with_a_warning(tmp_path):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # a header claiming 400 Mpx
    huge = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with StubServer() as stub:
        _stub_project(
            stub,
            [
                (
                    "ds",
                    [
                        ("fake.png", b"not an image", None),
                        ("huge.png", huge, None),
                        ("drawing.png", eps[:20], None),
                        ("real.png", png(3, 2), None),
                    ],
                )
            ],
        )
        p = cli(stub, "--json", "projects", "download", "1", str(tmp_path / "out"))
    got = tree(tmp_path / "out")
    assert got["ds/img/fake.png"] == b"not an image" and got["ds/img/huge.png"] == huge
    assert got["ds/img/drawing.png"] == eps[:20]
    for name in ("fake.png", "huge.png", "drawing.png"):
        assert json.loads(got[f"ds/ann/{name}.json"]) == empty_ann(None, None)
        assert f"ds/{name}: " in p.stderr
    assert json.loads(got["ds/ann/real.png.json"]) == empty_ann(3, 2)
    assert len(json.loads(p.stdout)["warnings"]) == 3


@pytest.mark.parametrize("ds", ["../up", "..", "meta.json", "a/b", "/tmp/abs"])
def test_hostile_dataset_names_are_refused_before_anything_is_written(tmp_path, ds):
    with StubServer() as stub:
        _stub_project(stub, [("ok", [("fine.png", png(2, 2), None)]), (ds, [("x.png", b"evil", None)])])
        p = cli(stub, "projects", "download", "1", str(tmp_path / "a" / "out"), ok=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "refusing" in p.stderr
    assert tree(tmp_path) == {}  # not even the target folder was made


@pytest.mark.parametrize("item", ["../../escaped.png", "/tmp/abs.png", "a/b.png", "..", "c:x.png"])
@pytest.mark.parametrize("first", [True, False])
def test_hostile_item_names_are_refused_before_their_page_is_written(tmp_path, item, first):
    """Items are read a page at a time: a page with a bad name is refused before any of its files is
    written (on the first page: before anything is; later: after the pages before it are written
    whole), and nothing ever lands outside the folder."""
    hostile = ("bad", [("fine2.png", png(3, 3), None), (item, b"evil", None)])
    datasets = [hostile, ("ok", [("fine.png", png(2, 2), None)])]
    with StubServer() as stub:
        _stub_project(stub, datasets if first else datasets[::-1])
        p = cli(stub, "projects", "download", "1", str(tmp_path / "a" / "out"), ok=False)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "refusing" in p.stderr
    got = tree(tmp_path)
    assert all(k.startswith("a/out/") for k in got) and b"evil" not in got.values()
    assert "a/out/bad/img/fine2.png" not in got  # nothing of the refused page
    if first:
        assert got == {} and not (tmp_path / "a").exists()  # not even the target folder was made
    else:
        assert got["a/out/ok/img/fine.png"] == png(2, 2)


def test_hostile_model_paths_are_refused(tmp_path):
    with StubServer() as stub:
        stub.models[1] = {
            "id": 1,
            "name": "m",
            "hash": "h",
            "files": [
                {"path": "ok.bin", "sha256": stub.add_blob(b"ok"), "size": 2},
                {"path": "../../evil.bin", "sha256": stub.add_blob(b"evil"), "size": 4},
            ],
        }
        p = cli(stub, "models", "download", "1", str(tmp_path / "out"), ok=False)
    assert p.returncode == 1 and "'../../evil.bin'" in p.stderr
    assert tree(tmp_path) == {}


def test_bytes_that_do_not_match_the_hash_are_not_kept(tmp_path):
    with StubServer() as stub:
        _stub_project(stub, [("ds", [("x.png", png(3, 3), None)])])
        sha = stub.projects[1]["datasets"][0]["items"][0]["sha256"]
        stub.blobs[sha] = png(3, 3, 99)  # the server sends other bytes
        p = cli(stub, "projects", "download", "1", str(tmp_path / "out"), ok=False)
    assert p.returncode == 1 and f"not {sha}" in p.stderr
    assert [f for f in tree(tmp_path / "out") if "/img/" in f] == []  # no image, no .part left


# --- the SDK opens what the CLI downloads ---


def sdk_python(tmp_dir: Path) -> str | None:
    """An interpreter with the supervisely SDK: $SLY_SDK_PYTHON, this one if it has it, else this one
    with the SDK site-packages that tools/sdk_image.py installs (and caches) for the SDK test image."""
    exe = os.environ.get("SLY_SDK_PYTHON") or sys.executable
    if subprocess.run([exe, "-c", "import supervisely"], capture_output=True, timeout=120).returncode == 0:
        return exe
    from tools.sdk_image import SiteUnavailable, ensure_site

    try:
        site = ensure_site(log=lambda *_: None)
    except SiteUnavailable:
        return None
    wrapper = tmp_dir / "sdk-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    ok = subprocess.run([str(wrapper), "-c", "import supervisely"], capture_output=True, timeout=300).returncode == 0
    return str(wrapper) if ok else None


SDK_WRITE = """
import sys, numpy as np, supervisely as sly
meta = sly.ProjectMeta(
    obj_classes=[sly.ObjClass("car", sly.Rectangle), sly.ObjClass("road", sly.Polygon),
                 sly.ObjClass("sky", sly.Bitmap)],
    tag_metas=[sly.TagMeta("sunny", sly.TagValueType.NONE),
               sly.TagMeta("weather", sly.TagValueType.ONEOF_STRING, possible_values=["rain", "snow"])])
p = sly.Project(sys.argv[1], sly.OpenMode.CREATE)
p.set_meta(meta)
for ds_name in ("train", "val"):
    ds = p.create_dataset(ds_name)
    for k in range(2):
        mask = np.zeros((20 + k, 30), bool); mask[2:5, 3:9] = True
        labels = [sly.Label(sly.Rectangle(1, 2, 10, 12), meta.get_obj_class("car")),
                  sly.Label(sly.Polygon([sly.PointLocation(0, 0), sly.PointLocation(5, 9), sly.PointLocation(10, 1)]),
                            meta.get_obj_class("road")),
                  sly.Label(sly.Bitmap(mask), meta.get_obj_class("sky"))]
        tags = [sly.Tag(meta.get_tag_meta("sunny")), sly.Tag(meta.get_tag_meta("weather"), "snow")]
        ds.add_item_np(f"im{k}.png", np.full((20 + k, 30, 3), 40 * k, np.uint8),
                       ann=sly.Annotation((20 + k, 30), labels=labels, img_tags=tags, img_description="caf\\u00e9"))
"""

SDK_READ = """
import json, sys, supervisely as sly
p = sly.Project(sys.argv[1], sly.OpenMode.READ)
out = {}
for ds in p.datasets:
    for name in ds.get_items_names():
        a = ds.get_ann(name, p.meta)
        out[ds.name + "/" + name] = {"size": list(a.img_size), "labels": sorted(l.obj_class.name for l in a.labels),
                                     "tags": sorted(t.name for t in a.img_tags)}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sdk(tmp_path_factory):
    exe = sdk_python(tmp_path_factory.mktemp("sdk"))
    if exe is None:
        pytest.skip(
            "the supervisely SDK could not be installed (no PyPI?); SLY_SDK_PYTHON names an interpreter with it"
        )
    return exe


def sdk_round_trip(sdk: str, server, tmp_path: Path) -> dict:
    """An SDK-made project uploaded and downloaded with the CLI: every file identical, then read by the SDK."""
    src = tmp_path / "sdk-made"
    subprocess.run([sdk, "-c", SDK_WRITE, str(src)], check=True, timeout=300, capture_output=True)
    up = cli_json(server, "projects", "upload", str(src))
    out = tmp_path / "out"
    cli(server, "projects", "download", str(up["id"]), str(out))
    assert tree(out) == tree(src)  # the SDK's own bytes, every file
    read = subprocess.run([sdk, "-c", SDK_READ, str(out)], check=True, timeout=300, capture_output=True, text=True)
    items = json.loads(read.stdout)
    assert sorted(items) == ["train/im0.png", "train/im1.png", "val/im0.png", "val/im1.png"]
    assert all(v["labels"] == ["car", "road", "sky"] and v["tags"] == ["sunny", "weather"] for v in items.values())
    assert items["val/im1.png"]["size"] == [21, 30]
    return items


@pytest.mark.slow
def test_the_sdk_opens_what_it_wrote_after_a_round_trip_through_a_storing_server(sdk, tmp_path):
    with StubServer() as stub:  # stores the project exactly as POSTed, meta and anns included
        sdk_round_trip(sdk, stub, tmp_path)


@pytest.mark.slow
def test_the_sdk_opens_what_it_wrote_after_a_round_trip_through_the_server(sdk, server, tmp_path):
    sdk_round_trip(sdk, server, tmp_path)


@pytest.mark.slow
def test_the_sdk_opens_a_downloaded_plain_project(sdk, server, tmp_path):
    src = tmp_path / "plain"
    (src / "b").mkdir(parents=True)
    (src / "a.png").write_bytes(png(5, 7))
    (src / "b" / "c.png").write_bytes(png(9, 3))
    pid = str(cli_json(server, "projects", "upload", str(src))["id"])
    cli(server, "projects", "download", pid, str(tmp_path / "out"))
    read = subprocess.run(
        [sdk, "-c", SDK_READ, str(tmp_path / "out")], check=True, timeout=300, capture_output=True, text=True
    )
    assert json.loads(read.stdout) == {
        "ds0/a.png": {"size": [5, 7], "labels": [], "tags": []},
        "b/c.png": {"size": [9, 3], "labels": [], "tags": []},
    }
