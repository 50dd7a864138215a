"""README's settings table, generated from the settings model so the two cannot drift apart.

`python -m tests.support.settings_doc --write` rewrites the table between the markers in README.md;
a unit test fails when README's table differs from what the model says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _type(field: FieldInfo) -> str:
    text = str(field.annotation)
    for noise in ("typing.", "pydantic.types.", "pathlib.", "<class '", "'>"):
        text = text.replace(noise, "")
    optional = text.startswith("Optional[")
    if optional:
        text = text.removeprefix("Optional[").removesuffix("]")
    if text.startswith("Literal["):
        text = "one of " + text.removeprefix("Literal[").removesuffix("]")
    return text + (" | None" if optional else "")


def _default(field: FieldInfo, name: str) -> str:
    if field.is_required():
        return "**required**"
    if name == "schemas_dir":
        return "`<repo>/schemas`"
    value: Any = field.get_default(call_default_factory=True)
    return f"`{json.dumps(value, default=str)}`"


def _rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for sub, sub_field in section.model_fields.items():
                env = f"{ENV_PREFIX}{name.upper()}{ENV_DELIMITER}{sub.upper()}"
                rows.append((env, _type(sub_field), _default(sub_field, sub), sub_field.description or ""))
        else:
            rows.append((f"{ENV_PREFIX}{name.upper()}", _type(field), _default(field, name), field.description or ""))
    return rows


def settings_table() -> str:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for env, kind, default, meaning in _rows():
        cells = [f"`{env}`", kind, default, meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def readme_table(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    text = README.read_text()
    if "--write" in argv:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        README.write_text(f"{head}{START}\n{settings_table()}\n{END}{tail}")
        return 0
    print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
