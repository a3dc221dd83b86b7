"""Projects and models moved in bulk (protocol/bulk.py) by the client: many blobs per request,
items a page at a time. Against the real server for the round trip, and against the loopback stub
(tests/cli/stub_server.py), which counts what crossed the wire and can send wrong or cut bytes."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from client import UserClient, download, sly_format, upload
from client.cli import TextBar
from client.sly_format import BadProject
from client.transfer import Counts
from protocol import bulk
from protocol.sly_format import dumps, empty_ann
from tests.cli.sly_sample import META, ann, png
from tests.cli.stub_server import StubServer
from tests.cli.test_cli import cli
from tests.support.server import dataset_counts


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_project(root: Path, sizes: dict[str, int], shared: int = 0) -> dict[str, bytes]:
    """A Supervisely project with `sizes[ds]` items per dataset: every third item without an
    annotation file, and the first `shared` items of each dataset the same image bytes (one blob)."""
    files = {"meta.json": dumps(META).encode()}
    for ds, n in sizes.items():
        (root / ds / "img").mkdir(parents=True)
        (root / ds / "ann").mkdir()
        for k in range(n):
            name = f"im{k:05d}.png"
            files[f"{ds}/img/{name}"] = (
                png(8, 8) if k < shared else png(8, 8, k % 250) + k.to_bytes(4, "big") + ds.encode()
            )
            if k % 3:
                files[f"{ds}/ann/{name}.json"] = dumps(ann(8, 8, f"{ds} {k}")).encode()
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def stages(seen: list[Counts]) -> dict[str, list[Counts]]:
    """The reports of each stage, checked to only go up, in the order the stages came."""
    out: dict[str, list[Counts]] = {}
    for c in seen:
        out.setdefault(c.stage, []).append(c)
    for reports in out.values():
        assert [c.files for c in reports] == sorted(c.files for c in reports)
        assert [c.nbytes for c in reports] == sorted(c.nbytes for c in reports)
    assert [c.stage for c in seen] == sorted((c.stage for c in seen), key=list(out).index)  # no stage came back
    return out


# --- against the real server ---


@pytest.mark.slow
def test_a_project_of_thousands_of_items_round_trips_through_the_server(server, tmp_path, monkeypatch):
    src = tmp_path / "big"
    sent = write_project(src, {"a": 1_200, "b": 900}, shared=5)
    monkeypatch.setattr(download, "PAGE_ITEMS", 500)  # several pages per dataset
    c = UserClient(server.url, server.admin_token)
    seen: list[Counts] = []
    up = c.upload_project_dir(src, progress=seen.append)
    assert dataset_counts(up["datasets"]) == [{"name": "a", "items_count": 1_200}, {"name": "b", "items_count": 900}]
    images = {k: v for k, v in sent.items() if "/img/" in k}
    size = sum(map(len, images.values()))
    up_stages = stages(seen)
    assert list(up_stages) == ["hashing", "sending", "items"]
    assert up_stages["sending"][-1][1:5] == (2_100, 2_100, size, size)
    assert up_stages["items"][-1][1:3] == (2_100, 2_100)

    seen.clear()
    out = tmp_path / "out"
    c.download_project(up["id"], out, progress=seen.append)
    got = tree(out)
    assert {k: v for k, v in got.items() if k in sent} == sent  # byte for byte, annotations included
    # the images without an annotation file got the empty one, with the size from their header
    assert set(got) - set(sent) == {
        f"{ds}/ann/im{k:05d}.png.json" for ds, n in (("a", 1_200), ("b", 900)) for k in range(0, n, 3)
    }
    assert json.loads(got["b/ann/im00003.png.json"]) == empty_ann(8, 8)
    assert seen[-1][1:5] == (2_100, 2_100, size, size)


# --- against the stub: what crosses the wire ---


def test_a_second_upload_sends_no_blob_bytes(tmp_path):
    src = tmp_path / "p"
    write_project(src, {"a": 30, "b": 20}, shared=4)
    with StubServer() as stub:
        c = UserClient(stub.url, stub.admin_token)
        c.upload_project_dir(src)
        assert len(stub.uploaded) == len(set(stub.uploaded)) == 50 - 2 * 4 + 1  # each blob once
        assert [r for r in stub.requests if "/blobs" in r] == ["POST /api/v1/blobs/check", "POST /api/v1/blobs/upload"]
        before = len(stub.requests)
        c.upload_project_dir(src, name="again")
        again = stub.requests[before:]
    assert len(stub.uploaded) == 50 - 2 * 4 + 1  # not one more blob
    assert [r for r in again if "/blobs" in r] == ["POST /api/v1/blobs/check"]
    assert stub.items(1) == stub.items(2)


def test_small_blobs_go_in_parallel_batches_and_big_ones_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "SMALL_BLOB", 1_000)
    monkeypatch.setattr(upload, "MIN_BATCH_FILES", 1)
    monkeypatch.setattr(download, "MIN_BATCH_FILES", 1)
    src = tmp_path / "m"
    (src / "w").mkdir(parents=True)
    files = {f"w/s{k}.bin": bytes([k]) * (10 + k) for k in range(8)} | {"big.bin": b"B" * 5_000}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    with StubServer() as stub:
        c = UserClient(stub.url, stub.admin_token)
        model = c.upload_model_dir(src, parallel=4)
        sent = [r for r in stub.requests if "/blobs" in r]
        assert sent.count("POST /api/v1/blobs/upload") == 4  # 8 small files over 4 requests in flight
        assert sent.count(f"PUT /api/v1/blobs/{hashlib.sha256(files['big.bin']).hexdigest()}") == 1
        before = len(stub.requests)
        c.download_model(model["id"], tmp_path / "out", parallel=2)
        fetched = [r for r in stub.requests[before:] if "/blobs" in r]
    assert tree(tmp_path / "out") == files
    assert sorted(len(a) for a in stub.asked) == [4, 4]  # two batches for two requests in flight
    assert fetched.count(f"GET /api/v1/blobs/{hashlib.sha256(files['big.bin']).hexdigest()}") == 1


def test_items_sharing_a_blob_are_fetched_once(tmp_path):
    same = png(5, 5)
    with StubServer() as stub:
        sha = stub.add_blob(same)
        stub.projects[1] = {
            "id": 1,
            "name": "p",
            "meta": META,
            "datasets": [
                {"name": d, "items": [{"name": f"{d}{k}.png", "sha256": sha, "size": len(same)} for k in range(3)]}
                for d in ("x", "y")
            ],
        }
        UserClient(stub.url, stub.admin_token).download_project(1, tmp_path / "out")
    assert stub.asked == [[sha]]
    got = tree(tmp_path / "out")
    assert [k for k in got if "/img/" in k] == [f"{d}/img/{d}{k}.png" for d in ("x", "y") for k in range(3)]
    assert all(v == same for k, v in got.items() if "/img/" in k)


def _stub_items(stub: StubServer, sizes: dict[str, int]) -> dict[str, bytes]:
    """A stored project of `sizes[ds]` items per dataset, each with its annotation; returns the images."""
    images = {}
    datasets = []
    for ds, n in sizes.items():
        items = []
        for k in range(n):
            data = png(6, 6, k) + ds.encode()
            images[f"{ds}/img/i{k}.png"] = data
            items.append(
                {"name": f"i{k}.png", "sha256": stub.add_blob(data), "size": len(data), "ann": ann(6, 6, f"{ds}{k}")}
            )
        datasets.append({"name": ds, "items": items})
    stub.projects[1] = {"id": 1, "name": "p", "meta": META, "datasets": datasets}
    return images


def test_items_are_paged_across_dataset_boundaries(tmp_path):
    with StubServer() as stub:
        stub.page_size = 3
        images = _stub_items(stub, {"a": 7, "empty": 0, "b": 3, "c": 1})
        seen: list[Counts] = []
        UserClient(stub.url, stub.admin_token).download_project(1, tmp_path / "out", progress=seen.append)
    pages = [r for r in stub.requests if r == "GET /api/v1/projects/1/items"]
    assert len(pages) == 3 + 1 + 1 + 1
    got = tree(tmp_path / "out")
    assert {k: v for k, v in got.items() if "/img/" in k} == images
    assert got["a/ann/i6.png.json"] == dumps(ann(6, 6, "a6")).encode()
    assert got["c/ann/i0.png.json"] == dumps(ann(6, 6, "c0")).encode()
    assert (tmp_path / "out" / "empty" / "img").is_dir()
    assert stages(seen)["receiving"][-1][1:5] == (
        11,
        11,
        sum(map(len, images.values())),
        sum(map(len, images.values())),
    )


def test_a_name_repeated_on_a_later_page_is_refused(tmp_path):
    with StubServer() as stub:
        stub.page_size = 3
        _stub_items(stub, {"a": 5})
        stub.projects[1]["datasets"][0]["items"][4]["name"] = "i1.png"  # page 2 repeats a page 1 name
        with pytest.raises(BadProject, match="'i1.png' appears twice in dataset 'a'"):
            UserClient(stub.url, stub.admin_token).download_project(1, tmp_path / "out")
    got = tree(tmp_path / "out")
    # the page before is written whole, annotations included; nothing of the refused one
    assert sorted(k for k in got if k != "meta.json") == [
        f"a/{d}/i{k}.png{e}" for d, e in (("ann", ".json"), ("img", "")) for k in range(3)
    ]


def test_a_blob_with_the_wrong_bytes_is_refused_and_not_written(tmp_path):
    with StubServer() as stub:
        images = _stub_items(stub, {"a": 3})
        bad = stub.projects[1]["datasets"][0]["items"][1]["sha256"]
        stub.blobs[bad] = b"other bytes"  # the server sends these under that sha256
        p = cli(stub, "projects", "download", "1", str(tmp_path / "out"), ok=False)
    assert p.returncode == 1 and f"not {bad}" in p.stderr
    got = tree(tmp_path / "out")
    assert "a/img/i1.png" not in got and not [k for k in got if k.endswith(".part")]
    assert all(images[k] == v for k, v in got.items() if "/img/" in k)  # what was kept is right


@pytest.mark.parametrize("cut", ["in an entry", "in a header", "at an entry's end"])
def test_a_download_cut_short_leaves_no_partial_file(tmp_path, cut):
    with StubServer() as stub:
        images = _stub_items(stub, {"a": 3})
        first = len(images["a/img/i0.png"])
        entry = bulk.BLOCK + first + (-first % bulk.BLOCK)
        stub.cut_download_after = {
            "in an entry": entry + bulk.BLOCK + 7,
            "in a header": entry + 100,
            "at an entry's end": entry,
        }[cut]
        with pytest.raises(download.DownloadError, match="broke off|did not send 2 of the blobs"):
            UserClient(stub.url, stub.admin_token).download_project(1, tmp_path / "out")
    got = tree(tmp_path / "out")
    assert not [k for k in got if k.endswith(".part")]
    assert {k: v for k, v in got.items() if "/img/" in k} == {"a/img/i0.png": images["a/img/i0.png"]}
    assert [k for k in got if "/ann/" in k] == ["a/ann/i0.png.json"]  # an annotation follows its image


def test_a_busy_bulk_upload_is_sent_again_whole(tmp_path):
    src = tmp_path / "p"
    write_project(src, {"a": 6})
    seen: list[Counts] = []
    with StubServer() as stub:
        stub.busy = 2
        UserClient(stub.url, stub.admin_token).upload_project_dir(src, progress=seen.append)
    assert [r for r in stub.requests if "/blobs" in r] == ["POST /api/v1/blobs/check"] + [
        "POST /api/v1/blobs/upload"
    ] * 3
    assert len(stub.uploaded) == 6 and len(stub.items()) == 6  # the third try carried every file
    last = stages(seen)["sending"][-1]
    assert (last.files, last.nbytes) == (6, last.bytes_total)  # each file counted once over the three tries


# --- uploads in pages ---


@pytest.mark.parametrize("limit", ["items", "json bytes", "bitmap bytes"])
def test_items_are_added_in_pages_within_each_limit(tmp_path, monkeypatch, limit):
    src = tmp_path / "p"
    files = write_project(src, {"a": 7, "b": 2})
    if limit == "items":
        monkeypatch.setattr(upload, "PAGE_ITEMS", 3)
    elif limit == "json bytes":  # about two annotated items a page
        monkeypatch.setattr(
            upload, "PAGE_JSON_BYTES", 2 * (len(files["a/ann/im00001.png.json"]) + upload.ITEM_JSON_BYTES)
        )
    else:  # each sample annotation inflates one bitmap: two per request
        meta, datasets = sly_format.read_folder(src)
        sly_format.check_folder(src, meta, datasets)
        [cost] = {i.mask_bytes for d in datasets for i in d.items if i.ann_file}
        monkeypatch.setattr(upload, "MAX_REQUEST_MASK_BYTES", 2 * cost + 1)
    with StubServer() as stub:
        UserClient(stub.url, stub.admin_token).upload_project_dir(src)
    pages = [(b["dataset"], [i["name"] for i in b["items"]]) for p, b in stub.posted if p.endswith("/items")]
    assert [n for _, ns in pages for n in ns] == [f"im{k:05d}.png" for k in range(7)] + ["im00000.png", "im00001.png"]
    assert [ds for ds, _ in pages] == sorted(ds for ds, _ in pages)  # a page holds one dataset's items
    if limit == "items":
        assert [len(ns) for _, ns in pages] == [3, 3, 1, 2]
    else:  # items 0, 3, 6 have no annotation (no bytes, no bitmaps): pages of two annotated ones
        annotated = [sum(1 for n in ns if int(n[2:7]) % 3) for _, ns in pages]
        assert max(annotated) == 2 and len(pages) > 2
    assert {
        (ds, i["name"]): i.get("ann")
        for ds, i in ((d["name"], i) for d in stub.projects[1]["datasets"] for i in d["items"])
    } == {
        (ds, f"im{k:05d}.png"): (json.loads(files[f"{ds}/ann/im{k:05d}.png.json"]) if k % 3 else None)
        for ds, n in (("a", 7), ("b", 2))
        for k in range(n)
    }


def test_a_file_that_changed_after_hashing_is_an_error_and_no_project_is_made(tmp_path, monkeypatch):
    src = tmp_path / "p"
    write_project(src, {"a": 4})
    real = upload.hash_files

    def stale(paths, tally):  # what a file rewritten between hashing and sending looks like
        shas, sizes = real(paths, tally)
        return [hashlib.sha256(b"before").hexdigest(), *shas[1:]], sizes

    monkeypatch.setattr(upload, "hash_files", stale)
    with StubServer() as stub:
        with pytest.raises(
            upload.UploadError, match=r"^a/img/im00000\.png: its bytes changed while it was being uploaded"
        ):
            UserClient(stub.url, stub.admin_token).upload_project_dir(src)
    assert stub.posted == [] and stub.projects == {}


# --- progress and the command line ---


def test_progress_counts_files_and_bytes_of_each_stage(tmp_path):
    src = tmp_path / "p"
    files = write_project(src, {"a": 5, "b": 4}, shared=2)
    images = sum(len(v) for k, v in files.items() if "/img/" in k)
    with StubServer() as stub:
        c = UserClient(stub.url, stub.admin_token)
        seen: list[Counts] = []
        c.upload_project_dir(src, progress=seen.append)
        up = stages(seen)
        seen.clear()
        c.download_project(1, tmp_path / "out", progress=seen.append)
        down = stages(seen)
    assert list(up) == ["hashing", "sending", "items"]
    assert up["hashing"][-1][1:5] == (9, 9, images, None)
    assert up["sending"][0][1:5] == (0, 9, 0, images)
    # the three images with the bytes of one already being sent count as done at once
    assert up["sending"][1][1:3] == (3, 9)
    assert up["sending"][-1][1:5] == (9, 9, images, images)
    assert up["items"][-1][1:3] == (9, 9)
    assert list(down) == ["receiving"] and down["receiving"][0][1:3] == (0, 9)
    assert down["receiving"][-1][1:5] == (9, 9, images, images)


def test_the_bar_shows_files_and_bytes():
    out = io.StringIO()
    bar = TextBar("project roads", stream=out, width=10)
    bar(Counts("sending", 12_345, 20_000, 1_258_291, 1_887_437, "x.png"))
    bar(Counts("receiving", 3, 9, 2048, None))
    line1, line2 = out.getvalue().split("\r")[1:]
    assert line1 == "project roads sending [######....]  67% 12,345/20,000 files, 1.2 MiB/1.8 MiB x.png"
    assert line2.rstrip() == "project roads receiving [###.......]  33% 3/9 files, 2.0 KiB"
    assert len(line2) >= len(line1)  # a shorter line blanks what the longer one left


def test_parallel_is_bounded_on_the_command_line(tmp_path):
    with StubServer() as stub:
        for bad in ("0", "33", "x"):
            p = cli(stub, "projects", "upload", str(tmp_path), "--parallel", bad, ok=False)
            assert p.returncode == 2 and "--parallel" in p.stderr
        assert stub.requests == []
