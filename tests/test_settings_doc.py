"""The README's settings table is the settings class's: regenerate it with
`python -m jobs.settings_doc README.md` when a setting changes."""

from __future__ import annotations

from pathlib import Path

from jobs.settings import Settings
from jobs.settings_doc import BEGIN, END, markdown_table, with_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_lists_every_setting_as_the_class_defines_it() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text
    assert with_table(text) == text, "run: python -m jobs.settings_doc README.md"


def test_every_setting_says_what_it_does() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert not undocumented
    assert markdown_table().count("\n") == len(Settings.model_fields) + 2
