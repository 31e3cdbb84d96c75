"""The settings as a markdown table: the README's settings section is this module's output.

    python -m jobs.settings_doc            print the table
    python -m jobs.settings_doc README.md  rewrite the table between the README's markers

`tests/test_settings_doc.py` fails when the README's table and the settings class differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from jobs.settings import Settings

BEGIN = "<!-- settings table: python -m jobs.settings_doc README.md -->"
END = "<!-- end of settings table -->"


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from (its first alias, else HYPERSD_<NAME>)."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    prefix = Settings.model_config.get("env_prefix", "")
    return f"{prefix}{name}".upper()


def default_text(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "–"
    if isinstance(field.default, (list, dict)):
        return f"`{json.dumps(field.default)}`"
    return f"`{field.default}`"


def markdown_table() -> str:
    """One row per setting: variable, default and what it does."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env_name(name, field)}` | {default_text(field)} | {description} |")
    return "\n".join(rows) + "\n"


def with_table(text: str) -> str:
    """`text` with the table between its markers replaced by the current one."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{markdown_table()}{text[end:]}"


def main(argv: list[str]) -> int:
    if not argv:
        print(markdown_table(), end="")
        return 0
    path = Path(argv[0])
    path.write_text(with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
