"""The documentation stays true: generated tables match what they are generated from, links and cited paths
exist, and the dead-letter reason codes and metrics it lists are the ones the service gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.ops.metrics import Metrics
from tests.support.settings_doc import (
    MAKE_TARGETS,
    ROOT,
    SETTINGS,
    documented_reasons,
    make_targets_table,
    settings_table,
)

REGENERATE = "run `python -m tests.support.settings_doc --write`"


def _documents() -> list[Path]:
    """The user's documentation: README, docs/, the schemas' and the chart's READMEs."""
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "schemas" / "README.md",
        ROOT / "helm" / "inference-bridge" / "README.md",
    ]


_FENCE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", flags=re.MULTILINE)


def _prose(text: str) -> str:
    """The text without fenced code blocks, where `#` starts a comment and `[x](y)` is not a link."""
    return _FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (hyphens and underscores kept), spaces as hyphens."""
    anchors: set[str] = set()
    for heading in _HEADING.findall(_prose(path.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _links(path: Path) -> list[str]:
    return _LINK.findall(_CODE_SPAN.sub("", _prose(path.read_text())))


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file_and_heading(document: Path) -> None:
    broken = []
    for link in _links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:: not this repository's
            continue
        target, _, anchor = link.partition("#")
        path = (document.parent / target).resolve() if target else document
        if not path.exists():
            broken.append(f"{link}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, broken


# Repository paths the documents cite in code spans, e.g. `service/ops/runtime.py` or `tests/unit/test_fuzz_*.py`.
_CITED = re.compile(r"`((?:service|tests|bench|helm|mk|schemas|docs|kafka-runtime|\.ci)/[\w./*-]*)(?:::\w+)?`")


@pytest.mark.parametrize("document", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_repository_path_exists(document: Path) -> None:
    missing = sorted(
        cited
        for cited in set(_CITED.findall(document.read_text()))
        if not (list(ROOT.glob(cited)) if "*" in cited else (ROOT / cited).exists())
    )
    assert not missing, f"{document.relative_to(ROOT)} cites paths that do not exist: {missing}"


def test_the_settings_table_matches_the_settings_model() -> None:
    assert SETTINGS.read() == settings_table(), f"docs/configuration.md's settings table is stale: {REGENERATE}"


def test_the_test_commands_table_matches_the_makefile() -> None:
    assert MAKE_TARGETS.read() == make_targets_table(), f"docs/testing.md's commands table is stale: {REGENERATE}"


def _service_sources() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "service").rglob("*.py")))


def test_every_reason_the_service_gives_is_documented() -> None:
    given = set(re.findall(r"\breason=\"([a-z0-9-]+)\"", _service_sources()))
    assert given, 'no reason="..." found in service/: this test no longer reads the code it should'
    undocumented = given - documented_reasons()
    assert not undocumented, (
        f"dead-letter reasons without a row in docs/semantics.md (Reason codes) or schemas/README.md: {undocumented}"
    )


def test_every_documented_reason_is_one_the_service_gives() -> None:
    sources = _service_sources()
    stale = {code for code in documented_reasons() - {"http-<status>"} if f'"{code}"' not in sources}
    assert not stale, f"documented dead-letter reasons that service/ never gives: {stale}"
    assert 'f"http-{' in sources, "the service no longer gives http-<status>"


def test_the_metrics_table_lists_every_metric_with_its_type() -> None:
    exported = {
        (family.name + ("_total" if family.type == "counter" else ""), family.type)
        for family in Metrics().registry.collect()
        if family.name.startswith("bridge_")
    }
    operations = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(bridge_[a-z_]+)` \| (counter|gauge|histogram) \|", operations, re.MULTILINE))
    assert exported, "Metrics exports no bridge_* family: this test no longer reads what it should"
    assert documented == exported, (
        f"docs/operations.md's metrics table differs from service/ops/metrics.py: "
        f"not exported {sorted(documented - exported)}, not documented {sorted(exported - documented)}"
    )
