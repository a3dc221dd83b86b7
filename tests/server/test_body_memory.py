"""A large JSON body's cost on the server (server/http/errors.py BodyLimitMiddleware, server/http/strict.py):
held once, decoded once and lean, and only LARGE_AT_ONCE of them at a time per process.

The RSS tests post project bodies near the 64 MiB limit to a server subprocess and read its peak
RSS (VmHWM) growth; the others run the middleware and the decoder in this process."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from protocol import endpoints
from protocol.errors import APIError
from server.http import errors, strict
from server.http.errors import BodyLimitMiddleware
from server.settings import Settings

pytestmark = pytest.mark.any_database("a body is held and decoded before any statement runs")

MiB = 1024 * 1024
META = {"classes": [{"title": "p", "shape": "polygon", "color": "#FF0000"}], "tags": []}
_OBJ = {
    "classTitle": "p",
    "geometryType": "polygon",
    "tags": [],
    "points": {"exterior": [[0, 0], [7, 7], [14, 14]], "interior": []},
}
ANN = {"size": {"height": 64, "width": 64}, "tags": [], "objects": [_OBJ] * 9300}  # about 1 MiB


def _items(sha: str, size: int, n: int = 60) -> list[dict]:
    return [{"name": f"{i}.png", "sha256": sha, "size": size, "ann": ANN} for i in range(n)]


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _dumps(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _peak(pid: int) -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open(f"/proc/{pid}/status") if ln.startswith("VmHWM:"))


# --- the RSS of a server process ---


@pytest.mark.slow
@pytest.mark.server_process
@pytest.mark.timeout(600)
def test_a_project_result_near_the_limit_is_held_once_and_posting_it_again_costs_no_more(own_server):
    """One server, one body near the limit, posted twice: the first post is held once, and the
    second (as after an agent restart: the stored project is compared) costs no more."""
    srv, client, agent = own_server()
    img = _png()
    sha = agent.upload(img)
    tid = client.create_task(agent.id, "inference", image="img:1")["id"]
    agent.poll(free_slots=1)
    assert agent.state_raw(tid, "running").status_code == 200
    body = _dumps(
        {"kind": "project", "name": "preds", "meta": META, "datasets": [{"name": "ds", "items": _items(sha, len(img))}]}
    )
    assert 58 * MiB < len(body) < 64 * MiB  # the route's limit is 64 MiB
    before = _peak(srv.proc.pid)
    pids, growth = [], []
    for _ in range(2):
        r = agent.post_raw(
            endpoints.path(endpoints.TASK_RESULTS, task_id=tid),
            data=body,
            timeout=300,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text[:300]
        pids.append(r.json()["results"]["project_id"])
        growth.append(_peak(srv.proc.pid) - before)
    print(
        f"server peak RSS growth for a {len(body) / MiB:.0f} MiB project result: {growth[0] / MiB:.0f} MiB, "
        f"posted again: {growth[1] / MiB:.0f} MiB"
    )
    # Decoded twice (middleware, then FastAPI) and held three times it was 1.24 GB.
    assert growth[0] < 760 * MiB, growth
    assert pids[0] == pids[1]  # the same project, not stored twice
    # Compared with the stored project read whole, annotations included, the re-post was 1.17 GB.
    assert growth[1] < 760 * MiB, growth


@pytest.mark.slow
@pytest.mark.server_process
@pytest.mark.timeout(600)
def test_four_large_bodies_at_once_do_not_add_up(own_server):
    srv, client, _ = own_server()
    img = _png()
    sha = client.upload_bytes(img)
    bodies = [
        _dumps({"name": f"big{k}", "meta": META, "datasets": [{"name": "ds", "items": _items(sha, len(img))}]})
        for k in range(4)
    ]
    before = _peak(srv.proc.pid)
    start = threading.Barrier(4)
    busy = []

    def post(body: bytes) -> int:
        # As the node's client does (node/api.py): a 503 is tried again after its Retry-After.
        s = requests.Session()
        s.mount(
            "http://",
            HTTPAdapter(
                max_retries=Retry(
                    total=6,
                    status_forcelist=(503,),
                    allowed_methods=None,
                    respect_retry_after_header=True,
                    raise_on_status=False,
                )
            ),
        )
        s.hooks["response"].append(lambda r, *a, **k: busy.extend([1] * len(r.raw.retries.history or ())))
        start.wait()
        return s.post(
            srv.url + endpoints.PROJECTS,
            data=body,
            timeout=300,
            headers={"content-type": "application/json", "authorization": f"Bearer {srv.admin_token}"},
        ).status_code

    with ThreadPoolExecutor(4) as ex:
        codes = list(ex.map(post, bodies))
    assert codes == [200] * 4, codes
    growth = _peak(srv.proc.pid) - before
    # One such body costs ~600 MiB while its request runs; four at once were 4 times that.
    print(
        f"server peak RSS growth for four {len(bodies[0]) / MiB:.0f} MiB project bodies at once: "
        f"{growth / MiB:.0f} MiB ({len(busy)} answers 503 server_busy, tried again)"
    )
    assert growth < 1400 * MiB, growth


# --- the middleware's slots ---


def _run(coro):
    # A loop of its own in a thread of its own: the suite's browser tests leave one running in this thread.
    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def _request(
    mw,
    body: bytes,
    *,
    chunk: int = 256 * 1024,
    length: bool = True,
    gzipped: bool = False,
    path: str = endpoints.PROJECTS,
):
    """POST `body` to the project route through `mw` (in chunks); the answer's (status, headers, body)."""
    headers = [(b"content-type", b"application/json")]
    if length:
        headers.append((b"content-length", str(len(body)).encode()))
    if gzipped:
        headers.append((b"content-encoding", b"gzip"))
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}

    async def receive():
        if not parts:
            await asyncio.sleep(3600)  # an ASGI server waits for the disconnect
        p = parts.pop(0)
        return {"type": "http.request", "body": p, "more_body": bool(parts)}

    out = {}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"], out["headers"] = msg["status"], dict(msg["headers"])
        else:
            out["body"] = msg.get("body", b"")

    async def go():
        await mw(scope, receive, send)
        return out["status"], out["headers"], out.get("body", b"")

    return go()


class _Holding:
    """An app that holds each large request until released, counting how many it holds at once."""

    def __init__(self):
        self.inside = self.most = 0
        self.release: asyncio.Event | None = None
        self.bodies = []

    async def __call__(self, scope, receive, send):
        msg = await receive()
        self.bodies.append((len(msg["body"]), "sly.json" in scope))
        if len(msg["body"]) > MiB:
            self.inside += 1
            self.most = max(self.most, self.inside)
            await self.release.wait()
            self.inside -= 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _big(n: int = 3 * MiB) -> bytes:
    return _dumps({"name": "x", "pad": "a" * n})


def test_large_bodies_take_turns_and_the_late_ones_get_503_with_retry_after():
    app = _Holding()
    mw = BodyLimitMiddleware(app, Settings(), large_wait_s=0.5)

    async def scenario():
        app.release = asyncio.Event()
        first = [asyncio.create_task(_request(mw, _big())) for _ in range(2)]
        while app.inside < 2:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(_request(mw, _big(), length=False))  # known large as it is read
        small = await asyncio.wait_for(_request(mw, _dumps({"name": "small"})), 5)  # takes no slot
        refused = await asyncio.wait_for(waiting, 5)
        app.release.set()
        served = await asyncio.gather(*first)
        again = await _request(mw, _big())  # the slots are free again
        return small, refused, served, again

    small, refused, served, again = _run(scenario())
    assert small[0] == 200
    assert refused[0] == 503 and json.loads(refused[2])["error"] == "server_busy", refused
    assert refused[1][b"retry-after"] == str(errors.BUSY_RETRY_AFTER_S).encode()
    assert [s[0] for s in served] == [200, 200] and again[0] == 200
    assert app.most == 2  # never three large bodies at once
    assert all(decoded for _, decoded in app.bodies)


def test_a_waiting_body_goes_on_when_a_slot_frees_and_gzip_counts_its_inflated_size():
    app = _Holding()
    mw = BodyLimitMiddleware(app, Settings(), large_at_once=1, large_wait_s=30)
    packed = gzip.compress(_big(5 * MiB))
    assert len(packed) < 100_000  # small on the wire, large once inflated

    async def scenario():
        app.release = asyncio.Event()
        first = asyncio.create_task(_request(mw, _big()))
        while app.inside == 0:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(_request(mw, packed, gzipped=True))
        await asyncio.sleep(0.3)
        assert app.inside == 1 and not second.done()  # it waits for the slot, undecoded
        app.release.set()
        return await first, await asyncio.wait_for(second, 10)

    first, second = _run(scenario())
    assert first[0] == 200 and second[0] == 200 and app.most == 1
    assert app.bodies[-1] == (len(_big(5 * MiB)), True)


def test_a_slot_is_given_back_when_the_request_fails():
    async def failing(scope, receive, send):
        raise RuntimeError("the route failed")

    mw = BodyLimitMiddleware(failing, Settings(), large_at_once=1, large_wait_s=0.2)

    async def scenario():
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await _request(mw, _big())
        bad = await _request(mw, b'{"n": NaN, "pad": "' + b"a" * (2 * MiB) + b'"}')  # refused by the check
        return bad, mw.large.locked()

    bad, locked = _run(scenario())
    assert bad[0] == 400 and json.loads(bad[2])["error"] == "non_finite_number"
    assert not locked


def test_a_streamed_log_batch_takes_a_slot_too():
    app = _Holding()
    mw = BodyLimitMiddleware(app, Settings(), large_at_once=1, large_wait_s=0.3)
    seen = []

    async def reader(scope, receive, send):  # the log route reads its body itself, through the count
        try:
            while (await receive())["more_body"]:
                pass
        except APIError as e:
            seen.append(e)
            raise

    async def scenario():
        app.release = asyncio.Event()
        held = asyncio.create_task(_request(mw, _big()))
        while app.inside == 0:
            await asyncio.sleep(0.01)
        logs = _request(mw, _big(), length=False, path=endpoints.path(endpoints.TASK_LOGS, task_id=1))
        mw.app = reader
        with pytest.raises(APIError):
            await logs
        mw.app = app
        app.release.set()
        return await held

    assert _run(scenario())[0] == 200
    assert seen[0].status == 503 and seen[0].code == "server_busy" and seen[0].extra["retry_after"] > 0


# --- the decoder ---


def test_the_digit_scan_makes_no_copy_of_a_large_body():
    body = _dumps({"datasets": [{"name": "ds", "items": _items("a" * 64, 3, n=20)}]})
    assert len(body) > 19 * MiB
    tracemalloc.start()
    try:
        assert strict._scan(body, exponents=True) == (False, False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, peak  # slices of 1 MiB; a translated copy of it all was len(body)
    at_edge = b"0" * (strict._SCAN_SLICE - 10) + b"[1234567890123456789]"  # across two slices
    assert strict._scan(at_edge) == (True, False)
    assert strict._scan(b"[1e0400]", exponents=True) == (False, True)
    assert strict._scan(b"[1E-400]", exponents=True) == (False, True)


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"a": [1, 9223372036854775808]}', "integer_out_of_range"),
        (b'{"a": [1, -9223372036854775809]}', "integer_out_of_range"),
        (b'{"a": 1e400}', "non_finite_number"),
        (b'{"a": -1E+309}', "non_finite_number"),
        (b'{"a": NaN}', "non_finite_number"),
        (b'{"a": "x", "b": Infinity}', "non_finite_number"),
    ],
)
def test_a_large_body_is_held_to_the_same_rules(raw, code):
    pad = b', "pad": "' + b"a" * (2 * MiB) + b'"}'
    for lean in (False, True):
        with pytest.raises(strict.NotStrictJSON) as e:
            strict.check_body(raw[:-1] + pad, lean=lean)
        assert e.value.code == code


def test_a_large_body_decodes_as_a_small_one_does():
    raw = _dumps(
        {
            "n": [0, -1, 9223372036854775807, 1.5, 1e300, 2.5e-300],
            "s": "\u00e9\U0001f600",
            "big": "image100 e+000 1234567890123456789",
            "nested": [{"a": []}, {}],
        }
    )
    assert strict.check_body(raw, lean=True) == strict.check_body(raw) == json.loads(raw)
    lone = b'{"k\\ud800": ["x\\udc00", {"p": "\\ud83d\\ude00"}]}'
    replaced = {"k\ufffd": ["x\ufffd", {"p": "\U0001f600"}]}
    assert strict.check_body(lone, lean=True) == strict.check_body(lone) == replaced
    assert strict.check_body(b"not json", lean=True) is strict.NOT_JSON


@pytest.mark.slow
def test_a_lone_surrogate_is_replaced_in_place_not_in_a_copy():
    raw = _dumps({"datasets": [{"name": "ds", "items": _items("a" * 64, 3, n=4)}]})[:-1] + b', "x": "\\ud800"}'
    tracemalloc.start()
    try:
        value = strict.check_body(raw, lean=True)
        size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value["x"] == "\ufffd"
    # A copy of every list and object (the old replacement) was as large as the value itself.
    assert peak < 1.3 * size, (peak, size)


def test_gc_paused_nests_across_threads():
    import gc

    assert gc.isenabled()
    inside, out = threading.Event(), threading.Event()

    def other():
        with strict.gc_paused():
            inside.set()
            assert out.wait(10)

    t = threading.Thread(target=other)
    with strict.gc_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread still decodes
    out.set()
    t.join(10)
    assert gc.isenabled()
