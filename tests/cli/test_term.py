"""The CLI prints what nodes and task containers wrote without letting it drive the terminal."""

from __future__ import annotations

import argparse

from client import cli
from client.term import safe
from protocol.errors import APIError

ATTACKS = [
    "\x1b]52;c;ZWNobyBwd25lZA==\x07",  # OSC 52: write the reader's clipboard
    "\x1b]0;root@prod\x07",  # set the window title
    "\x1b[2J\x1b[H",  # clear the screen
    "ok\rFAKED",  # overwrite the line it is on
    "\x9b31m",  # an 8-bit CSI
    "\u202egnp.exe",  # bidirectional override
]


def _assert_inert(out: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\x9b", "\u202e"):
        assert ch not in out, f"{ch!r} reached the terminal"


def test_safe_escapes_controls_and_keeps_plain_text():
    assert safe("loss\t0.5 ünïcode ✓") == "loss\t0.5 ünïcode ✓"
    assert safe("\x1b[2J") == "\\x1b[2J" and safe("a\nb") == "a\\x0ab" and safe("\u202e") == "\\u202e"
    assert safe(None) == "" and safe(7) == "7"


class _Client:
    def __init__(self, lines):
        self.lines = lines

    def iter_logs(self, task_id, follow=False):
        yield from self.lines

    def get_task(self, task_id):
        return {"id": task_id, "state": "failed", "error": "boom \x1b]0;title\x07", "exit_code": 1}

    def list_agents(self):
        return [{"id": 1, "name": "node\x1b[31mred", "status": "online", "allowed_task_types": ["train"]}]


def test_task_logs_print_terminal_escapes_as_text(capsys):
    lines = [
        {
            "seq": i,
            "ts": 0,
            "message": m,
            "stream": "stderr" if i % 2 else "stdout",
            "level": "warning\x1b[1m" if i == 3 else "info",
        }
        for i, m in enumerate(ATTACKS)
    ]
    rc = cli.tasks_logs(_Client(lines), argparse.Namespace(id=4, follow=True, json=False))
    out, err = capsys.readouterr()
    assert rc == 1
    _assert_inert(out + err)
    assert out.count("\n") == len(ATTACKS), "one printed line per log line"
    assert "\\x1b]52;c;ZWNobyBwd25lZA==\\x07" in out and "ok\\x0dFAKED" in out
    assert "boom \\x1b]0;title\\x07" in err


def test_tables_and_errors_escape_names_and_details(capsys, monkeypatch):
    assert cli.nodes_list(_Client([]), argparse.Namespace(json=False)) == 0

    class Refusing:
        def __init__(self, *a):
            pass

        def list_agents(self):
            raise APIError(400, "bad_name", "name '\x1b[2J' is not allowed")

    monkeypatch.setattr(cli, "UserClient", Refusing)
    assert cli.main(["--token", "t" * 32, "nodes", "list"]) == 1
    out, err = capsys.readouterr()
    _assert_inert(out + err)
    assert "node\\x1b[31mred" in out and "name '\\x1b[2J'" in err
