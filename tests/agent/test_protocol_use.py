"""The agent speaks protocol/: its task states, its API client's paths, headers and errors, and
its log-shipper's reading of the durable log line are protocol's, not copies of them."""

from __future__ import annotations

import http.server
import json
import threading
import types

import pytest

import agent.states
from agent.log_shipper import LogShipper, TaskCursor
from agent.task_process import AgentTaskContext
from node import tasklog
from node.api import AgentAPI
from node.config import load_config
from node.masking import Masker
from node.storage import ensure_layout
from protocol import endpoints, logline
from protocol.errors import APIError, AuthError
from protocol.states import IllegalTransition, TaskState
from tests.support.procs import free_port

TOKEN = "Tok3nTok3nTok3nTok3nTok3nTok3n12"
SHA = "ab" * 32


@pytest.fixture
def config(tmp_path):
    c = load_config(
        {"SERVER_ADDRESS": "http://127.0.0.1:1", "ACCESS_TOKEN": TOKEN, "AGENT_HOST_DIR": str(tmp_path / "root")}
    )
    ensure_layout(c)
    return c


# --- task states ---
def _context(task: dict, adopt: bool = False):
    posted = []
    proc = types.SimpleNamespace(
        task=task,
        config=None,
        gpus=[],
        adopt=adopt,
        set_phase_title=lambda phase: None,
        reporter=types.SimpleNamespace(put_phase=posted.append),
    )
    return AgentTaskContext(proc, api=None, stop_event=threading.Event()), posted


def test_the_task_process_reports_protocol_task_states():
    assert not hasattr(agent.states, "TaskState")  # one definition: protocol.states
    ctx, posted = _context({"id": 1, "type": "custom"})
    assert ctx.state is TaskState.ASSIGNED
    for phase in ("preparing", "running", "running", "uploading"):
        ctx.set_phase(phase)
        assert type(ctx.state) is TaskState
    assert posted == ["preparing", "running", "uploading"]  # a repeat is a progress update, not posted
    with pytest.raises(IllegalTransition):
        ctx.set_phase("preparing")  # protocol.states.check_transition refuses it
    for not_a_phase in ("finished", "queued", "assigned"):
        with pytest.raises(ValueError):
            ctx.set_phase(not_a_phase)


def test_an_adopted_task_starts_from_its_leased_protocol_state():
    ctx, _ = _context({"id": 2, "type": "custom", "state": "running"}, adopt=True)
    assert ctx.state is TaskState.RUNNING
    ctx, _ = _context({"id": 3, "type": "custom", "state": "lost"}, adopt=True)
    assert ctx.state is TaskState.ASSIGNED


# --- the API client: paths and headers from protocol.endpoints, errors from protocol.errors ---
class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every agent call like the server would and records (method, path, token)."""

    seen: list = []
    answer: tuple | None = None  # (status, body): answer the next call with this

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        Recorder.seen.append((self.command, self.path, self.headers.get(endpoints.AGENT_TOKEN_HEADER), body))
        if Recorder.answer is not None:
            status, payload = Recorder.answer
            Recorder.answer = None
            return self._reply(status, payload)
        if self.command == "GET" and "/blobs/" in self.path:
            data = b"0123456789"
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            return self._reply(206 if start else 200, data[start:], "application/octet-stream")
        self._reply(200, json.dumps({"acked": 4, "ok": True}).encode())

    do_GET = do_POST = do_PUT = do_HEAD = _handle


@pytest.fixture
def recorder():
    Recorder.seen, Recorder.answer = [], None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Recorder)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_the_api_client_builds_its_calls_from_protocol_endpoints(recorder, tmp_path):
    api = AgentAPI(recorder, TOKEN, timeout=5, retries=0)
    api.connect({})
    api.poll(1, [], [], wait=0)
    api.set_state(7, TaskState.RUNNING)
    assert api.send_logs(7, 0, [{"message": "x"}]) == 4
    api.telemetry({})
    api.blob_exists(SHA)
    api.post_results(7, "artifacts", "a", [])
    blob = tmp_path / "b.bin"
    blob.write_bytes(b"012")
    api.put_blob(SHA, blob)
    part = tmp_path / "part"
    part.write_bytes(b"0123")
    got = []
    import hashlib

    assert api.get_blob(SHA, part, size=10, on_bytes=got.append) == hashlib.sha256(b"0123456789").hexdigest()
    assert part.read_bytes() == b"0123456789" and sum(got) == 6  # resumed with Range after 4 bytes
    p = endpoints.path
    assert [(m, path) for m, path, _, _ in Recorder.seen] == [
        ("POST", endpoints.CONNECT),
        ("POST", endpoints.POLL + "?wait=0"),
        ("POST", p(endpoints.TASK_STATE, task_id=7)),
        ("POST", p(endpoints.TASK_LOGS, task_id=7)),
        ("POST", endpoints.TELEMETRY),
        ("HEAD", p(endpoints.AGENT_BLOB, sha256=SHA)),
        ("POST", p(endpoints.TASK_RESULTS, task_id=7)),
        ("PUT", p(endpoints.AGENT_BLOB, sha256=SHA)),
        ("GET", p(endpoints.AGENT_BLOB, sha256=SHA)),
    ]
    assert {tok for _, _, tok, _ in Recorder.seen} == {TOKEN}
    assert json.loads(Recorder.seen[2][3]) == {"state": "running"}  # the enum goes as its value


def test_the_api_client_raises_protocol_errors(recorder):
    api = AgentAPI(recorder, TOKEN, timeout=5, retries=0)
    Recorder.answer = (409, json.dumps({"error": "illegal_transition", "detail": "no", "state": "finished"}).encode())
    with pytest.raises(APIError) as e:
        api.set_state(7, "running")
    err = e.value
    assert (err.status, err.code, err.detail, err.extra) == (409, "illegal_transition", "no", {"state": "finished"})
    assert (err.method, err.path) == ("POST", endpoints.path(endpoints.TASK_STATE, task_id=7))
    Recorder.answer = (401, json.dumps({"error": "unauthorized", "detail": "bad token"}).encode())
    with pytest.raises(AuthError):
        api.poll(1, [], [], wait=0)
    dead = AgentAPI(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2, retries=0)
    with pytest.raises(APIError) as e:
        dead.connect({})
    assert e.value.status is None and e.value.code == "no_answer" and TOKEN not in str(e.value)


# --- the durable log line: the writer's encoding is protocol's, and the shipper reads it the same way ---
def test_writer_encodes_and_shipper_reads_protocol_log_lines(config):
    lines = [
        {"ts": 1.5, "cts": 3, "level": "info", "stream": "stdout", "message": "usual"},
        {"message": "x", "event_type": "metrics", "metrics": {"loss": 0.5}},
        {},
    ]
    w = tasklog.TaskLogWriter(config, 11, Masker(TOKEN))
    w.write(lines)
    w.close()
    raw = w.path.read_bytes()
    assert raw.decode() == "".join(logline.encode(i, line) for i, line in enumerate(lines))
    shipper = LogShipper(config)
    cur = TaskCursor(config, 11)
    got, ends = shipper.read_batch(cur)
    assert [logline.seq_of(r) for r in got] == [0, 1, 2]
    assert [logline.parse(r) for r in got] == [{"seq": i, **line} for i, line in enumerate(lines)]
    assert ends[-1] == len(raw)


def test_shipper_skips_what_is_not_a_log_line_and_counts_it(config):
    tasklog.task_logs_dir(config, 12).mkdir(parents=True)
    path = tasklog.new_log_path(config, 12)
    good = [logline.encode(i, {"message": f"m{i}"}).encode() for i in range(4)]
    path.write_bytes(
        good[0]
        + b"garbage-without-seq\n"
        + good[1]
        + b'{"seq":"2"}\n\n'
        + good[2]
        + b'{"seq":1,"message":"again"}\n'
        + good[3]
        + b'{"seq":99,"message":"ahead"}\n'
    )
    shipper = LogShipper(config)
    cur = TaskCursor(config, 12)
    got, ends = shipper.read_batch(cur)
    assert got == [g.rstrip(b"\n") for g in good]
    assert shipper.bad_lines == cur.bad_lines == 4
    shipper.read_batch(cur)  # read again (a failed send): not counted twice
    assert shipper.bad_lines == 4
