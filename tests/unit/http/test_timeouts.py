"""Attempt timeouts follow the latency of recent successes, within the floor and the configured read timeout."""

from __future__ import annotations

from service.http.timeouts import AttemptTimeout, TimeoutSettings, escalated

SETTINGS = TimeoutSettings(ceiling_s=30.0, floor_s=2.0, factor=4.0, samples=100, min_samples=20, refresh_every=10)


def test_the_cold_timeout_applies_until_enough_successes_were_seen() -> None:
    timeout = AttemptTimeout(SETTINGS)
    for _ in range(19):
        timeout.observe(0.005)
    assert timeout.seconds == 5.0


def test_the_cold_timeout_never_exceeds_the_read_timeout() -> None:
    assert AttemptTimeout(TimeoutSettings(ceiling_s=1.0, floor_s=0.5)).seconds == 1.0


def test_fast_answers_give_the_floor() -> None:
    timeout = AttemptTimeout(SETTINGS)
    for _ in range(100):
        timeout.observe(0.005)
    assert timeout.seconds == 2.0


def test_slow_answers_give_a_multiple_of_their_p99() -> None:
    timeout = AttemptTimeout(SETTINGS)
    for i in range(100):
        timeout.observe(1.5 if i % 10 == 0 else 0.5)  # 10% at 1.5 s: the p99 is 1.5 s
    assert timeout.seconds == 6.0


def test_never_beyond_the_read_timeout() -> None:
    timeout = AttemptTimeout(SETTINGS)
    for _ in range(100):
        timeout.observe(20.0)
    assert timeout.seconds == 30.0


def test_old_samples_age_out() -> None:
    timeout = AttemptTimeout(SETTINGS)
    for _ in range(100):
        timeout.observe(5.0)
    assert timeout.seconds == 20.0
    for _ in range(100):
        timeout.observe(0.01)
    assert timeout.seconds == 2.0


def test_an_escalated_timeout_doubles_up_to_the_ceiling_and_never_overflows() -> None:
    assert [escalated(0.05, 0.5, n) for n in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    # A call cut for hours counts past 1,024 doublings, where 2.0 ** n alone raises OverflowError.
    assert escalated(2.0, 30.0, 5000) == 30.0
