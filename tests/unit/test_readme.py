"""README is the user's manual: its commands and its settings table must match the code."""

from __future__ import annotations

from tests.support.settings_doc import README, readme_table, settings_table


def test_readme_settings_table_matches_the_settings_model() -> None:
    assert readme_table(README.read_text()) == settings_table(), (
        "README's settings table is stale: run `python -m tests.support.settings_doc --write`"
    )


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text()[:1500]
    assert "make demo" in head
    assert "make test" in head
