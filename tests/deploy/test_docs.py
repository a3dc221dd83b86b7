"""The README documents what the code has: every setting, the two first-screen commands."""
from pathlib import Path

from node.config import SETTINGS, markdown_table

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table():
    missing = [s.env for s in SETTINGS if f"| `{s.env}` |" not in README]
    assert not missing, f"README's configuration table lacks {missing}"
    assert markdown_table() in README, "regenerate README's table: python -m node.config"


def test_first_screen_has_the_two_commands_and_ci_runs_the_second():
    first_screen = "\n".join(README.splitlines()[:24])
    assert "./run.sh demo" in first_screen and "./run.sh test" in first_screen
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "./run.sh test" in ci
