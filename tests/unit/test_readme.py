"""README is the front page: the two commands first, what they need, and short enough to stay one."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text()[:1500]
    assert "make demo" in head
    assert "make test" in head


def test_readme_says_that_make_test_needs_go() -> None:
    # `make test` builds helm and Prometheus with `go install` (mk/helm.mk, mk/prometheus.mk).
    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `make test` |"))
    assert "Go" in row


def test_readme_stays_a_front_page() -> None:
    # The manual lives in docs/; README keeps to what the service is, the two commands, the diagram, the
    # guarantee, a quick start and the links (about 150 lines).
    assert len(README.read_text().splitlines()) <= 180
