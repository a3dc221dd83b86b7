"""The docs document what the code has and stand on their own: every setting, the two first-screen
commands, and no link or path that leaves the repository."""

import re
import subprocess
from pathlib import Path

import pytest

from node.config import SETTINGS, markdown_table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = sorted(
    ROOT / p
    for p in subprocess.run(
        ["git", "ls-files", "-c", "-o", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
)

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
UP_PATH = re.compile(r"(?<![.\w])((?:\.\./)+[\w./-]*)")
MD_NAME = re.compile(r"(?<![\w./-])([\w./-]*[\w-]+\.md)\b")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _inside(base: Path, target: str) -> Path | None:
    """The repository file that `target` names from `base`, or None when it is outside or missing."""
    path = (base / target).resolve()
    return path if path.is_relative_to(ROOT) and path.exists() else None


def test_every_setting_is_in_the_readme_table():
    missing = [s.env for s in SETTINGS if f"| `{s.env}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"
    assert markdown_table() in README, "regenerate README's table: python -m node.config"


def test_first_screen_has_the_two_commands_and_ci_runs_the_second():
    first_screen = "\n".join(README.splitlines()[:24])
    assert "./run.sh demo" in first_screen and "./run.sh test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh test" in ci


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_link_or_path_leaves_the_repository(doc):
    text = doc.read_text()
    bad = []
    for target in INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text):
        if target.startswith("#"):
            continue
        if SCHEME.match(target) or target.startswith("/") or not _inside(doc.parent, target.split("#")[0]):
            bad.append(f"link {target}")
    for path in UP_PATH.findall(text):
        if not (doc.parent / path).resolve().is_relative_to(ROOT):
            bad.append(f"path {path}")
    for name in MD_NAME.findall(text):
        if not (_inside(doc.parent, name) or _inside(ROOT, name)):
            bad.append(f"names {name}, which the repository does not have")
    assert not bad, f"{doc.relative_to(ROOT)}: {bad}"


def test_the_link_check_catches_what_it_should(tmp_path):
    text = (
        "see [design](../shared/DESIGN.md), [site](https://example.com), `../../etc/x`, DESIGN.md, "
        "[ok](docs/protocol.md), `PUT .../blobs/x`"
    )
    links = INLINE_LINK.findall(text)
    assert links == ["../shared/DESIGN.md", "https://example.com", "docs/protocol.md"]
    assert [t for t in links if SCHEME.match(t) or not _inside(ROOT, t)] == links[:2]
    assert UP_PATH.findall(text) == ["../shared/DESIGN.md", "../../etc/x"]
    assert [n for n in MD_NAME.findall(text) if not _inside(ROOT, n)] == ["../shared/DESIGN.md", "DESIGN.md"]


def test_screenshots_have_one_documented_refresh_command():
    assert "./run.sh screenshots" in README
    assert "./run.sh screenshots" in (ROOT / "docs" / "console.md").read_text()
    usage = subprocess.run(["bash", str(ROOT / "run.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert "screenshots" in usage.stdout
    conftest = (ROOT / "tests" / "browser" / "conftest.py").read_text()
    assert '"docs" / "screenshots"' not in conftest, "tests write screenshots to a temporary dir"
