"""The soak's arithmetic and workload, without a broker: the slope fit, the warm-up, the mix and the poison."""

from __future__ import annotations

import pytest

from service.avro.codec import AvroCodec
from service.core.errors import DecodeError
from service.core.events import EventKind
from service.streams import schema_set
from tests.soak.__main__ import Run, poison_value, slope, split, warmup_records, with_poison


def test_slope_is_the_least_squares_fit() -> None:
    assert slope([(0.0, 100.0), (1.0, 102.0), (2.0, 104.0)]) == pytest.approx(2.0)
    assert slope([(0.0, 100.0), (1.0, 103.0), (2.0, 100.0), (3.0, 103.0)]) == pytest.approx(0.6)
    assert slope([(0.0, 1.0), (1.0, 2.0)]) is None  # too few points
    assert slope([(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]) is None  # no spread


def test_warmup_keeps_start_up_out_of_the_fit() -> None:
    assert warmup_records(10_000_000, 0.1) == 1_000_000
    assert warmup_records(200_000, 0.1) == 100_000
    assert warmup_records(20_000, 0.1) == 10_000


def test_split_follows_the_mix_and_loses_nothing() -> None:
    assert split(20_000, (0.5, 0.25, 0.25)) == {"inference": 10_000, "row_update": 5_000, "log_update": 5_000}
    assert sum(split(7, (1 / 3, 1 / 3, 1 / 3)).values()) == 7


def test_poison_comes_after_every_nth_record_across_chunks() -> None:
    run = Run()
    first = list(with_poison((b"v%d" % i for i in range(5)), 2, 0, run))
    second = list(with_poison((b"v%d" % i for i in range(5, 8)), 2, 5, run))
    values = first + second
    assert run.poison == 4
    assert [v for v in values if not v.startswith(b"v")] == [poison_value(n) for n in range(1, 5)]
    assert values.index(poison_value(1)) == 2  # after v0 and v1


@pytest.mark.parametrize("kind", list(EventKind))
async def test_poison_is_dead_lettered_as_undecodable(kind: EventKind) -> None:
    with pytest.raises(DecodeError):
        await AvroCodec(schema_set()).decode(kind, poison_value(1))
