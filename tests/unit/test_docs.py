"""The docs stay true to the code: the settings page is generated from Settings, the README
stays a short front page that maps the site (`make test` builds the site with `mkdocs build
--strict`, so a broken link fails too)."""

from __future__ import annotations

from imagegen.core.settings import Settings, markdown_table
from tests.stack import ROOT


def test_settings_page_matches_the_settings() -> None:
    page = (ROOT / "docs" / "settings.md").read_text()
    assert markdown_table() in page, (
        "stale table: run `imagegen settings-table --readme docs/settings.md`"
    )
    for name in Settings.model_fields:
        assert f"IMAGEGEN_{name.upper()}" in page


def test_readme_gives_the_two_commands_and_stays_short() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 200


def test_every_docs_page_is_in_the_site_and_linked_from_the_readme() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f" {page.name}" in config, f"{page.name} is missing from mkdocs.yml's nav"
        if page.name != "index.md":
            assert f"(docs/{page.name})" in readme, f"the README's map lacks {page.name}"
