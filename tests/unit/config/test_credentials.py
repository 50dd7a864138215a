"""An API key follows its file: re-read on demand, at most once a second, never logged, never lost to a bad file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from service.config.credentials import MAX_SECRET_FILE_BYTES, ApiKey, SecretFileError, read_secret_file

OLD_KEY = "ol-old-key-3f9a11"
NEW_KEY = "ol-new-key-8b2c47"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "openlayer-api-key"
    path.write_text(OLD_KEY + "\n")
    return path


def rotate(path: Path, content: str) -> None:
    # As the kubelet does: the new content appears whole (it swaps a symlink to a new directory).
    staged = path.with_name(path.name + ".new")
    staged.write_text(content)
    staged.replace(path)


def api_key(path: Path | None, clock: FakeClock, changes: list[str] | None = None) -> ApiKey:
    on_change = None if changes is None else changes.append
    return ApiKey("openlayer", OLD_KEY, path, on_change=on_change, clock=clock)


# --- read_secret_file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [OLD_KEY, OLD_KEY + "\n", OLD_KEY + "\r\n", f"  {OLD_KEY} \n\n"])
def test_a_secret_file_loses_surrounding_whitespace(tmp_path: Path, content: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)

    assert read_secret_file(path) == OLD_KEY


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "No such file or directory", id="missing"),
        pytest.param(b"", "is empty", id="empty"),
        pytest.param(b"\n \n", "is empty", id="blank"),
        pytest.param(b"\xffsecret", "is not UTF-8 text", id="not-text"),
        pytest.param(b"k" * (MAX_SECRET_FILE_BYTES + 1), "larger than", id="huge"),
    ],
)
def test_an_unusable_secret_file_names_the_path_and_the_problem(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(SecretFileError) as info:
        read_secret_file(path)

    assert str(path) in str(info.value)
    assert problem in str(info.value)
    assert "secret" not in str(info.value).replace(str(tmp_path), ""), "the content is never quoted"


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match="Is a directory"):
        read_secret_file(tmp_path)


# --- ApiKey --------------------------------------------------------------------------------------------------------


def test_value_is_the_key_it_was_built_with(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)

    assert key.value == OLD_KEY
    assert (key.name, key.path) == ("openlayer", key_file)


def test_reload_picks_up_a_rotated_key_and_says_so(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)
    rotate(key_file, NEW_KEY + "\n")

    assert key.reload() is True
    assert key.value == NEW_KEY


def test_reload_of_an_unchanged_file_says_nothing_changed(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)

    assert key.reload() is False
    assert key.value == OLD_KEY


def test_a_key_without_a_file_never_reloads(clock: FakeClock) -> None:
    changes: list[str] = []
    key = api_key(None, clock, changes)

    assert key.reload() is False
    assert key.value == OLD_KEY
    assert changes == []


def test_reload_reads_the_file_at_most_once_per_second(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)
    assert key.reload() is False  # a read: the file still holds the old key
    rotate(key_file, NEW_KEY)

    # A burst of 401s within the second: no read, the old key stays.
    for _ in range(1000):
        assert key.reload() is False
    clock.advance(0.999)
    assert key.reload() is False
    assert key.value == OLD_KEY

    clock.advance(0.001)
    assert key.reload() is True
    assert key.value == NEW_KEY


def test_the_first_reload_is_never_held_back(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)
    rotate(key_file, NEW_KEY)

    assert key.reload() is True


def test_the_interval_counts_failed_reads_too(key_file: Path, clock: FakeClock) -> None:
    key = api_key(key_file, clock)
    key_file.unlink()
    assert key.reload() is False
    key_file.write_text(NEW_KEY)

    assert key.reload() is False, "within the second of a failed read"
    clock.advance(1.0)
    assert key.reload() is True


def test_the_interval_can_be_chosen(key_file: Path, clock: FakeClock) -> None:
    key = ApiKey("openlayer", OLD_KEY, key_file, clock=clock, min_interval_s=10.0)
    key.reload()
    rotate(key_file, NEW_KEY)

    clock.advance(9.0)
    assert key.reload() is False
    clock.advance(1.0)
    assert key.reload() is True


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(lambda p: p.unlink(), id="missing"),
        pytest.param(lambda p: p.write_text(""), id="empty"),
        pytest.param(lambda p: p.write_text("\n"), id="blank"),
        pytest.param(lambda p: p.write_bytes(b"\xff\xfe"), id="not-text"),
        pytest.param(lambda p: p.write_text(f"{NEW_KEY}\n{OLD_KEY}\n"), id="two-lines"),
        pytest.param(lambda p: p.write_text(f"\u201c{NEW_KEY}\u201d"), id="not-ascii"),
    ],
)
def test_an_unusable_file_keeps_the_current_key(
    key_file: Path, clock: FakeClock, spoil: Callable[[Path], object]
) -> None:
    changes: list[str] = []
    key = api_key(key_file, clock, changes)
    spoil(key_file)

    assert key.reload() is False
    assert key.value == OLD_KEY
    assert changes == []


def test_an_unusable_file_is_warned_about_once_per_distinct_problem(
    key_file: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    key = api_key(key_file, clock)
    caplog.set_level(logging.INFO, logger="service.config.credentials")

    def reload_after_a_second() -> None:
        clock.advance(1.0)
        key.reload()

    key_file.unlink()
    for _ in range(5):
        reload_after_a_second()
    key_file.write_text("")
    for _ in range(5):
        reload_after_a_second()
    key_file.unlink()
    reload_after_a_second()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "No such file or directory" in warnings[0]
    assert "is empty" in warnings[1]
    for warning in warnings:
        assert "openlayer" in warning
        assert str(key_file) in warning
        assert "keeping the current key" in warning


def test_a_problem_is_warned_about_again_after_the_file_was_good(
    key_file: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    key = api_key(key_file, clock)
    caplog.set_level(logging.WARNING, logger="service.config.credentials")

    key_file.unlink()
    key.reload()
    key_file.write_text(OLD_KEY)
    clock.advance(1.0)
    key.reload()
    key_file.unlink()
    clock.advance(1.0)
    key.reload()

    assert len(caplog.records) == 2


def test_the_key_never_reaches_a_log_line_or_its_repr(
    key_file: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = api_key(key_file, clock)
    rotate(key_file, NEW_KEY)
    key.reload()
    key_file.write_text("")
    clock.advance(1.0)
    key.reload()

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "a new key was read" in logged
    for secret in (OLD_KEY, NEW_KEY):
        assert secret not in logged
        assert secret not in repr(key)
    assert str(key_file) in repr(key)


def test_on_change_hears_each_new_key_before_calls_use_it(key_file: Path, clock: FakeClock) -> None:
    key: ApiKey
    seen: list[tuple[str, str]] = []

    def on_change(new: str) -> None:
        seen.append((new, key.value))  # the value calls use is still the old one

    key = ApiKey("openlayer", OLD_KEY, key_file, on_change=on_change, clock=clock)
    rotate(key_file, NEW_KEY)
    key.reload()
    clock.advance(1.0)
    key.reload()  # unchanged: not heard again
    rotate(key_file, OLD_KEY)
    clock.advance(1.0)
    key.reload()

    assert seen == [(NEW_KEY, OLD_KEY), (OLD_KEY, NEW_KEY)]
    assert key.value == OLD_KEY


def test_a_failing_on_change_leaves_the_key_unchanged(key_file: Path, clock: FakeClock) -> None:
    def on_change(new: str) -> None:
        raise RuntimeError("redactor refused")

    key = ApiKey("openlayer", OLD_KEY, key_file, on_change=on_change, clock=clock)
    rotate(key_file, NEW_KEY)

    with pytest.raises(RuntimeError):
        key.reload()
    assert key.value == OLD_KEY


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="openlayer"):
        ApiKey("openlayer", "")
