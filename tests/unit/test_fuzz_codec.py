"""Fuzzing decode + route with hypothesis: whatever bytes a producer sends, the record path ends in a request the
API spec accepts or a `RecordError` with a documented reason, never another exception.

Inputs: arbitrary bytes, Confluent-framed garbage (known, unknown and unusable schema ids), valid records
mutated byte by byte, and valid but hostile records (three-deep nesting, 100-column rows, huge strings, odd
unicode, NaN and infinities, 64-bit extremes), in both wire formats, with and without a registry. The judge of a
request is the fake APIs' own validation (tests/fuzz/rig.py). Profiles and strategies: tests/fuzz/strategies.py
(derandomized in CI); bulk exploration: `make fuzz`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from service.core.events import EventKind, LogUpdate, NewInference, RowUpdate
from tests.fuzz import strategies as fs
from tests.fuzz.rig import (
    EVOLVED_INFERENCE_ID,
    PIPELINE,
    REGISTERED,
    SCHEMA_IDS,
    Outcome,
    Rig,
    SpecJudge,
    encode,
    undocumented,
)

RECORDS: dict[EventKind, st.SearchStrategy[dict[str, Any]]] = {
    EventKind.INFERENCE: fs.inference_records,
    EventKind.ROW_UPDATE: fs.row_update_records,
    EventKind.LOG_UPDATE: fs.log_update_records,
}
KINDS = list(EventKind)
# What a valid (decodable) record may still be refused for: its content, never its bytes.
CONTENT_REASONS = {"missing-field", "invalid-field", "no-config", "invalid-config", "row-empty", "row-too-large"}
SCHEMA_IDS_TO_TRY = st.sampled_from([*REGISTERED, 8, 2**31 - 1]) | st.integers(-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    rig = Rig()
    yield rig
    rig.close()


@pytest.fixture(scope="module")
def judge() -> SpecJudge:
    return SpecJudge()


def check(rig: Rig, judge: SpecJudge, kind: EventKind, value: bytes | None, *, registry: bool = True) -> Outcome:
    """The property every input must satisfy; returns the outcome for further checks."""
    outcome = rig.decode_and_route(kind, value, registry=registry)
    if outcome.error is not None:
        problem = undocumented(outcome.error)
        assert problem is None, problem
        assert str(outcome.error), "a dead letter needs a message"
    else:
        assert outcome.request is not None
        problem = rig.run(judge.problem(outcome.request, outcome.event))
        assert problem is None, problem
    return outcome


# --- bytes that are not records --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(value=st.binary(max_size=400), registry=st.booleans())
@example(value=b"", registry=True)
@example(value=b"\x00", registry=True)
@example(value=b"\x00\x00\x00\x00", registry=False)
@example(value=b"\x00\x00\x00\x00\x01", registry=False)
@example(value=b"\xff" * 12, registry=True)
# A string length of 2**62 and a map block count of -2**62: no allocation, no endless loop.
@example(value=b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f", registry=True)
@example(value=b"\x02a\xfd\xff\xff\xff\xff\xff\xff\xff\x7f", registry=True)
def test_arbitrary_bytes(rig: Rig, judge: SpecJudge, kind: EventKind, value: bytes, registry: bool) -> None:
    check(rig, judge, kind, value, registry=registry)


@pytest.mark.parametrize("kind", KINDS)
@given(schema_id=SCHEMA_IDS_TO_TRY, body=st.binary(max_size=300))
def test_confluent_framed_garbage(rig: Rig, judge: SpecJudge, kind: EventKind, schema_id: int, body: bytes) -> None:
    check(rig, judge, kind, b"\x00" + schema_id.to_bytes(4, "big", signed=True) + body)


def test_tombstone_is_an_empty_value(rig: Rig, judge: SpecJudge) -> None:
    outcome = check(rig, judge, EventKind.INFERENCE, None)
    assert outcome.error is not None
    assert outcome.error.reason == "empty-value"


# --- valid records, mutated ------------------------------------------------------------------------------------

OPERATIONS = ["flip", "set", "interesting", "insert", "delete", "truncate", "duplicate", "varint", "reframe"]
INTERESTING = [0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF]


@st.composite
def mutated(draw: st.DrawFn, kind: EventKind) -> bytes:
    """A valid record of `kind` in either wire format, then one to four byte-level mutations."""
    framed = draw(st.booleans())
    value = bytearray(encode(kind, draw(RECORDS[kind]), SCHEMA_IDS[kind] if framed else None))
    for _ in range(draw(st.integers(1, 4))):
        operation = draw(st.sampled_from(OPERATIONS))
        at = draw(st.integers(0, max(len(value) - 1, 0)))
        if operation == "flip" and value:
            value[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set" and value:
            value[at] = draw(st.integers(0, 255))
        elif operation == "interesting" and value:
            value[at] = draw(st.sampled_from(INTERESTING))
        elif operation == "insert":
            value[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del value[at : at + draw(st.integers(1, 16))]
        elif operation == "truncate":
            del value[at:]
        elif operation == "duplicate":
            value[at:at] = value[at : at + draw(st.integers(1, 32))]
        elif operation == "varint":
            # A length or block count that claims far more (or less) than there is.
            value[at:at] = draw(st.sampled_from([b"\xfe\xff\xff\xff\x0f", b"\xff\xff\xff\xff\x0f", b"\x80\x01"]))
        elif operation == "reframe":
            value[:5] = b"\x00" + draw(SCHEMA_IDS_TO_TRY).to_bytes(4, "big", signed=True)
    return bytes(value)


@pytest.mark.parametrize("kind", KINDS)
@fs.examples(0.5)
@given(data=st.data(), registry=st.booleans())
def test_mutated_valid_records(
    rig: Rig, judge: SpecJudge, kind: EventKind, data: st.DataObject, registry: bool
) -> None:
    check(rig, judge, kind, data.draw(mutated(kind)), registry=registry)


@fs.examples(0.5)
@given(data=st.data(), kinds=st.permutations(KINDS))
def test_records_on_the_wrong_topic(rig: Rig, judge: SpecJudge, data: st.DataObject, kinds: list[EventKind]) -> None:
    kind, other = kinds[:2]
    framed = data.draw(st.booleans())
    check(rig, judge, kind, encode(other, data.draw(RECORDS[other]), SCHEMA_IDS[other] if framed else None))


# --- valid, hostile records -------------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and types kept (True is not 1, 1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def as_json(value: Any) -> Any:
    """What JSON can carry of `value`: NaN and the infinities have no JSON form, and orjson writes them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_json(item) for item in value]
    return value


@pytest.mark.parametrize("kind", KINDS)
@fs.examples(0.5)
@given(data=st.data(), framed=st.booleans())
def test_hostile_valid_records_arrive_intact_or_are_refused_for_their_content(
    rig: Rig, judge: SpecJudge, kind: EventKind, data: st.DataObject, framed: bool
) -> None:
    record = data.draw(RECORDS[kind])
    schema_id = None
    if framed:
        schema_id = SCHEMA_IDS[kind]
    value = encode(kind, record, schema_id)
    outcome = check(rig, judge, kind, value)
    if outcome.error is not None:
        # A plain value whose first id is empty starts with byte 0, so it reads as Confluent-framed
        # (schemas/README.md, wire formats): refused, for its framing rather than its content.
        if value[0] != 0 or framed:
            assert outcome.error.reason in CONTENT_REASONS, outcome.error
        return
    event, request = outcome.event, outcome.request
    assert request is not None
    body = orjson.loads(request.body)
    if isinstance(event, NewInference):
        assert event.pipeline_id == record["inference_pipeline_id"]
        assert same(event.row, record["row"])
        id_column = (event.config or {"inferenceIdColumnName": "id"}).get("inferenceIdColumnName", "inference_id")
        sent = body["rows"][0]
        assert isinstance(sent.pop(id_column), str)
        assert sent == as_json({key: value for key, value in record["row"].items() if key != id_column})
    elif isinstance(event, RowUpdate):
        assert (event.pipeline_id, event.inference_id) == (record["inference_pipeline_id"], record["inference_id"])
        assert same(event.row, record["row"])
        assert body["row"] == as_json(record["row"])
    else:
        assert isinstance(event, LogUpdate)
        assert event == LogUpdate(record["reference_id"], record["output"], record["error"], record["duration"])
        assert body == {key: record[key] for key in ("output", "error", "duration") if record[key] is not None}


@fs.examples(0.3)
@given(record=fs.inference_records)
def test_an_evolved_writer_schema_reads_the_same_event(rig: Rig, judge: SpecJudge, record: dict[str, Any]) -> None:
    shipped = rig.decode_and_route(
        EventKind.INFERENCE, encode(EventKind.INFERENCE, record, SCHEMA_IDS[EventKind.INFERENCE])
    )
    # The evolved writer's extra field comes last: the shipped encoding plus its (empty) string.
    evolved = encode(EventKind.INFERENCE, record, EVOLVED_INFERENCE_ID) + b"\x00"
    outcome = check(rig, judge, EventKind.INFERENCE, evolved)
    if shipped.error is not None:
        assert outcome.error is not None
        assert outcome.error.reason == shipped.error.reason
    else:
        assert outcome.request is not None
        assert shipped.request is not None
        assert outcome.request.body == shipped.request.body


def test_the_documented_reasons_are_read_from_the_documentation() -> None:
    from tests.fuzz.rig import DOCUMENTED_REASONS

    assert {"garbage-bytes", "truncated", "trailing-bytes", "no-config", "bad-magic-byte"} <= DOCUMENTED_REASONS
    assert "internal-error" not in DOCUMENTED_REASONS
    assert PIPELINE  # the configured pipeline the strategies favour
