"""docs/apps.md lists exactly the public API methods the server registers, each with its HTTP verb."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "apps.md"
SECTION = "## Supported public API methods"
ROW = re.compile(r"^\| `([^`]+)` \| (GET|POST) \| (.+) \|$")


def documented() -> dict[str, str]:
    """{method: verb} from the table of the doc's methods section."""
    text = DOC.read_text()
    assert SECTION in text, f"docs/apps.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [ROW.match(line) for line in section.splitlines() if line.startswith("| `")]
    assert all(rows), [line for line in section.splitlines() if line.startswith("| `") and not ROW.match(line)]
    names = [m.group(1) for m in rows]
    assert len(names) == len(set(names)), "a method is listed twice"
    return {m.group(1): m.group(2) for m in rows}


def registered() -> dict[str, str]:
    """{method: verb} of server.public.registry.METHODS (a STREAM method is a POST with a raw body)."""
    from server.public import files, read, tasks, write  # noqa: F401  (they register their methods)
    from server.public.registry import METHODS

    return {name: "GET" if verb == "GET" else "POST" for name, (verb, _) in METHODS.items()}


def test_the_doc_lists_exactly_the_registered_methods():
    doc, server = documented(), registered()
    assert sorted(doc.keys() - server.keys()) == [], "documented but not served"
    assert sorted(server.keys() - doc.keys()) == [], "served but not documented"
    assert doc == server, {k: (doc[k], server[k]) for k in doc if doc[k] != server[k]}


def test_the_check_catches_a_missing_method(monkeypatch):
    from server.public.registry import METHODS

    registered()
    monkeypatch.setitem(METHODS, "videos.list", ("POST", None))
    assert "videos.list" in registered().keys() - documented().keys()
