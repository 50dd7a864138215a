"""The version is written once, in pyproject.toml's [project] table; every other place must say the same.

service.__version__ reads it from the installed distribution. The chart's appVersion (the image tag a release
uses when image.tag is empty), the Dockerfile's label default (a plain `docker build .`; `make image` passes the
version itself) and the image tags shown in the documentation and the full test values are copies a bump has to
update, so they are checked here. The chart's own `version` is not: it tracks chart changes, not the service.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

import yaml

import service

ROOT = Path(__file__).resolve().parents[2]


def _project_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    assert "version" not in project.get("dynamic", []), "the version is written in pyproject.toml, not derived"
    return str(project["version"])


def test_the_package_reports_the_version_of_pyproject() -> None:
    # A mismatch here means the installed metadata is stale: `make install` reinstalls when pyproject.toml changes.
    assert service.__version__ == version("inference-bridge") == _project_version()


def test_the_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "inference-bridge" / "Chart.yaml").read_text())
    assert chart["appVersion"] == _project_version()


def test_the_dockerfile_label_defaults_to_the_package_version() -> None:
    defaults = re.findall(r"^ARG VERSION=(\S*)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)
    assert defaults == [_project_version()]


def test_image_tags_in_examples_are_the_package_version() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    tags = {
        (name, tag)
        for name in tracked
        if (ROOT / name).is_file()
        for tag in re.findall(r"image\.tag=([^\s\\]+)", (ROOT / name).read_text())
    }
    full_values = yaml.safe_load((ROOT / "tests" / "helm" / "values-full.yaml").read_text())
    tags.add(("tests/helm/values-full.yaml", full_values["image"]["tag"]))
    assert {tag for _, tag in tags} == {_project_version()}, sorted(tags)
