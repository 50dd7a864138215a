"""The fault suite's accounting and figures, on hand-made recordings: what counts as delivered, duplicated, lost
or wrongly dead-lettered, which orders are checked, and when a figure fails its scenario. No broker, no service."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.scenarios import Figure, Letter, ScenarioResult, Sent, account, time_to
from tests.support.fake_apis import Endpoint, ReceivedRequest

PIPELINE = "p-1"


def inference(rid: str) -> Sent:
    return Sent(rid, "inference", "inf", 0, b"", ("publish", rid), None, inference_id=f"id-{rid}")


def log_update(rid: str, reference: str, position: int, poison: str | None = None) -> Sent:
    order = None if poison else (("update_log", reference), position)
    return Sent(rid, "log_update", "logs", 1, b"", ("update_log", reference, rid), order, poison=poison)


def call(endpoint: Endpoint, body: Any, query: dict[str, str], status: int = 200, at: float = 0.0) -> ReceivedRequest:
    return ReceivedRequest(endpoint, "POST", "/", query, {}, b"", body, status, None, at)


def publish(*rids: str, at: float = 0.0) -> ReceivedRequest:
    rows = [{"chaos_id": rid, "inference_id": f"id-{rid}"} for rid in rids]
    return call("publish", {"rows": rows, "config": {}}, {}, at=at)


def patch_log(rid: str, reference: str, status: int = 200, at: float = 0.0) -> ReceivedRequest:
    return call("update_log", {"output": rid}, {"reference_id": reference}, status, at)


def letter(rid: str, reason: str, topic: str = "logs", partition: str = "1") -> Letter:
    headers = {"bridge.reason": reason, "__connect.errors.topic": topic, "__connect.errors.partition": partition}
    return Letter(rid, headers)


def test_publish_calls_may_overtake_each_other_but_updates_of_a_key_may_not() -> None:
    records = [inference("i1"), inference("i2"), log_update("l1", "r", 0), log_update("l2", "r", 1)]

    fine = account("t", records, [publish("i2"), publish("i1"), patch_log("l1", "r"), patch_log("l2", "r")], [])
    swapped = account("t", records, [publish("i1", "i2"), patch_log("l2", "r"), patch_log("l1", "r")], [])

    assert fine.passed, fine.problems
    assert not swapped.passed
    assert any("out of produced order" in p for p in swapped.problems)


def test_duplicates_are_counted_apart_and_a_valid_dead_letter_fails() -> None:
    records = [inference("i1"), log_update("l1", "r", 0), log_update("bad", "x", 0, poison="api-rejected")]
    requests = [publish("i1"), publish("i1"), patch_log("l1", "r"), patch_log("l1", "r", status=503)]
    letters = [letter("bad", "http-422"), letter("bad", "http-422"), letter("l1", "http-401")]

    result = account("t", records, requests, letters)

    assert (result.duplicate_deliveries, result.duplicate_dead_letters, result.duplicates) == (1, 1, 2)
    assert (result.delivered, result.dead_lettered, result.valid_dead_lettered, result.lost) == (2, 2, 1, 0)
    assert not result.passed
    assert "duplicate_deliveries=1 duplicate_dead_letters=1" in result.line()


def test_lost_records_are_named() -> None:
    result = account("t", [inference("i1"), log_update("l1", "r", 0)], [publish("i1")], [])

    assert result.lost == 1
    assert any("lost 1 record" in p for p in result.problems)


@pytest.mark.parametrize(
    ("figure", "met", "text"),
    [
        (Figure("share", 0.83, 0.5, target_name="target"), True, "share=0.83 target=0.5"),
        (Figure("share", 0.42, 0.5, target_name="target"), False, "share=0.42 target=0.5"),
        (Figure("share", 0.02, 0.5, bound=True), False, "share=<0.02 target_share=0.5"),
        (Figure("share_429", 0.04, 0.1, at_most=True, target_name="max_429"), True, "share_429=0.04 max_429=0.1"),
        (Figure("resume_s", 61.0, 10, at_most=True, digits=1, bound=True), False, "resume_s=>61.0 max_resume_s=10"),
        (Figure("limit", 300, digits=0), True, "limit=300"),
    ],
)
def test_figures_print_their_target_and_fail_when_missed(figure: Figure, met: bool, text: str) -> None:
    result = ScenarioResult("t", 1, delivered=1, figures=(figure,))

    assert figure.text() == text
    assert result.passed is met
    assert (result.missed == []) is met
    assert result.line().endswith(f"{text} result={'pass' if met else 'fail'}")


def test_time_to_a_share_of_the_records() -> None:
    done = {"a": 10.5, "b": 11.0, "c": 14.0}

    assert time_to(done, ["a", "b", "c", "d"], 0.5, started=10.0) == 1.0
    assert time_to(done, ["a", "b", "c", "d"], 0.75, started=10.0) == 4.0
    assert time_to(done, ["a", "b", "c", "d"], 1.0, started=10.0) is None
    assert time_to(done, [], 0.9, started=10.0) == 0.0
