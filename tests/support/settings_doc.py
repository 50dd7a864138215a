"""The documentation's generated tables, so that the docs and what they describe cannot drift apart.

- docs/configuration.md: every setting, generated from the settings model;
- docs/testing.md: the test commands, generated from the Makefile's `##` help texts (what `make help` prints,
  durations included, so a duration is written once, in the mk file).

`python -m tests.support.settings_doc --write` rewrites each table between its markers; tests/unit/test_docs.py
fails when a table differs from what it is generated from. `documented_reasons` reads the dead-letter reason
codes the documentation promises (the fuzzer judges by them; tests/unit/test_docs.py checks them against the
service's code).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.config.settings import ENV_DELIMITER, ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
TESTING = ROOT / "docs" / "testing.md"

# The commands docs/testing.md describes, in its order.
TEST_TARGETS = ("test", "test-unit", "lint", "demo", "chaos", "fuzz", "compat", "soak", "bench")

# `make help` lists the lines `target: prerequisites ## help` of the Makefile and mk/*.mk (Makefile, target help).
_HELP_LINE = re.compile(r"^([a-z-]+):.*?## (.+)$", flags=re.MULTILINE)


@dataclass(frozen=True)
class Table:
    """A generated table in a document, between two HTML comment markers."""

    path: Path
    name: str

    @property
    def start(self) -> str:
        return f"<!-- {self.name}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def read(self) -> str:
        """The table as the document holds it now."""
        text = self.path.read_text()
        return text.split(self.start, 1)[1].split(self.end, 1)[0].strip()

    def write(self, table: str) -> None:
        head, rest = self.path.read_text().split(self.start, 1)
        tail = rest.split(self.end, 1)[1]
        self.path.write_text(f"{head}{self.start}\n{table}\n{self.end}{tail}")


SETTINGS = Table(CONFIGURATION, "settings")
MAKE_TARGETS = Table(TESTING, "make-targets")


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


def _cells(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def settings_table() -> str:
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    lines += [_cells([f"`{env}`", kind, default, meaning]) for env, kind, default, meaning in _rows()]
    return "\n".join(lines)


def make_help(root: Path = ROOT) -> dict[str, str]:
    """Target -> help text, from the same lines `make help` reads."""
    helps: dict[str, str] = {}
    for path in [root / "Makefile", *sorted((root / "mk").glob("*.mk"))]:
        for target, text in _HELP_LINE.findall(path.read_text()):
            helps.setdefault(target, text.strip())
    return helps


def make_targets_table(root: Path = ROOT) -> str:
    helps = make_help(root)
    missing = [target for target in TEST_TARGETS if target not in helps]
    if missing:
        raise LookupError(f"no `## help` line for make {', '.join(missing)} in the Makefile or mk/*.mk")
    lines = ["| command | what it does (`make help`) |", "|---|---|"]
    lines += [_cells([f"`make {target}`", helps[target]]) for target in TEST_TARGETS]
    return "\n".join(lines)


def _table_codes(text: str, heading: str) -> set[str]:
    """The codes in the first column of the table under `heading`, up to the next heading of any level."""
    section = text.split(f"{heading}\n", 1)[1]
    section = re.split(r"^#", section, maxsplit=1, flags=re.MULTILINE)[0]
    return set(re.findall(r"^\| `([a-z][a-z0-9<>-]*)`", section, flags=re.MULTILINE))


def documented_reasons(root: Path = ROOT) -> frozenset[str]:
    """Every `bridge.reason` code the documentation lists in a table: docs/semantics.md's reason codes and the
    table of rejections in schemas/README.md. `http-<status>` stands for every HTTP status."""
    semantics = _table_codes((root / "docs" / "semantics.md").read_text(), "### Reason codes")
    schemas = _table_codes((root / "schemas" / "README.md").read_text(), "## What the bridge rejects")
    return frozenset(semantics | schemas)


def main(argv: list[str]) -> int:
    if "--write" in argv:
        SETTINGS.write(settings_table())
        MAKE_TARGETS.write(make_targets_table())
        return 0
    print(settings_table())
    print()
    print(make_targets_table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
