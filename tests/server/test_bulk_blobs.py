"""Bulk blob transfer (protocol.bulk, server.blobs.bulk): check, upload and download many blobs per
request on both sides. What holds for a single blob holds per entry: the bytes must hash to the
name, a refused or cut entry leaves nothing in the store, and a node reaches only the blobs it may
read, a forbidden one answered exactly as a missing one."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile

import pytest

from protocol import bulk
from server.blobs import bulk as server_bulk
from server.blobs.store import BlobStore
from tests.support.fake_agent import FakeAgent
from tests.support.procs import poll_for
from tests.support.server import ServerThread

USER = "/api/v1/blobs/"
AGENT = "/agent/v1/blobs/"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tar(*entries: bytes | tuple[str, bytes], end: bool = True) -> bytes:
    """A bulk stream written with protocol.bulk; an entry is its bytes (named by their sha256) or (name, bytes)."""
    out = []
    for e in entries:
        name, data = e if isinstance(e, tuple) else (_sha(e), e)
        out += (bulk.header(name, len(data)), data, bulk.padding(len(data)))
    return b"".join(out) + (bulk.TAR_END if end else b"")


def _untar(body: bytes) -> list[tuple[str, bytes]]:
    """The entries of a tar stream, read by the standard library."""
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _user(server, admin, op: str, **kw):
    return admin.post(server.url + USER + op, timeout=30, **kw)


def _stored(srv, data: bytes) -> bool:
    h = _sha(data)
    return (srv.data_dir / "blobs" / h[0:2] / h[2:5] / h).is_file()


def _partials(srv) -> list[str]:
    return sorted(p.name for p in (srv.data_dir / "blobs" / "tmp").iterdir())


def _running_task(client, agent, **kw) -> int:
    tid = client.create_task(agent.id, "train", image="x:1", **kw)["id"]
    agent.poll()
    assert agent.state_raw(tid, "running").status_code == 200
    return tid


@pytest.fixture
def thread_server(tmp_path):
    """A server on a thread of this process whatever SLY_TEST_SERVER says: the bounds tests change
    protocol.bulk's constants, which only a server in this process sees."""
    srv = ServerThread(tmp_path / "data").start()
    yield srv
    srv.close()


def test_user_upload_then_download_gives_the_same_bytes_in_the_order_asked(server, admin):
    blobs = [b"first blob " * 50, b"", b"x" * 512, b"a blob of 1000 bytes".ljust(1000, b"."), b"last"]
    r = _user(server, admin, "upload", data=_tar(*blobs), headers={"content-type": bulk.CONTENT_TYPE})
    assert r.status_code == 200, r.text
    assert [(b["sha256"], b["size"]) for b in r.json()["blobs"]] == [(_sha(d), len(d)) for d in blobs]
    assert all(isinstance(b["created"], bool) for b in r.json()["blobs"])
    # again: the same answer, nothing created
    r = _user(server, admin, "upload", data=_tar(*blobs))
    assert [b["created"] for b in r.json()["blobs"]] == [False] * len(blobs)

    never = _sha(b"never uploaded")
    asked = [_sha(blobs[3]), never, _sha(blobs[0]), _sha(blobs[3]), _sha(blobs[1]), _sha(blobs[2])]
    r = _user(server, admin, "download", json={"sha256": asked})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == bulk.CONTENT_TYPE
    assert r.headers[bulk.BULK_MISSING_HEADER] == "1"
    assert int(r.headers["content-length"]) == len(r.content)
    assert _untar(r.content) == [(_sha(d), d) for d in (blobs[3], blobs[0], blobs[1], blobs[2])]
    assert r.content.endswith(bulk.TAR_END)
    # protocol.bulk's reader reads it as the standard library does
    got = [(sha, b"".join(chunks)) for sha, _size, chunks in bulk.iter_entries(io.BytesIO(r.content))]
    assert got == _untar(r.content)


def test_a_tar_written_by_the_standard_library_is_read(server, admin):
    """tarfile pads an archive to 10 KiB records after its end blocks: that padding is read and ignored."""
    blobs = [b"one", b"two" * 1000]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for d in blobs:
            info = tarfile.TarInfo(_sha(d))
            info.size = len(d)
            tf.addfile(info, io.BytesIO(d))
    assert len(buf.getvalue()) % tarfile.RECORDSIZE == 0
    r = _user(server, admin, "upload", data=buf.getvalue())
    assert r.status_code == 200, r.text
    assert [b["sha256"] for b in r.json()["blobs"]] == [_sha(d) for d in blobs]
    r = _user(server, admin, "download", json={"sha256": [_sha(d) for d in blobs]})
    assert _untar(r.content) == [(_sha(d), d) for d in blobs]


def test_check_answers_the_missing_ones_in_the_order_asked_each_once(server, admin, client):
    here = client.upload_bytes(b"a blob that is here")
    gone1, gone2 = _sha(b"not here 1"), _sha(b"not here 2")
    r = _user(server, admin, "check", json={"sha256": [gone2, here, gone1, gone2]})
    assert r.status_code == 200, r.text
    assert r.json() == {"missing": [gone2, gone1]}
    assert _user(server, admin, "check", json={"sha256": [here]}).json() == {"missing": []}


def test_an_entry_whose_bytes_do_not_match_its_name_is_refused_and_the_others_are_kept(server, admin, make_agent):
    good1, good2, wrong = b"kept one (mismatch test)", b"kept two (mismatch test)", b"the bytes sent"
    named = _sha(b"the bytes named")
    body = _tar(good1, (named, wrong), good2)
    r = _user(server, admin, "upload", data=body)
    assert r.status_code == 200, r.text
    answers = r.json()["blobs"]
    assert [a["sha256"] for a in answers] == [_sha(good1), named, _sha(good2)]
    assert answers[1]["error"] == "hash_mismatch" and _sha(wrong) in answers[1]["detail"]
    assert "size" not in answers[1] and answers[0]["size"] == len(good1) and answers[2]["size"] == len(good2)
    assert _user(server, admin, "check", json={"sha256": [_sha(good1), named, _sha(good2)]}).json() == {
        "missing": [named]
    }
    # The same on the agent side; only the matching entries become the node's uploads.
    agent = make_agent("mismatcher")
    named2 = _sha(b"named by the node")
    r = agent.post_raw(AGENT + "upload", data=_tar(b"node blob (mismatch test)", (named2, wrong)))
    assert [a.get("error") for a in r.json()["blobs"]] == [None, "hash_mismatch"]
    r = agent.post_raw(AGENT + "check", json={"sha256": [_sha(b"node blob (mismatch test)"), named2]})
    assert r.json() == {"missing": [named2]}


def test_a_stream_cut_short_keeps_the_complete_entries_and_leaves_no_partial_file(thread_server):
    srv, admin = thread_server, thread_server.admin()
    whole, cut = b"a complete entry", b"an entry cut in the middle " * 40
    body = _tar(whole, cut, end=False)
    r = _user(srv, admin, "upload", data=body[: len(body) - 700])  # inside the second entry's bytes
    assert r.status_code == 400 and r.json()["error"] == "bad_batch", r.text
    assert [b["sha256"] for b in r.json()["blobs"]] == [_sha(whole)]
    assert _stored(srv, whole) and not _stored(srv, cut)
    assert _partials(srv) == []
    # Inside its padding: its bytes all came and matched, so it is stored; the stream is still refused.
    r = _user(srv, admin, "upload", data=body[: len(body) - 2])
    assert r.status_code == 400 and r.json()["error"] == "bad_batch", r.text
    assert [b["sha256"] for b in r.json()["blobs"]] == [_sha(whole), _sha(cut)]
    assert _stored(srv, cut) and _partials(srv) == []
    # cut inside a header, or at an entry's end without the end-of-archive blocks
    for stream in (_tar(whole, end=False) + bulk.header(_sha(cut), len(cut))[:100], _tar(whole, end=False), b""):
        r = _user(srv, admin, "upload", data=stream)
        assert r.status_code == 400 and r.json()["error"] == "bad_batch", r.text


def test_a_node_that_goes_away_mid_entry_leaves_no_partial_file_and_keeps_what_was_complete(thread_server):
    srv = thread_server
    row = srv.admin().post(srv.url + "/api/v1/agents", json={"name": "leaver"}, timeout=10).json()
    agent = FakeAgent(srv.url, row["token"], row["id"])
    # The cut entry is larger than the entries read whole (SMALL_ENTRY): it streams into a partial file.
    whole, cut = b"complete before the node left", b"never finished " * 100_000
    body = _tar(whole, cut)
    head = (
        f"POST {AGENT}upload HTTP/1.1\r\nhost: 127.0.0.1\r\nx-token: {agent.token}\r\n"
        f"content-type: {bulk.CONTENT_TYPE}\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head + body[: len(body) // 2])
        poll_for(lambda: _stored(srv, whole), what="the complete entry stored")
        poll_for(lambda: _partials(srv), what="the cut entry's partial file")
    # The server sees the client leave: the cut entry's partial file goes, and the complete one is
    # recorded as the node's upload (it may read it back).
    poll_for(
        lambda: agent.post_raw(AGENT + "check", json={"sha256": [_sha(whole)]}).json() == {"missing": []},
        what="the node's upload recorded",
    )
    assert _partials(srv) == [] and not _stored(srv, cut)


@pytest.mark.parametrize(
    "kind",
    ["directory", "symlink", "not a sha256 name", "upper-case sha256", "not a tar at all"],
)
def test_an_entry_that_is_not_a_regular_file_named_by_a_sha256_is_a_bad_batch(server, admin, kind):
    first = b"stored before the bad entry (%s)" % kind.encode()
    data = b"some bytes"
    if kind == "not a tar at all":
        bad = b"GIF89a" + b"\x01" * 506
    elif kind in ("not a sha256 name", "upper-case sha256"):
        info = tarfile.TarInfo("a.jpg" if kind == "not a sha256 name" else _sha(data).upper())
        info.size = len(data)
        bad = info.tobuf(format=tarfile.USTAR_FORMAT) + data + bulk.padding(len(data))
    else:
        info = tarfile.TarInfo(_sha(data))
        info.type = tarfile.DIRTYPE if kind == "directory" else tarfile.SYMTYPE
        info.linkname = "/etc/passwd" if kind == "symlink" else ""
        bad = info.tobuf(format=tarfile.USTAR_FORMAT)
    r = _user(server, admin, "upload", data=_tar(first, end=False) + bad + bulk.TAR_END)
    assert r.status_code == 400 and r.json()["error"] == "bad_batch", r.text
    assert [b["sha256"] for b in r.json()["blobs"]] == [_sha(first)]
    assert _user(server, admin, "check", json={"sha256": [_sha(first), _sha(data)]}).json() == {"missing": [_sha(data)]}


def test_the_hash_lists_are_bounded_and_checked(server, admin, make_agent):
    agent = make_agent("lister")
    too_many = [f"{i:064x}" for i in range(bulk.MAX_COUNT + 1)]
    for op in ("check", "download"):
        r = _user(server, admin, op, json={"sha256": too_many})
        assert r.status_code == 400 and r.json()["error"] == "batch_too_large", r.text
        r = agent.post_raw(AGENT + op, json={"sha256": too_many})
        assert r.status_code == 400 and r.json()["error"] == "batch_too_large", r.text
        for bad in (_sha(b"y").upper(), _sha(b"y") + "\n", _sha(b"y")[:63]):
            r = _user(server, admin, op, json={"sha256": [_sha(b"x"), bad]})
            assert r.status_code == 400 and r.json()["error"] == "bad_sha256", r.text
            assert "entry 1" in r.json()["detail"]
        for body in ({"sha256": []}, {"sha256": "0" * 64}, {"sha256": [1]}, {}):
            r = _user(server, admin, op, json=body)
            assert r.status_code == 400 and r.json()["error"] == "invalid_request", (body, r.text)
        # the user API refuses a field it does not know; the agent protocol ignores it
        r = _user(server, admin, op, json={"sha256": [_sha(b"x")], "sha265": []})
        assert r.status_code == 400 and r.json()["error"] == "unknown_field", r.text
        r = agent.post_raw(AGENT + op, json={"sha256": [_sha(b"x")], "later": 1})
        assert r.status_code == 200, r.text
    # MAX_COUNT itself is fine
    r = _user(server, admin, "check", json={"sha256": too_many[:-1]})
    assert r.status_code == 200 and len(r.json()["missing"]) == bulk.MAX_COUNT


def test_an_upload_past_the_batch_bounds_is_refused_from_that_entry_on(thread_server, monkeypatch):
    srv, admin = thread_server, thread_server.admin()
    blobs = [b"bounded %d" % i for i in range(4)]
    monkeypatch.setattr(bulk, "MAX_COUNT", 2)
    r = _user(srv, admin, "upload", data=_tar(*blobs))
    assert r.status_code == 400 and r.json()["error"] == "batch_too_large", r.text
    assert [b["sha256"] for b in r.json()["blobs"]] == [_sha(d) for d in blobs[:2]]
    assert [_stored(srv, d) for d in blobs] == [True, True, False, False]
    assert _partials(srv) == []
    monkeypatch.setattr(bulk, "MAX_COUNT", 100)
    monkeypatch.setattr(bulk, "MAX_BYTES", 25)
    big = [b"x" * 10, b"y" * 10, b"z" * 10]
    r = _user(srv, admin, "upload", data=_tar(*big))
    assert r.status_code == 400 and r.json()["error"] == "batch_too_large", r.text
    assert [_stored(srv, d) for d in big] == [True, True, False]


def test_a_download_past_max_bytes_is_refused_before_it_streams(thread_server, monkeypatch):
    srv, admin = thread_server, thread_server.admin()
    blobs = [b"a" * 100, b"b" * 100]
    assert _user(srv, admin, "upload", data=_tar(*blobs)).status_code == 200
    monkeypatch.setattr(bulk, "MAX_BYTES", 150)
    r = _user(srv, admin, "download", json={"sha256": [_sha(d) for d in blobs]})
    assert r.status_code == 400 and r.json()["error"] == "batch_too_large", r.text
    r = _user(srv, admin, "download", json={"sha256": [_sha(blobs[1])]})
    assert r.status_code == 200 and _untar(r.content) == [(_sha(blobs[1]), blobs[1])]


def test_a_node_reaches_only_the_blobs_of_its_tasks_and_its_own_uploads(server, admin, client, make_agent):
    agent = make_agent("scoped")
    mine, theirs = b"an item of my task's project", b"an item of another project"
    h_mine, h_theirs = client.upload_bytes(mine), client.upload_bytes(theirs)
    p_mine = client.create_project(
        "bulk-mine", [{"name": "ds", "items": [{"name": "a.jpg", "sha256": h_mine, "size": len(mine)}]}]
    )
    client.create_project(
        "bulk-theirs", [{"name": "ds", "items": [{"name": "b.jpg", "sha256": h_theirs, "size": len(theirs)}]}]
    )
    _running_task(client, agent, project_id=p_mine["id"])
    never = _sha(b"stored nowhere")
    r = agent.post_raw(AGENT + "check", json={"sha256": [h_mine, h_theirs, never]})
    assert r.status_code == 200 and r.json() == {"missing": [h_theirs, never]}
    r = agent.post_raw(AGENT + "download", json={"sha256": [h_theirs, h_mine, never]})
    assert r.status_code == 200, r.text
    assert r.headers[bulk.BULK_MISSING_HEADER] == "2"
    assert _untar(r.content) == [(h_mine, mine)]
    # the user side sees both
    r = _user(server, admin, "download", json={"sha256": [h_theirs, h_mine]})
    assert _untar(r.content) == [(h_theirs, theirs), (h_mine, mine)]

    # What the node uploads in a batch it may read back; sending another project's bytes proves
    # it holds them, as a single PUT does.
    own = b"a result of the node (bulk)"
    r = agent.post_raw(AGENT + "upload", data=_tar(own, theirs))
    assert r.status_code == 200, r.text
    assert [b["created"] for b in r.json()["blobs"]] == [True, False]
    r = agent.post_raw(AGENT + "check", json={"sha256": [_sha(own), h_theirs, never]})
    assert r.json() == {"missing": [never]}
    r = agent.post_raw(AGENT + "download", json={"sha256": [_sha(own), h_theirs]})
    assert _untar(r.content) == [(_sha(own), own), (h_theirs, theirs)]
    assert r.headers[bulk.BULK_MISSING_HEADER] == "0"
    # another node reaches none of it
    other = make_agent("unrelated")
    r = other.post_raw(AGENT + "download", json={"sha256": [_sha(own), h_mine]})
    assert r.status_code == 200 and _untar(r.content) == [] and r.headers[bulk.BULK_MISSING_HEADER] == "2"


def test_the_blob_quota_refuses_entries_one_by_one(own_server):
    srv, _client, agent = own_server("--blob-quota-bytes", "3000")
    small, large, last = b"s" * 1000, b"L" * 2500, b"t" * 1500
    r = agent.post_raw(AGENT + "upload", data=_tar(small, large, last))
    assert r.status_code == 200, r.text
    answers = r.json()["blobs"]
    assert [a.get("error") for a in answers] == [None, "blob_quota_exceeded", None]
    assert [_stored(srv, d) for d in (small, large, last)] == [True, False, True]
    assert _partials(srv) == []
    r = agent.post_raw(AGENT + "check", json={"sha256": [_sha(small), _sha(large), _sha(last)]})
    assert r.json() == {"missing": [_sha(large)]}


def test_a_blob_collected_during_a_download_ends_the_stream_short_of_its_length(tmp_path):
    """The listing said three blobs; the second went before its turn: the stream stops there, without
    the end-of-archive blocks, so it is shorter than the content-length it was sent with."""
    store = BlobStore(tmp_path / "blobs")
    blobs = [b"one" * 100, b"two" * 100, b"three" * 100]
    for d in blobs:
        path = store.path(_sha(d))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(d)
    entries = [(_sha(d), len(d)) for d in blobs]
    whole = b"".join(server_bulk.tar_stream(store, entries))
    assert len(whole) == server_bulk.tar_length(entries)
    assert _untar(whole) == [(_sha(d), d) for d in blobs]
    store.path(_sha(blobs[1])).unlink()
    cut = b"".join(server_bulk.tar_stream(store, entries))
    assert cut == _tar(blobs[0], end=False)
    assert len(cut) < server_bulk.tar_length(entries)


def test_the_stream_comes_in_pieces_of_about_a_megabyte(tmp_path):
    """Many small blobs are joined into pieces (few thread hops); a large one is read in pieces."""
    store = BlobStore(tmp_path / "blobs")
    blobs = [i.to_bytes(2, "big") * 1500 for i in range(800)] + [b"L" * (3 * server_bulk.PIECE + 5)]
    for d in blobs:
        path = store.path(_sha(d))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(d)
    entries = [(_sha(d), len(d)) for d in blobs]
    pieces = list(server_bulk.tar_stream(store, entries))
    assert max(len(p) for p in pieces) < server_bulk.PIECE + 2 * bulk.BLOCK
    assert len(pieces) < 10
    assert _untar(b"".join(pieces)) == [(_sha(d), d) for d in blobs]


def test_the_routes_are_in_openapi_with_their_bodies(server):
    import requests

    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    for prefix in (USER, AGENT):
        upload = spec["paths"][prefix + "upload"]["post"]
        assert list(upload["requestBody"]["content"]) == [bulk.CONTENT_TYPE]
        assert "tar stream" in upload["description"]
        download = spec["paths"][prefix + "download"]["post"]
        assert bulk.CONTENT_TYPE in download["responses"]["200"]["content"]
        check = spec["paths"][prefix + "check"]["post"]
        assert "missing" in check["description"]


def test_reading_an_upload_lets_other_requests_run_once_per_chunk():
    """A body that arrives faster than it is stored never makes the server's receive() wait: the
    reader itself hands the event loop over once per chunk, so other requests are not held up."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    chunks = [_tar(*(b"chunk %d entry %d" % (c, e) for e in range(20)), end=False) for c in range(30)]

    async def body():  # never suspends, as a fully buffered request body
        for c in chunks:
            yield c

    async def run() -> tuple[int, int]:
        ticks = 0

        async def other_request():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(other_request())
        await asyncio.sleep(0)
        reader, read = server_bulk.BodyReader(body()), 0
        while data := await reader.some(1 << 20):
            read += len(data)
        other.cancel()
        return ticks, read

    # A loop of its own on a thread of its own: a browser test may leave one running on this thread.
    with ThreadPoolExecutor(1) as ex:
        ticks, read = ex.submit(asyncio.run, run()).result()
    assert read == sum(len(c) for c in chunks)
    assert ticks >= len(chunks)
