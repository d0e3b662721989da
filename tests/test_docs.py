"""The README stays true to the code: its settings table is generated from Settings."""

from __future__ import annotations

from imagegen.settings import Settings, markdown_table
from tests.stack import ROOT


def test_readme_settings_table_matches_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, (
        "stale table: run `imagegen settings-table --readme README.md`"
    )
    for name in Settings.model_fields:
        assert f"IMAGEGEN_{name.upper()}" in readme


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
