"""Imports only flow downwards: no service module imports from a layer above its own (docs/architecture.md).

Every import statement counts, wherever it is (inside a function, under TYPE_CHECKING): each is a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"

LAYERS: dict[str, int] = {
    "core": 0,
    "config": 1,
    "ops": 2,
    "kafka": 3,
    "avro": 3,
    "http": 3,
    "apis": 4,
    "streams": 5,
    "pipeline": 6,
    "app": 7,
    "tools": 8,
    "__main__": 8,
}
"""Each top-level module or package of `service`, by layer, lowest first; `service/__init__.py` (the version)
is below them all."""
PEERS = {"kafka", "avro", "http"}
"""One layer, three packages that know nothing of each other: Kafka, Avro and HTTP meet only in the pipeline."""


def _modules() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def _part_of(path: Path) -> str | None:
    """The top-level part of `service` a file belongs to, or None for service/__init__.py."""
    relative = path.relative_to(SERVICE)
    if relative.parts == ("__init__.py",):
        return None
    return relative.parts[0].removesuffix(".py")


def _package_of(path: Path) -> list[str]:
    parts = ["service", *path.relative_to(SERVICE).with_suffix("").parts]
    return parts if parts[-1] == "__init__" and parts.pop() else parts[:-1]


def _imported_parts(path: Path, source: str | None = None) -> set[str | None]:
    """The top-level parts of `service` that `path` (or `source`, read as if it were `path`) imports.

    None stands for `service` itself.
    """
    found: set[str | None] = set()
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)[: len(_package_of(path)) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from service import x` imports the module service.x when x is one.
            names = [f"{module}.{alias.name}" if module == "service" else module for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "service":
                found.add(parts[1] if len(parts) > 1 and parts[1] in LAYERS else None)
    return found


def test_every_top_level_part_has_a_layer() -> None:
    parts = {part for path in _modules() if (part := _part_of(path)) is not None}

    assert parts <= LAYERS.keys(), f"give {sorted(parts - LAYERS.keys())} a layer here and in docs/architecture.md"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SERVICE)))
def test_imports_flow_downwards(path: Path) -> None:
    own = _part_of(path)
    if own is None:
        assert _imported_parts(path) <= {None}, "service/__init__.py sits below every layer"
        return
    upwards = sorted(
        {part for part in _imported_parts(path) if part is not None} - {own},
    )
    upwards = [part for part in upwards if LAYERS[part] > LAYERS[own]]
    assert not upwards, f"{own} (layer {LAYERS[own]}) imports from higher layers: {upwards}"


@pytest.mark.parametrize(
    "path", [p for p in _modules() if _part_of(p) in PEERS], ids=lambda p: str(p.relative_to(SERVICE))
)
def test_kafka_avro_and_http_import_nothing_of_each_other(path: Path) -> None:
    own = _part_of(path)
    others = sorted({part for part in _imported_parts(path) if part is not None} & PEERS - {own})

    assert not others, f"{own} imports {others}"


def test_the_checker_sees_an_upward_import() -> None:
    """The checker itself: an upward import, written the three ways the service could write it, is found."""
    as_if = SERVICE / "kafka" / "probe.py"  # relative imports resolve as if the probe sat in service/kafka/
    probes = {
        "from service.streams import STREAMS\n": {"streams"},
        "def f() -> None:\n    import service.pipeline\n": {"pipeline"},
        "from ..apis import openlayer\n": {"apis"},
        "from service import app\n": {"app"},
    }
    for source, parts in probes.items():
        assert _imported_parts(as_if, source) == parts, source
