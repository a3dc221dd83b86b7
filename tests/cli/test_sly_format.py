"""Reading and writing the Supervisely project folder (client/sly_format.py) without a server, and
`projects upload` refusing a folder the server would refuse before it sends anything (loopback stub)."""

from __future__ import annotations

import base64
import json
import zlib

import pytest

from client import download, sly_format
from client.sly_format import BadProject
from protocol.sly_format import dumps
from tests.cli.sly_sample import META, ann, png, write_sample
from tests.cli.stub_server import StubServer
from tests.cli.test_cli import cli


def test_reads_meta_datasets_items_and_annotations(tmp_path):
    files = write_sample(tmp_path)
    (tmp_path / "README.md").write_text("not part of the project")
    (tmp_path / "notes").mkdir()  # a folder without img/ or ann/ is no dataset
    (tmp_path / "train" / "img" / ".DS_Store").write_bytes(b"\0")  # not an image: the SDK skips it too
    meta, datasets = sly_format.read_folder(tmp_path)
    assert meta == META and list(meta) == list(META)  # key order kept
    assert [(d.name, [i.name for i in d.items]) for d in datasets] == [
        ("train", ["a.png", "b.png"]),
        ("val", ["bare.png", "c.png"]),
    ]
    by_name = {(d.name, i.name): i for d in datasets for i in d.items}
    assert sly_format.load_ann(tmp_path, by_name["val", "bare.png"]) is None
    a = by_name["train", "a.png"]
    # annotations are read when asked for, not with the folder (a project may hold 10^6)
    assert (a.ann_file, by_name["val", "bare.png"].ann_file) == ("train/ann/a.png.json", None)
    got = sly_format.load_ann(tmp_path, a)
    assert dumps(got).encode() == files["train/ann/a.png.json"]
    assert [o["shape"] for o in got["objects"]] == ["rectangle", "polygon", "bitmap"]
    assert got["tags"] == [{"name": "sunny"}, {"name": "weather", "value": "snow"}]


def test_the_check_notes_what_each_items_bitmaps_cost(tmp_path):
    write_sample(tmp_path)
    meta, datasets = sly_format.read_folder(tmp_path)
    sly_format.check_folder(tmp_path, meta, datasets)
    cost = {(d.name, i.name): i.mask_bytes for d in datasets for i in d.items}
    # each sample annotation has one 6x3 bitmap; the bare image has none
    assert cost[("val", "bare.png")] == 0
    assert all(v > 0 for k, v in cost.items() if k[1] != "bare.png")


def test_old_style_annotation_name_is_read(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps(META))
    (tmp_path / "ds" / "img").mkdir(parents=True)
    (tmp_path / "ds" / "ann").mkdir()
    (tmp_path / "ds" / "img" / "x.png").write_bytes(png(4, 5))
    (tmp_path / "ds" / "ann" / "x.json").write_text(json.dumps(ann(4, 5)))
    _, [ds] = sly_format.read_folder(tmp_path)
    assert sly_format.load_ann(tmp_path, ds.items[0]) == ann(4, 5)


@pytest.mark.parametrize(
    "rel, content, expected",
    [
        ("meta.json", "{\"classes\": [", "meta.json: not valid JSON"),
        ("meta.json", "[1, 2]", "meta.json: a JSON object was expected, not list"),
        ("train/ann/a.png.json", "{\"size\": }", "train/ann/a.png.json: not valid JSON"),
        ("train/ann/b.png.json", b"\xff\xfe{}", "train/ann/b.png.json: not UTF-8"),
    ],
)
def test_broken_json_names_the_file(tmp_path, rel, content, expected):
    write_sample(tmp_path)
    (tmp_path / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(BadProject, match=expected.replace(".", r"\.")):
        meta, datasets = sly_format.read_folder(tmp_path)
        sly_format.check_folder(tmp_path, meta, datasets)


def test_nested_datasets_are_refused_with_a_reason(tmp_path):
    write_sample(tmp_path)
    (tmp_path / "train" / "datasets" / "child" / "img").mkdir(parents=True)
    with pytest.raises(BadProject, match="train/datasets/: nested datasets are not supported"):
        sly_format.read_folder(tmp_path)


def test_project_without_images_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "ds" / "img").mkdir(parents=True)
    with pytest.raises(BadProject, match="no images"):
        sly_format.read_folder(tmp_path)


def test_is_supervisely_needs_meta_at_the_top(tmp_path):
    assert not sly_format.is_supervisely(tmp_path)
    (tmp_path / "meta.json").mkdir()
    assert not sly_format.is_supervisely(tmp_path)
    (tmp_path / "meta.json").rmdir()
    (tmp_path / "meta.json").write_text("{}")
    assert sly_format.is_supervisely(tmp_path)


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../evil.png", "a/b.png", "/etc/passwd", "a\\b.png", "C:x.png", "x\x00.png", None, 7]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(BadProject):
        sly_format.check_name(name, "item name")
    with pytest.raises(BadProject):
        download.check_item_names("ds", [{"name": name}], set())
    with pytest.raises(BadProject):
        download.check_dataset_names([{"name": name}])


def test_project_names_may_not_collide_or_shadow_meta():
    with pytest.raises(BadProject, match="meta file"):
        download.check_dataset_names([{"name": "meta.json"}])
    with pytest.raises(BadProject, match="twice"):
        download.check_dataset_names([{"name": "a"}, {"name": "a"}])
    with pytest.raises(BadProject, match="twice"):
        download.check_item_names("a", [{"name": "x.png"}, {"name": "x.png"}], set())
    seen: set[str] = set()
    download.check_item_names("a", [{"name": "x.png"}, {"name": "..x.png"}], seen)
    # a name of an earlier page of the dataset counts too
    with pytest.raises(BadProject, match="'x.png' appears twice in dataset 'a'"):
        download.check_item_names("a", [{"name": "y.png"}, {"name": "x.png"}], seen)


@pytest.mark.parametrize("path", ["../w.bin", "a/../../w.bin", "/abs/w.bin", "a//w.bin", "", "a/./w.bin"])
def test_unsafe_model_paths_are_refused(path):
    with pytest.raises(BadProject):
        sly_format.check_relpath(path, "model file")


def test_model_subfolders_are_fine():
    assert sly_format.check_relpath("checkpoints/epoch_1/w.pth", "model file") == "checkpoints/epoch_1/w.pth"


def test_prepare_dir_refuses_a_non_empty_folder_unless_forced(tmp_path):
    assert download.prepare_dir(tmp_path / "new" / "deep", force=False).is_dir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(download.DownloadError, match="not empty"):
        download.prepare_dir(tmp_path / "full", force=False)
    assert download.prepare_dir(tmp_path / "full", force=True) == (tmp_path / "full").resolve()
    with pytest.raises(download.DownloadError, match="not a folder"):
        download.prepare_dir(tmp_path / "full" / "x", force=True)


def _edit(root, rel: str, change) -> None:
    obj = json.loads((root / rel).read_text())
    change(obj)
    (root / rel).write_text(dumps(obj))


@pytest.mark.parametrize(
    "rel, change, words",
    [
        (
            "val/ann/c.png.json",
            lambda a: a["objects"][0].update(classTitle="dog"),
            "val/ann/c.png.json, object 1: classTitle 'dog' is not a class of the meta",
        ),
        (
            "train/ann/b.png.json",
            lambda a: a["objects"][2]["bitmap"].update(data=base64.b64encode(zlib.compress(png(40, 40))).decode()),
            "train/ann/b.png.json, object 3: bitmap PNG is 40x40, larger than its image (30x21)",
        ),
        (
            "train/ann/a.png.json",
            lambda a: a["tags"].append({"name": "weather", "value": "hail"}),
            "train/ann/a.png.json: tag 3 ('weather', oneof_string) cannot have the value 'hail'",
        ),
        (
            "train/ann/a.png.json",
            lambda a: a.update(size={"height": 0, "width": 30}),
            "train/ann/a.png.json: the annotation's size must be",
        ),
        (
            "meta.json",
            lambda m: m["classes"][0].update(color="red"),
            "meta.json: class 'car': color 'red' is not '#RRGGBB'",
        ),
    ],
)
def test_upload_checks_every_file_before_sending_anything(tmp_path, rel, change, words):
    src = tmp_path / "roads"
    write_sample(src)
    _edit(src, rel, change)
    with StubServer() as stub:
        p = cli(stub, "projects", "upload", str(src), ok=False)
    assert p.returncode == 1 and p.stderr.startswith(f"error: {words}"), p.stderr
    assert stub.requests == [] and stub.blobs == {} and stub.posted == []


def test_upload_names_the_first_bad_file(tmp_path):
    write_sample(tmp_path)
    for rel in ("val/ann/c.png.json", "train/ann/b.png.json"):
        _edit(tmp_path, rel, lambda a: a["objects"].append({"classTitle": "dog", "tags": []}))
    meta, datasets = sly_format.read_folder(tmp_path)
    with pytest.raises(BadProject, match=r"^train/ann/b\.png\.json, object 4: classTitle 'dog'"):
        sly_format.check_folder(tmp_path, meta, datasets)
