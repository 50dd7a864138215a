"""Gap-aware offsets: only the contiguous prefix of done records is committable, whatever order they finish in."""

from __future__ import annotations

import random

import pytest

from service.kafka.offsets import OffsetTracker


def tracker(offsets: range | list[int]) -> OffsetTracker:
    t = OffsetTracker()
    for offset in offsets:
        t.add(offset)
    return t


def test_nothing_done_is_nothing_to_commit() -> None:
    t = tracker(range(10, 15))

    assert t.committable() is None
    assert t.pending == 5


def test_an_empty_tracker_has_nothing_to_commit() -> None:
    t = OffsetTracker()

    assert t.committable() is None
    assert t.pending == 0


@pytest.mark.parametrize(
    ("done", "committable", "pending"),
    [
        pytest.param([10], 11, 4, id="head"),
        pytest.param([10, 11, 12], 13, 2, id="prefix"),
        pytest.param([11, 12], None, 5, id="gap-at-head"),
        pytest.param([10, 12, 13], 11, 4, id="gap-in-the-middle"),
        pytest.param([14, 13, 12, 11, 10], 15, 0, id="reverse-order"),
        pytest.param([12, 10, 14, 11], 13, 2, id="shuffled"),
    ],
)
def test_contiguous_prefix(done: list[int], committable: int | None, pending: int) -> None:
    t = tracker(range(10, 15))

    for offset in done:
        t.done(offset)

    assert t.committable() == committable
    assert t.pending == pending


def test_out_of_order_completion_commits_once_the_gap_closes() -> None:
    t = tracker(range(5))
    t.done(1)
    t.done(2)
    t.done(4)
    assert t.committable() is None

    t.done(0)
    assert t.committable() == 3
    assert t.pending == 2

    t.done(3)
    assert t.committable() == 5
    assert t.pending == 0


def test_the_committable_offset_never_goes_back() -> None:
    t = tracker(range(3))
    t.done(0)
    t.done(1)
    assert t.committable() == 2

    t.add(3)
    t.add(4)
    t.done(4)

    assert t.committable() == 2


def test_offsets_with_holes_commit_past_the_last_done_record() -> None:
    # Compacted topics and transaction markers leave holes: the next record, not offset+1, is where a restart begins.
    t = tracker([100, 105, 106, 120])

    t.done(105)
    assert t.committable() is None
    t.done(100)
    assert t.committable() == 106
    t.done(106)
    assert t.committable() == 107
    t.done(120)
    assert t.committable() == 121


def test_records_added_after_progress_extend_the_prefix() -> None:
    t = tracker([0])
    t.done(0)

    t.add(1)
    t.add(2)
    assert t.pending == 2
    t.done(2)
    assert t.committable() == 1
    t.done(1)
    assert t.committable() == 3


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
def test_a_hundred_thousand_records(order: str) -> None:
    count = 100_000
    t = tracker(range(count))
    offsets = list(range(count))
    if order == "reverse":
        offsets.reverse()
    elif order == "shuffled":
        random.Random(17).shuffle(offsets)

    for offset in offsets[:-1]:
        t.done(offset)
    last = offsets[-1]
    assert t.committable() == (last if last else None)
    assert t.pending == count - last

    t.done(last)

    assert t.committable() == count
    assert t.pending == 0


def test_interleaved_random_completion_matches_a_model() -> None:
    rng = random.Random(4)
    t = OffsetTracker()
    added: list[int] = []
    done: set[int] = set()
    next_offset = 0
    prefix = 0
    for _ in range(5000):
        if not added or len(done) == len(added) or rng.random() < 0.4:
            t.add(next_offset)
            added.append(next_offset)
            next_offset += 1
        else:
            offset = rng.choice([o for o in added[prefix:] if o not in done])
            done.add(offset)
            t.done(offset)
        while prefix < len(added) and added[prefix] in done:
            prefix += 1
        expected = added[prefix - 1] + 1 if prefix else None
        assert t.committable() == expected
        assert t.pending == len(added) - prefix
