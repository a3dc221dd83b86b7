"""The agent's side of bulk transfer: a project planned from pages, its small blobs fetched many
per request and hashed as they stream, results sent many per request, and a cached project
prepared again with no file created per item. Unit tests with a fake server object (wrong bytes,
a cut stream, blobs left out, a stop, two tasks at once), then the real server, then a real
container that hashes what it was given."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import secrets
import stat
import struct
import threading
import time
from pathlib import Path

import pytest

from node.api import BulkDownload
from node.config import Config
from protocol import bulk, sly_format
from tests.workers.ctx import TestContext
from workers import cache, custom, downloads, results, uploads
from workers.downloads import Downloader, plan, plan_pages, write_project_files
from workers.errors import StopRequested, TaskError


def blob(i: int, tag: str = "") -> bytes:
    return f"blob {tag} {i} ".encode() * (1 + i % 7)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ann_of(i: int) -> dict:
    return sly_format.empty_ann(10 + i, 20 + i) | {"tags": [{"name": "n", "value": str(i)}]}


class FakeServer:
    """What a Downloader asks of `ctx.api`, served from memory, with the faults a test orders:
    `corrupt[sha]` (that many answers with wrong bytes), `left_out[sha]` (that many answers without
    it), `cuts` (per request: the stream cut after that many bytes), `on_entry(sha)`."""

    def __init__(self, blobs: dict[str, bytes], items: list[dict] | None = None, page: int = 100):
        self.blobs = blobs
        self.items = items or []
        self.page = page
        self.requests: list[list[str]] = []
        self.pages: list[int] = []
        self.gets: list[str] = []
        self.corrupt: dict[str, int] = {}
        self.left_out: dict[str, int] = {}
        self.cuts: list[int | None] = []
        self.on_page = None
        self.on_request = None
        self.on_entry = None
        self.delay = 0.0

    @contextlib.contextmanager
    def download_blobs(self, hashes):
        self.requests.append(list(hashes))
        if self.on_request is not None:
            self.on_request(self.requests[-1])
        stream, missing = b"", 0
        for h in dict.fromkeys(hashes):
            if h not in self.blobs or self.left_out.get(h, 0) > 0:
                self.left_out[h] = self.left_out.get(h, 0) - 1
                missing += 1
                continue
            data = self.blobs[h]
            if self.corrupt.get(h, 0) > 0:
                self.corrupt[h] -= 1
                data = bytes([data[0] ^ 1]) + data[1:]
            stream += bulk.header(h, len(data)) + data + bulk.padding(len(data))
        stream += bulk.TAR_END
        cut = self.cuts.pop(0) if self.cuts else None
        if cut is not None:
            stream = stream[:cut]
        yield BulkDownload(self._entries(bulk.iter_entries(io.BytesIO(stream))), missing)

    def _entries(self, entries):
        for entry in entries:
            if self.delay:
                time.sleep(self.delay)
            yield entry
            if self.on_entry is not None:
                self.on_entry(entry[0])

    def get_blob(self, h, dest, *, size=None, on_bytes=None, timeout=60):
        self.gets.append(h)
        with open(dest, "wb") as f:
            f.write(self.blobs[h])
        return sha(self.blobs[h])

    def project_items(self, task_id, cursor=None, limit=5000):
        start = int(cursor or 0)
        self.pages.append(start)
        if self.on_page is not None:
            self.on_page(start)
        page = self.items[start : start + self.page]
        end = start + len(page)
        return page, (str(end) if end < len(self.items) else None)


def make_ctx(root, api, task_id: int = 7, project: dict | None = None, **config) -> TestContext:
    cfg = Config(
        server_address="http://127.0.0.1:9",
        access_token="t" * 32,
        host_dir=str(root),
        agent_dir=str(root),
        min_free_disk_mb=1,
        **config,
    )
    ctx = TestContext({"id": task_id, "type": "custom", "project": project}, cfg)
    ctx.api = api
    (ctx.task_dir / "data").mkdir(parents=True, exist_ok=True)
    return ctx


def project_of(items: list[dict], counts: dict[str, int] | None = None, name: str = "proj") -> dict:
    """A poll answer's project of these items: datasets with their counts, the items paged."""
    if counts is None:
        counts = {}
        for it in items:
            counts[it["dataset"]] = counts.get(it["dataset"], 0) + 1
    return {
        "id": 1,
        "name": name,
        "meta": {"classes": [], "tags": []},
        "datasets": [{"name": d, "items_count": n} for d, n in counts.items()],
    }


def items_of(blobs: list[bytes], datasets=("a", "b"), ext: str = ".bin", anns: bool = True) -> list[dict]:
    return [
        {
            "id": i + 1,
            "dataset": datasets[i * len(datasets) // len(blobs)],
            "name": f"i{i}{ext}",
            "sha256": sha(b),
            "size": len(b),
            "ann": ann_of(i) if anns and i % 2 == 0 else None,
        }
        for i, b in enumerate(blobs)
    ]


def prepare(ctx) -> dict:
    downloader = Downloader(ctx)
    summary = downloader.prepare(plan_pages(ctx))
    summary["empty_anns"] = write_project_files(ctx, downloader.jobs)
    return summary


def task_files(ctx) -> dict[str, bytes]:
    root = ctx.task_dir / "data"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def parts_left(ctx) -> list[str]:
    tmp = ctx.config.tmp_dir
    return sorted(p.name for p in tmp.rglob("*.part"))


# --- planning from pages -------------------------------------------------------------------


def test_the_plan_pages_the_items_and_writes_each_pages_annotations_as_it_arrives(tmp_path):
    data = [blob(i) for i in range(250)]
    items = items_of(data)
    extra = dict(items[0], id=999, name="late.bin")  # appended to `a` after the task was handed out
    server = FakeServer({}, items + [extra], page=100)
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    pdir = ctx.task_dir / "data" / "proj"
    written_before: dict[int, int] = {}
    server.on_page = lambda start: written_before.setdefault(start, len(list(pdir.glob("*/ann/*.json"))))
    jobs = plan(ctx)
    assert server.pages == [0, 100, 200]
    # the next page is asked for while one is planned; the one before is on disk by then
    assert written_before[0] == 0 and written_before[200] >= 50
    assert len(list(pdir.glob("*/ann/*.json"))) == 125
    assert [j.label for j in jobs] == [f"{it['dataset']}/{it['name']}" for it in items], "late.bin is not the task's"
    assert [j.needs_ann for j in jobs] == [it["ann"] is None for it in items]
    assert not hasattr(jobs[0], "ann") and not hasattr(jobs[0], "__dict__"), "a Job holds no annotation"
    assert (pdir / "a" / "ann" / "i0.bin.json").read_text() == sly_format.dumps(ann_of(0))
    assert (pdir / "b" / "ann" / "i248.bin.json").read_text() == sly_format.dumps(ann_of(248))
    assert not (pdir / "a" / "ann" / "i1.bin.json").exists(), "written with an empty one once the image is here"
    assert jobs[0].dest == f"{pdir}/a/img/i0.bin" and jobs[0].cache_path == os.fspath(
        cache.image_path(ctx.config, sha(data[0]), "i0.bin")
    )


def test_the_plan_refuses_a_listing_that_is_not_the_projects(tmp_path):
    items = items_of([blob(i) for i in range(10)])
    ctx = make_ctx(tmp_path, FakeServer({}, items), project=project_of(items, {"a": 5}))
    with pytest.raises(TaskError, match="an item of dataset 'b', which is not one of the task's project's datasets"):
        plan(ctx)
    ctx = make_ctx(tmp_path, FakeServer({}, items), task_id=8, project=project_of(items, {"a": 5, "b": 6}))
    with pytest.raises(TaskError, match="listed 5 of the 6 items of dataset 'b'"):
        plan(ctx)
    bad = [dict(items[0], name="../x")]
    ctx = make_ctx(tmp_path, FakeServer({}, bad), task_id=9, project=project_of(bad))
    with pytest.raises(TaskError, match="unsafe item name"):
        plan(ctx)


def test_inline_items_are_taken_as_given(tmp_path):
    data = [blob(i) for i in range(4)]
    items = items_of(data, datasets=("a",))
    project = {"id": 1, "name": "proj", "meta": None, "datasets": [{"name": "a", "items": items}]}
    server = FakeServer({sha(b): b for b in data})
    ctx = make_ctx(tmp_path, server, project=project)
    summary = prepare(ctx)
    assert server.pages == [] and summary["fetched"] == 4 and summary["empty_anns"] == 2
    assert task_files(ctx)["proj/a/img/i3.bin"] == data[3]
    assert task_files(ctx)["proj/meta.json"] == sly_format.dumps(sly_format.empty_meta()).encode()


# --- fetching in bulk ----------------------------------------------------------------------


def test_small_blobs_come_in_parallel_batches_and_wrong_bytes_are_asked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "BULK_COUNT", 10)
    data = [blob(i) for i in range(30)]
    items = items_of(data)
    server = FakeServer({sha(b): b for b in data}, items)
    server.corrupt[sha(data[3])] = 2  # wrong twice, right the third time
    ctx = make_ctx(tmp_path, server, project=project_of(items), download_workers=3)
    summary = prepare(ctx)
    assert summary == {"files": 30, "cached": 0, "fetched": 30, "bytes": summary["bytes"], "empty_anns": 15}
    assert sorted(len(r) for r in server.requests) == [1, 1, 10, 10, 10]
    assert server.requests.count([sha(data[3])]) == 2, "only the blob still missing is asked again"
    got = task_files(ctx)
    for i, b in enumerate(data):
        assert got[f"proj/{items[i]['dataset']}/img/i{i}.bin"] == b
        path = cache.image_path(ctx.config, sha(b), f"i{i}.bin")
        assert cache.verify(ctx.config, path, sha(b), len(b))
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert parts_left(ctx) == []
    assert ctx.progress_values[-1] == (30, 30)


def test_bytes_wrong_every_time_fail_the_task_and_cache_nothing(tmp_path):
    data = [blob(i) for i in range(5)]
    items = items_of(data, datasets=("a",))
    server = FakeServer({sha(b): b for b in data}, items)
    server.corrupt[sha(data[2])] = 99
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    with pytest.raises(TaskError, match=rf"a/i2.bin failed: the server's bytes do not match sha256 {sha(data[2])}"):
        prepare(ctx)
    assert not cache.image_path(ctx.config, sha(data[2]), "i2.bin").exists()
    assert parts_left(ctx) == []


def test_a_stream_cut_short_leaves_nothing_half_written_and_is_resumed(tmp_path):
    data = [blob(i) * 50 for i in range(8)]
    items = items_of(data, datasets=("a",))
    server = FakeServer({sha(b): b for b in data}, items)
    # the first answer ends inside the bytes of the 5th entry
    offset = sum(bulk.BLOCK + len(b) + len(bulk.padding(len(b))) for b in data[:4]) + bulk.BLOCK + 100
    server.cuts = [offset]
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    seen_after_cut: list = []

    def check(asked):  # the request after the cut: no part left, the 5th blob not in the cache
        seen_after_cut.append((parts_left(ctx), cache.image_path(ctx.config, sha(data[4]), "i4.bin").exists()))

    server.on_request = check
    assert prepare(ctx)["fetched"] == 8
    assert server.requests[1] == [sha(b) for b in data[4:]], "what was stored before the cut is not asked again"
    assert seen_after_cut == [([], False), ([], False)]
    assert all(task_files(ctx)[f"proj/a/img/i{i}.bin"] == b for i, b in enumerate(data))
    assert parts_left(ctx) == []


def test_a_blob_the_server_leaves_out_twice_fails_the_task_by_name(tmp_path):
    data = [blob(i) for i in range(6)]
    items = items_of(data, datasets=("a",))
    server = FakeServer({sha(b): b for b in data}, items)
    server.left_out[sha(data[1])] = 1  # once: the second request has it
    server.left_out[sha(data[4])] = 2  # twice: the task fails
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    with pytest.raises(TaskError) as e:
        prepare(ctx)
    assert str(e.value) == (
        f"download of a/i4.bin failed: the server does not have blob {sha(data[4])} or does not let this node read it"
    )
    assert server.requests[1] == [sha(data[1]), sha(data[4])]
    assert cache.verify(ctx.config, cache.image_path(ctx.config, sha(data[1]), "i1.bin"), sha(data[1]))


def test_a_stop_is_seen_between_two_entries(tmp_path):
    data = [blob(i) for i in range(20)]
    items = items_of(data, datasets=("a",))
    server = FakeServer({sha(b): b for b in data}, items)
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    server.on_entry = lambda h: ctx.stop_event.set()
    with pytest.raises(StopRequested):
        prepare(ctx)
    assert len(list(ctx.config.images_dir.rglob("*.bin"))) == 1 and parts_left(ctx) == []


def test_large_blobs_go_one_by_one_and_one_blob_under_two_names_is_stored_at_both(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "SMALL_BLOB", 100)
    big, small = b"B" * 500, b"s" * 10
    items = [
        {"dataset": "a", "name": "big.bin", "sha256": sha(big), "size": len(big), "ann": None},
        {"dataset": "a", "name": "x.png", "sha256": sha(small), "size": len(small), "ann": None},
        {"dataset": "a", "name": "x.jpg", "sha256": sha(small), "size": len(small), "ann": None},
        {"dataset": "a", "name": "y.png", "sha256": sha(small), "size": len(small), "ann": None},
    ]
    server = FakeServer({sha(big): big, sha(small): small}, items)
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    assert prepare(ctx)["fetched"] == 4
    assert server.gets == [sha(big)] and server.requests == [[sha(small)]]
    png, jpg = (cache.image_path(ctx.config, sha(small), n) for n in ("x.png", "x.jpg"))
    assert cache.verify(ctx.config, png, sha(small)) and cache.verify(ctx.config, jpg, sha(small))
    got = task_files(ctx)
    assert got["proj/a/img/x.jpg"] == got["proj/a/img/y.png"] == small and got["proj/a/img/big.bin"] == big
    assert (ctx.task_dir / "data/proj/a/img/y.png").stat().st_ino == png.stat().st_ino


def _pages_of_100(monkeypatch, n: int):
    """n items in pages of 100, fetched 50 a request: (blobs, items, server, an Event set once a
    download has been asked for)."""
    monkeypatch.setattr(downloads, "BULK_COUNT", 50)
    data = [blob(i) for i in range(n)]
    items = items_of(data)
    server = FakeServer({sha(b): b for b in data}, items, page=100)
    asked = threading.Event()
    server.on_request = lambda hashes: asked.set()
    return data, items, server, asked


def test_a_pages_missing_blobs_are_fetched_while_the_next_page_is_planned(tmp_path, monkeypatch):
    data, items, server, asked = _pages_of_100(monkeypatch, 300)
    fetching_before_last_page: list[bool] = []
    # the last page is listed only once a download of the first pages' blobs has been asked for
    server.on_page = lambda start: start == 200 and fetching_before_last_page.append(asked.wait(10))
    ctx = make_ctx(tmp_path, server, project=project_of(items), download_workers=2)
    assert prepare(ctx)["fetched"] == 300
    assert fetching_before_last_page == [True]
    assert sorted(h for r in server.requests for h in r) == sorted(sha(b) for b in data), "each blob asked once"
    got = task_files(ctx)
    assert all(got[f"proj/{it['dataset']}/img/{it['name']}"] == b for it, b in zip(items, data, strict=True))


def test_a_pages_annotations_are_written_while_its_blobs_are_fetched(tmp_path, monkeypatch):
    _, items, server, asked = _pages_of_100(monkeypatch, 200)
    link_text = cache.Layout.link_text
    fetching_before_first_ann: list[bool] = []

    def first_waits(layout, *a, **k):
        if not fetching_before_first_ann:  # the first annotation waits for a download (10 s at most)
            fetching_before_first_ann.append(asked.wait(10))
        return link_text(layout, *a, **k)

    monkeypatch.setattr(cache.Layout, "link_text", first_waits)
    ctx = make_ctx(tmp_path, server, project=project_of(items), download_workers=2)
    assert prepare(ctx)["fetched"] == 200
    assert fetching_before_first_ann == [True], "the first page's blobs were asked for before its annotations"
    got = task_files(ctx)
    for it in items:
        if it["ann"] is not None:
            assert got[f"proj/{it['dataset']}/ann/{it['name']}.json"] == sly_format.dumps(it["ann"]).encode()
    assert sum(1 for k in got if "/ann/" in k) == 200, "every item has its annotation, an empty one included"


def test_one_blob_on_several_pages_under_two_names_is_fetched_once_and_given_to_each(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "BULK_COUNT", 3)
    same = b"the same bytes " * 9
    data = [blob(i) for i in range(9)]
    items = items_of(data, datasets=("a",))
    for i, name in ((0, "s.png"), (4, "t.jpg"), (8, "u.png")):  # pages of 3: the first, second and third
        items[i] = dict(items[i], name=name, sha256=sha(same), size=len(same))
    blobs = {sha(b): b for b in data} | {sha(same): same}
    server = FakeServer(blobs, items, page=3)
    server.delay = 0.01  # entries trickle in: later pages are planned while the blob is on its way
    ctx = make_ctx(tmp_path, server, project=project_of(items), download_workers=2)
    assert prepare(ctx) | {"bytes": 0} == {"files": 9, "cached": 0, "fetched": 9, "bytes": 0, "empty_anns": 4}
    assert sum(r.count(sha(same)) for r in server.requests) == 1
    png, jpg = (cache.image_path(ctx.config, sha(same), n) for n in ("s.png", "t.jpg"))
    assert cache.verify(ctx.config, png, sha(same)) and cache.verify(ctx.config, jpg, sha(same))
    got = task_files(ctx)
    assert got["proj/a/img/s.png"] == got["proj/a/img/t.jpg"] == got["proj/a/img/u.png"] == same
    assert (ctx.task_dir / "data/proj/a/img/u.png").stat().st_ino == png.stat().st_ino
    assert parts_left(ctx) == [] and ctx.progress_values[-1] == (9, 9)


def test_a_task_with_no_files_downloads_and_reports_nothing(tmp_path):
    server = FakeServer({})
    ctx = make_ctx(tmp_path, server, project=None)
    assert prepare(ctx) == {"files": 0, "cached": 0, "fetched": 0, "bytes": 0, "empty_anns": 0}
    assert server.requests == [] and server.pages == [] and ctx.progress_values == []
    assert not [m for m in ctx.messages("agent") if m.startswith("downloading")]


def test_two_tasks_fetching_the_same_blobs_at_once_both_get_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(downloads, "BULK_COUNT", 7)
    data = [blob(i) * 20 for i in range(40)]
    items = items_of(data)
    ctxs = []
    for task_id in (1, 2):
        server = FakeServer({sha(b): b for b in data}, items)
        server.delay = 0.002
        ctxs.append(make_ctx(tmp_path, server, task_id=task_id, project=project_of(items), download_workers=4))
    outcomes: list = []
    threads = [threading.Thread(target=lambda c=c: outcomes.append(prepare(c))) for c in ctxs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 2 and all(o["fetched"] + o["cached"] == 40 for o in outcomes)
    for ctx in ctxs:
        got = task_files(ctx)
        assert all(got[f"proj/{items[i]['dataset']}/img/i{i}.bin"] == b for i, b in enumerate(data))
    for i, b in enumerate(data):
        assert cache.verify(ctxs[0].config, cache.image_path(ctxs[0].config, sha(b), f"i{i}.bin"), sha(b))
    assert parts_left(ctxs[0]) == []


# --- the cache: records, annotation texts, a cached project prepared again ------------------


def _recorded_file(tmp_path):
    """A file put in the cache and recorded by hand: (config, its bytes, its path, the record)."""
    cfg = make_ctx(tmp_path, FakeServer({})).config
    data = b"cached bytes"
    path = cache.image_path(cfg, sha(data), "x.png")
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return cfg, data, path, cache.write_record(cfg, path, sha(data))


def test_a_record_is_an_attribute_of_the_file_and_a_change_to_its_bytes_shows(tmp_path):
    cfg, data, path, rec = _recorded_file(tmp_path)
    value = os.getxattr(path, cache.RECORD_XATTR)
    assert value == bytes.fromhex(sha(data)) + struct.pack("<Qq", len(data), rec["mtime_ns"])
    assert not (cfg.images_dir.parent / "records").exists(), "no name but the file's own"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert cache.verify(cfg, path, sha(data), len(data)) and not cache.verify(cfg, path, sha(data), len(data) + 1)
    assert not cache.verify(cfg, path, sha(b"other"))
    # a record copied onto another file does not make it that blob's: its size and mtime differ
    other = path.with_name(sha(b"forged") + ".png")
    other.write_bytes(b"forged")
    os.chmod(other, 0o444)
    os.setxattr(other, cache.RECORD_XATTR, os.getxattr(path, cache.RECORD_XATTR))
    assert not cache.verify(cfg, other, sha(data))
    # a link into a task dir is a use: it sets the file's ctime, the entry's last use
    used = cache.last_use(cfg, path)
    time.sleep(0.02)
    cache.link_into(path, tmp_path / "task.png")
    assert cache.last_use(cfg, path) > used and cache.verify(cfg, path, sha(data))
    os.chmod(path, 0o644)
    assert not cache.verify(cfg, path, sha(data)), "writable"
    with open(path, "r+b") as f:  # same size, other bytes
        f.write(b"CACHED")
    os.chmod(path, 0o444)
    assert not cache.verify(cfg, path, sha(data))
    os.removexattr(path, cache.RECORD_XATTR)
    assert not cache.verify(cfg, path, sha(data)), "no record"


def test_a_record_takes_no_block_of_its_own_and_the_previous_text_form_still_counts(tmp_path):
    cfg, data, path, rec = _recorded_file(tmp_path)
    plain = tmp_path / "plain.png"
    plain.write_bytes(data)
    # ext4 keeps an attribute of up to about 56 bytes (with this name) inside a 256-byte inode;
    # a longer one takes a 4 KiB block per file. Filesystems that keep attributes elsewhere
    # (tmpfs, btrfs, xfs) show no block either way.
    assert len(os.getxattr(path, cache.RECORD_XATTR)) == 48
    assert path.stat().st_blocks == plain.stat().st_blocks
    # a cache the previous version filled: its records are the text `<sha256> <size> <mtime_ns>`
    os.setxattr(path, cache.RECORD_XATTR, f"{sha(data)} {len(data)} {rec['mtime_ns']}".encode())
    assert cache.verify(cfg, path, sha(data), len(data))
    assert not cache.verify(cfg, path, sha(b"other")) and not cache.verify(cfg, path, sha(data), len(data) + 1)
    os.setxattr(path, cache.RECORD_XATTR, f"{sha(data)} {len(data)} {rec['mtime_ns'] + 1}".encode())
    assert not cache.verify(cfg, path, sha(data)), "a text record of another mtime"
    os.setxattr(path, cache.RECORD_XATTR, b"\0" * 48)
    assert not cache.verify(cfg, path, sha(data)), "48 bytes that are not this file's record"


def _no_xattrs(monkeypatch):
    """A filesystem that keeps no user extended attributes (tmpfs before Linux 6.6, some FUSE)."""

    def refuse(*a, **k):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refuse)
    monkeypatch.setattr(os, "getxattr", refuse)


def test_without_extended_attributes_a_record_is_a_link_and_old_records_still_count(tmp_path, monkeypatch):
    _no_xattrs(monkeypatch)
    cfg, data, path, rec = _recorded_file(tmp_path)
    rp = cache.record_path(cfg, path)
    assert rp.is_symlink() and os.readlink(rp) == f"{sha(data)} {len(data)} {rec['mtime_ns']} {rec['ino']} {rec['dev']}"
    assert cache.verify(cfg, path, sha(data), len(data)) and not cache.verify(cfg, path, sha(data), len(data) + 1)
    assert not cache.verify(cfg, path, sha(b"other"))
    rp.unlink()
    rp.write_text(json.dumps(rec))
    assert cache.verify(cfg, path, sha(data)), "a record an earlier version wrote"
    assert cache.last_use(cfg, path) == max(rp.stat().st_mtime, path.stat().st_ctime)
    os.chmod(path, 0o644)
    path.write_bytes(b"changed bytes")
    assert not cache.verify(cfg, path, sha(data))


def test_without_extended_attributes_a_project_is_prepared_and_prepared_again_from_the_cache(tmp_path, monkeypatch):
    _no_xattrs(monkeypatch)
    data = [blob(i) for i in range(40)]
    items = items_of(data, ext=".png")
    server = FakeServer({sha(b): b for b in data}, items)
    first = make_ctx(tmp_path, server, task_id=1, project=project_of(items))
    assert prepare(first)["fetched"] == 40
    records = cache.Layout(first.config).records
    assert len([p for p in Path(records).rglob("*") if p.is_symlink()]) == 40
    second = make_ctx(tmp_path, server, task_id=2, project=project_of(items))
    assert prepare(second)["cached"] == 40
    assert task_files(first) == task_files(second)


def test_a_first_preparation_makes_each_name_once(tmp_path, monkeypatch):
    """Each item costs its image's one file, written in the task dir and linked into the cache,
    and its annotation's one file, linked into the cache: no part file, no rename, no record
    file, no lock file, no text written twice."""
    data = [blob(i) for i in range(200)]
    items = items_of(data, ext=".png")
    server = FakeServer({sha(b): b for b in data}, items)
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    made = {"open": 0, "link": 0, "replace": 0, "symlink": 0, "utime": 0}  # calls that succeeded
    for name in made:
        real = getattr(os, name)

        def counting(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            made[_name] += 1
            return out

        monkeypatch.setattr(os, name, counting)
    summary = prepare(ctx)
    monkeypatch.undo()
    assert summary["fetched"] == 200
    anns = sum(1 for it in items if it["ann"] is not None)
    texts = anns + 1  # and one empty annotation, the same text for every item without one
    assert made["open"] == 200 + texts + 1, f"images, texts, meta.json: {made}"
    assert made["replace"] == 0 and made["symlink"] == 0, made
    assert made["link"] == 200 + 200, f"an image into the cache, an annotation into the cache or out: {made}"
    assert parts_left(ctx) == [] and not list(ctx.config.tmp_dir.glob("parts-*/*")), "no part file"
    assert made["utime"] == texts, f"a text's mtime, no record touched: {made}"
    assert not list(ctx.config.tmp_dir.glob("*.lock")), "no lock file"
    for it, b in zip(items, data, strict=True):
        img = ctx.task_dir / "data/proj" / it["dataset"] / "img" / it["name"]
        cached = cache.image_path(ctx.config, sha(b), it["name"])
        assert os.path.samefile(img, cached) and cache.verify(ctx.config, cached, sha(b), len(b))
        assert stat.S_IMODE(img.stat().st_mode) == 0o444
        if it["ann"] is not None:
            dest = ctx.task_dir / "data/proj" / it["dataset"] / "ann" / f"{it['name']}.json"
            cached = cache.Layout(ctx.config).text_path(cache.text_key(it["ann"]))
            assert os.path.samefile(dest, cached) and dest.read_text() == sly_format.dumps(it["ann"])


def test_a_stale_cached_file_is_replaced_by_the_one_written_and_a_task_linking_it_keeps_its_own(tmp_path):
    data = [blob(i, "png") for i in range(6)]
    items = items_of(data, ext=".png")
    server = FakeServer({sha(b): b for b in data}, items)
    first = make_ctx(tmp_path, server, task_id=1, project=project_of(items))
    prepare(first)
    stale = cache.image_path(first.config, sha(data[0]), items[0]["name"])
    os.removexattr(stale, cache.RECORD_XATTR)  # a file whose record is gone: fetched again
    old_ino = stale.stat().st_ino
    second = make_ctx(tmp_path, server, task_id=2, project=project_of(items))
    assert prepare(second)["fetched"] == 1
    img = second.task_dir / "data/proj/a/img" / items[0]["name"]
    assert os.path.samefile(img, stale) and stale.stat().st_ino != old_ino
    assert cache.verify(second.config, stale, sha(data[0]), len(data[0]))
    assert (first.task_dir / "data/proj/a/img" / items[0]["name"]).stat().st_ino == old_ino, "task 1 keeps its file"


def test_across_filesystems_the_task_keeps_its_written_file_and_the_cache_gets_a_copy(tmp_path, monkeypatch):
    data = [blob(i, "png") for i in range(6)]
    items = items_of(data, ext=".png")
    server = FakeServer({sha(b): b for b in data}, items)
    ctx = make_ctx(tmp_path, server, project=project_of(items))
    storage = os.fspath(ctx.config.images_dir.parent)
    tasks = os.fspath(ctx.task_dir)
    real_link = os.link

    def link(src, dst, *a, **k):  # the task dir on one filesystem, storage/ on another
        if os.fspath(src).startswith(tasks) != os.fspath(dst).startswith(tasks):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    assert prepare(ctx)["fetched"] == 6
    for it, b in zip(items, data, strict=True):
        img = ctx.task_dir / "data/proj" / it["dataset"] / "img" / it["name"]
        cached = cache.image_path(ctx.config, sha(b), it["name"])
        assert img.read_bytes() == b and not os.path.samefile(img, cached)
        assert cache.verify(ctx.config, cached, sha(b), len(b)) and os.fspath(cached).startswith(storage)
    assert parts_left(ctx) == [] and not list(ctx.config.tmp_dir.glob("parts-*/*"))


def test_a_cached_project_is_prepared_again_with_no_file_created_per_item(tmp_path, monkeypatch):
    data = [blob(i, "png") for i in range(300)]
    items = items_of(data, ext=".png")
    server = FakeServer({sha(b): b for b in data}, items)
    first = make_ctx(tmp_path, server, task_id=1, project=project_of(items))
    assert prepare(first)["fetched"] == 300
    second = make_ctx(tmp_path, server, task_id=2, project=project_of(items))
    asked = len(server.requests)
    calls = {"open": 0, "link": 0}
    real_open, real_link = os.open, os.link

    def counting_open(*a, **k):
        calls["open"] += 1
        return real_open(*a, **k)

    def counting_link(*a, **k):
        calls["link"] += 1
        return real_link(*a, **k)

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "link", counting_link)
    summary = prepare(second)
    monkeypatch.undo()
    assert summary["cached"] == 300 and summary["fetched"] == 0 and len(server.requests) == asked
    # meta.json, and each item without an annotation has its image's header read: nothing more
    assert calls["open"] <= 1 + 150, calls
    assert calls["link"] == 600, "an image and its annotation per item, both links into the cache"
    a, b = (ctx.task_dir / "data/proj/a/ann/i0.png.json" for ctx in (first, second))
    assert a.stat().st_ino == b.stat().st_ino and a.read_text() == sly_format.dumps(ann_of(0))
    assert stat.S_IMODE(b.stat().st_mode) == 0o444
    assert task_files(first) == task_files(second)


def test_a_changed_annotation_in_the_cache_is_written_again(tmp_path):
    data = [blob(i) for i in range(2)]
    items = items_of(data, datasets=("a",))
    server = FakeServer({sha(b): b for b in data}, items)
    first = make_ctx(tmp_path, server, task_id=1, project=project_of(items))
    prepare(first)
    cached = cache.Layout(first.config).text_path(cache.text_key(ann_of(0)))
    assert os.path.samefile(cached, first.task_dir / "data/proj/a/ann/i0.bin.json")
    os.chmod(cached, 0o644)
    with open(cached, "w") as f:
        f.write('{"tampered": true}')
    ctx = make_ctx(tmp_path, server, task_id=2, project=project_of(items))
    prepare(ctx)
    assert (ctx.task_dir / "data/proj/a/ann/i0.bin.json").read_text() == sly_format.dumps(ann_of(0))


# --- results in bulk -----------------------------------------------------------------------


class RecordingBlobs:
    """check_blobs / upload_blobs / blob_exists / put_blob over a dict; `mismatch_once` names
    files whose first bulk upload the server finds changed."""

    def __init__(self, have: set[str] | None = None):
        self.stored: dict[str, bytes] = {}
        self.have = have or set()
        self.bulk_uploads: list[list[str]] = []
        self.puts: list[str] = []
        self.mismatch_once: set[str] = set()

    def check_blobs(self, hashes):
        return {h for h in hashes if h not in self.have and h not in self.stored}

    def upload_blobs(self, files):
        answers, names = [], []
        for h, f in files:
            f.seek(0)
            body = f.read()
            names.append(h)
            if h in self.mismatch_once or sha(body) != h:
                self.mismatch_once.discard(h)
                answers.append({"sha256": h, "error": "hash_mismatch", "detail": "changed"})
                continue
            self.stored[h] = body
            answers.append({"sha256": h, "size": len(body), "created": True})
        self.bulk_uploads.append(names)
        return answers

    def blob_exists(self, h):
        return h in self.stored or h in self.have

    def put_blob(self, h, f):
        f.seek(0)
        self.puts.append(h)
        self.stored[h] = f.read()


def test_small_results_go_up_in_bulk_and_large_ones_by_themselves(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "SMALL_BLOB", 1000)
    files = {f"r/{i}.txt": f"result {i}".encode() for i in range(250)}
    files["big.bin"] = b"x" * 5000
    files["same.txt"] = files["r/0.txt"]
    root = tmp_path / "results"
    for rel, b in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b)
    api = RecordingBlobs(have={sha(files["r/1.txt"])})
    api.mismatch_once.add(sha(files["r/7.txt"]))
    pairs = ((rel, open(root / rel, "rb")) for rel in sorted(files))
    out = uploads.upload_open_files(api, pairs, workers=2)
    assert out == [{"path": rel, "sha256": sha(files[rel]), "size": len(files[rel])} for rel in sorted(files)]
    assert set(api.stored) == {sha(b) for b in files.values()} - {sha(files["r/1.txt"])}
    assert api.puts == [sha(files["r/7.txt"]), sha(files["big.bin"])] or api.puts == [
        sha(files["big.bin"]),
        sha(files["r/7.txt"]),
    ], "the changed file again by itself, the big one by itself"
    assert len(api.bulk_uploads) == 3 and all(len(u) <= uploads.BULK_FILES for u in api.bulk_uploads)
    assert sha(files["r/1.txt"]) not in {h for u in api.bulk_uploads for h in u}, "what the server has is not sent"


# --- the real server -----------------------------------------------------------------------


def make_big_project(node, user, tmp_path, n: int, tag: str) -> tuple[dict, dict[str, bytes], dict[str, dict]]:
    """A project of n small items in two datasets (the second added in pages), every other one
    with an annotation; its blobs sent by the node in bulk. Returns (project, files, anns) keyed
    by '<ds>/<name>'."""
    src = tmp_path / "src"
    src.mkdir()
    files, anns, rows = {}, {}, {"ds1": [], "ds2": []}
    for i in range(n):
        ds = "ds1" if i < n // 2 else "ds2"
        data = f"{tag} item {i} ".encode() * (1 + i % 5)
        (src / str(i)).write_bytes(data)
        row = {"name": f"im{i}.bin", "sha256": sha(data), "size": len(data)}
        if i % 2 == 0:
            row["ann"] = anns[f"{ds}/im{i}.bin"] = sly_format.empty_ann(i + 1, i + 2)
        files[f"{ds}/im{i}.bin"] = data
        rows[ds].append(row)
    for start in range(0, n, 2000):
        answers = node.api.upload_blobs(
            [(sha((src / str(i)).read_bytes()), src / str(i)) for i in range(start, min(n, start + 2000))]
        )
        assert all("error" not in a for a in answers)
    project = user.create_project(f"big-{tag}", [{"name": "ds1", "items": rows["ds1"]}])
    for start in range(0, len(rows["ds2"]), 1000):
        user.add_items(project["id"], "ds2", rows["ds2"][start : start + 1000])
    return project, files, anns


@pytest.mark.slow
def test_a_project_of_thousands_of_items_prepared_from_the_real_server(node, user, tmp_path):
    tag = secrets.token_hex(4)
    project, files, anns = make_big_project(node, user, tmp_path, 3000, tag)
    ctx = node.ctx(type="custom", image="none", project_id=project["id"])
    assert all("items" not in ds for ds in ctx.task["project"]["datasets"]), "the poll answer lists no items"
    t0 = time.monotonic()
    summary = prepare(ctx)
    took = time.monotonic() - t0
    assert summary["fetched"] == 3000 and summary["cached"] == 0, summary
    pdir = ctx.task_dir / "data" / project["name"]
    for key, data in files.items():
        ds, name = key.split("/")
        assert hashlib.sha256((pdir / ds / "img" / name).read_bytes()).hexdigest() == sha(data), key
        ann = (pdir / ds / "ann" / f"{name}.json").read_text()
        if key in anns:
            assert ann == sly_format.dumps(anns[key]), key
        else:  # the server's empty annotation, or the agent's: no labels either way
            assert json.loads(ann)["objects"] == [], key
    assert len(list(pdir.glob("*/img/*"))) == 3000 and len(list(pdir.glob("*/ann/*"))) == 3000
    again = node.ctx(type="custom", image="none", project_id=project["id"])
    t1 = time.monotonic()
    assert prepare(again)["cached"] == 3000
    print(f"\n3000 items: prepared in {took:.2f} s, again (cached) in {time.monotonic() - t1:.2f} s")


@pytest.mark.slow
def test_results_go_up_in_bulk_to_the_real_server(node, user, tmp_path):
    ctx = node.ctx(type="custom", image="none")
    res = ctx.task_dir / "results"
    tag = secrets.token_hex(4)
    files = {f"d{i % 7}/f{i}.txt": f"{tag} result {i}".encode() for i in range(600)}
    for rel, data in files.items():
        (res / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / rel).write_bytes(data)
    results.upload_artifacts(ctx, "r")
    got = {a["path"]: a["sha256"] for a in user.task_artifacts(ctx.task_id)}
    assert got == {rel: sha(data) for rel, data in files.items()}
    assert user.check_blobs(got.values()) == set()
    assert ctx.api.check_blobs(got.values()) == set(), "the node may read what it uploaded"


# --- a real container hashes what it was given --------------------------------------------


@pytest.mark.slow
@pytest.mark.docker
def test_the_container_sees_every_file_whole(node, user, tmp_path, task_image):
    tag = secrets.token_hex(4)
    project, files, anns = make_big_project(node, user, tmp_path, 3000, tag)
    script = f"cd /sly_task_data/data/{project['name']} && find . -path '*/img/*' -type f | sort | xargs sha256sum"
    ctx = node.ctx(type="custom", image=task_image, command=["sh", "-c", script], project_id=project["id"])
    outcome = custom.run(ctx)
    assert outcome.state == "finished", (outcome, ctx.messages()[-5:])
    seen = {}
    for line in ctx.messages("stdout"):
        digest, path = line.split(maxsplit=1)
        seen[path.removeprefix("./").replace("/img/", "/")] = digest
    assert seen == {key: sha(data) for key, data in files.items()}
