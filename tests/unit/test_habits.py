"""House rules that live in files rather than code, checked offline: the dependency locks agree with
pyproject.toml and with each other, and CHANGELOG.md keeps its shape. `make lock-check` asks PyPI whether the
locks are still the current resolution; this proves they install what pyproject.toml asks for and that the
tests run on the image's versions.

requirements.lock is what the image installs; requirements-dev.lock is what `make install` and CI install (the
Makefile says how `make lock` makes both).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"

# One entry of a pip-compile lock: `name==version \` and then its `--hash=sha256:...` lines.
ENTRY = re.compile(r"^([A-Za-z0-9][\w.-]*)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.MULTILINE)


def _lock(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """Normalised name -> (version, hashes) of every package a lock pins."""
    text = path.read_text()
    entries: dict[str, tuple[str, frozenset[str]]] = {
        canonicalize_name(name): (version, frozenset(re.findall(r"sha256:[0-9a-f]{64}", hashes)))
        for name, version, hashes in ENTRY.findall(text)
    }
    pinned_lines = re.findall(r"^[A-Za-z0-9]\S*==", text, flags=re.MULTILINE)
    assert len(entries) == len(pinned_lines), f"{path.name}: a pinned line without hashes, or in another form"
    return entries


def _requirements(*extras: str) -> list[Requirement]:
    """The runtime dependencies, the given extras and the build backend, as pyproject.toml states them."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        pyproject: dict[str, Any] = tomllib.load(f)
    project = pyproject["project"]
    texts = [*project["dependencies"], *pyproject["build-system"]["requires"]]
    texts += [text for extra in extras for text in project["optional-dependencies"][extra]]
    return [Requirement(text) for text in texts]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [(RUNTIME_LOCK, ()), (DEV_LOCK, ("dev",))],
    ids=["requirements.lock", "requirements-dev.lock"],
)
def test_a_lock_pins_what_pyproject_asks_for(lock: Path, extras: tuple[str, ...]) -> None:
    pinned = _lock(lock)
    unmet = {}
    for requirement in _requirements(*extras):
        version = pinned.get(canonicalize_name(requirement.name), ("missing", frozenset()))[0]
        if version == "missing" or not requirement.specifier.contains(version, prereleases=True):
            unmet[str(requirement)] = version
    assert not unmet, f"{lock.name} does not satisfy pyproject.toml (run make lock): {unmet}"


def test_the_dev_lock_has_the_image_s_pins_with_the_same_hashes() -> None:
    runtime, dev = _lock(RUNTIME_LOCK), _lock(DEV_LOCK)
    differ = {name: (pin[0], dev.get(name, ("missing", frozenset()))[0]) for name, pin in runtime.items()}
    differ = {name: versions for name, versions in differ.items() if dev.get(name) != runtime[name]}
    # (image, dev) versions per package; equal versions mean the hashes differ.
    assert not differ, f"requirements-dev.lock differs from requirements.lock (run make lock): {differ}"


def test_the_dev_lock_holds_what_an_offline_make_install_needs() -> None:
    # pip upgrades itself from the lock; setuptools builds the editable install without build isolation.
    assert {"pip", "setuptools"} <= _lock(DEV_LOCK).keys()


def test_the_changelog_opens_with_unreleased_and_releases_only_versions_up_to_pyproject_s() -> None:
    # Keep a Changelog: `## [Unreleased]` first, then `## [X.Y.Z] - YYYY-MM-DD`, newest first; a release is
    # never ahead of the version pyproject.toml would build.
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings[:1] == ["[Unreleased]"]
    released = [re.fullmatch(r"\[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}", heading) for heading in headings[1:]]
    assert all(released), f"a heading that is not `## [X.Y.Z] - YYYY-MM-DD`: {headings[1:]}"
    versions = [Version(match.group(1)) for match in released if match]
    with (ROOT / "pyproject.toml").open("rb") as f:
        current = Version(tomllib.load(f)["project"]["version"])
    assert versions == sorted(versions, reverse=True), "releases newest first"
    assert all(version <= current for version in versions), (versions, current)
