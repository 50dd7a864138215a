"""Fault scenarios and their accounting: each one produces a known workload to fresh topics, runs the real service
(`python -m service` child processes) against the local broker and the fake APIs while it breaks something, waits
until the group has committed everything, stops the service with SIGTERM and then checks what the APIs received
and what the dead-letter topics hold against what was produced.

Every produced record has a unique id (its Kafka key, also carried in the body its API receives: the `chaos_id`
column of a row, the `output` of a log update), so the accounting is set logic, not arithmetic on counts:

    delivered               records with at least one 200 from their API
    dead_lettered           records with at least one dead letter (by Kafka key, checked against the origin headers)
    valid_dead_lettered     of those, records that were not planted poison (always a failure)
    duplicate_deliveries    extra 200s for a record (a record delivered 3 times counts 2)
    duplicate_dead_letters  extra dead letters for a record
    duplicates              the sum of the two
    lost                    produced records that are neither delivered nor dead-lettered

A scenario passes when nothing is lost, the dead-lettered records are exactly the poison the workload planted,
and no invariant broke: each dead letter carries the reason its kind of poison calls for, every update key's first
deliveries arrive in produced order (row updates per pipeline and inference id, log updates per reference id;
published rows carry their own ids and timestamps, so publish calls may overtake each other), a row published
without an inference id keeps one id across redeliveries, and every service process the scenario did not kill
exits 0 on SIGTERM. What broke is reported as `problems`.

The fault scenarios that measure speed (hangs, rate-limit, not-yet, latency-step, auth-revoked, mixed) also print
figures with their targets (`share=0.83 target=0.5`) and fail when one is missed. A `share` compares with a
healthy run of the same records: the same workload (same seed, same record ids) on fresh topics, group and fake
APIs, with no faults, measured the same way, in the same invocation. Rates are taken from when production starts
(the service is already running and has its partitions) to when the fake API first answered 200 for the records
counted. Every scenario runs the service with its default delivery settings (no BRIDGE_DELIVERY__* variable); the
harness only shortens Kafka's session timeout and commit interval, so a killed member is noticed in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import random
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import orjson
from aiokafka.errors import KafkaError

from tests.integration.cases import HUMANLOOP_KEY, OPENLAYER_KEY, is_marked
from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics, bridge_environment
from tests.support.fake_apis import (
    API_OF,
    APIS,
    NOT_YET,
    RATE_LIMITED,
    Api,
    DownMode,
    Endpoint,
    FakeApiServer,
    Fault,
    ReceivedRequest,
    not_yet_chosen,
)
from tests.support.fake_registry import FakeSchemaRegistry
from tests.support.kafka_broker import LocalKafkaBroker, create_topics
from tests.support.kafka_io import all_committed, produce, read_all

KINDS: Final = ("inference", "row_update", "log_update")
INFERENCE_CONFIG: Final = {
    "output_column_name": "output",
    "input_variable_names": ["user_query"],
    "num_of_token_column_name": "tokens",
}
"""The config half of the pipelines put in their records; the other half rely on the operator's default."""
DEFAULT_CONFIG: Final = {"outputColumnName": "output", "inputVariableNames": ["user_query"]}
ROW_UPDATE_CONFIG: Final = {"ground_truth_column_name": "ground_truth"}
UNKNOWN_SCHEMA_ID: Final = 90_001
"""A Confluent schema id the fake registry never hands out."""
INFERENCE_SHARE: Final = 0.5
"""Share of new inferences in a workload, unless a scenario says otherwise. Rows travel in batches while every
update is a call of its own, so the update topics set a scenario's length."""
DEFAULT_RECORDS: Final = 21_000
"""Records of a scenario that names no size of its own."""
CONFLUENT_SHARE: Final = 0.2
"""Share of valid records written Confluent-framed (with the registered schema) rather than as plain Avro."""

# The reasons each kind of poison must be dead-lettered with (service/avro/codec.py, service/avro/registry.py,
# service/apis/, service/http/delivery.py).
# Random bytes fail wherever they first stop making sense, so two decode reasons are right for them.
POISON_REASONS: Final[Mapping[str, frozenset[str]]] = {
    "random-bytes": frozenset({"garbage-bytes", "truncated"}),
    "truncated": frozenset({"truncated"}),
    "wrong-schema": frozenset({"incompatible-schema"}),
    "unknown-schema-id": frozenset({"unknown-schema-id"}),
    "missing-id": frozenset({"missing-field"}),
    "row-too-large": frozenset({"row-too-large"}),
    "api-rejected": frozenset({"http-422"}),
}
POISON_KINDS: Final[Mapping[str, tuple[str, ...]]] = {
    "inference": ("random-bytes", "truncated", "wrong-schema", "unknown-schema-id", "missing-id", "api-rejected"),
    "row_update": (
        "random-bytes",
        "truncated",
        "wrong-schema",
        "unknown-schema-id",
        "missing-id",
        "row-too-large",
        "api-rejected",
    ),
    "log_update": ("random-bytes", "truncated", "wrong-schema", "unknown-schema-id", "missing-id", "api-rejected"),
}

Identity = tuple[str, ...]
"""What one API call says about one record: (endpoint, [addressed key,] chaos id)."""
OrderKey = tuple[str, str]
"""(endpoint, the service's ordering key): pipeline/inference id for a row update, the reference id for a log
update. Published rows have none: their calls need no order among themselves."""


# -- the workload ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """One produced record and what must become of it."""

    rid: str
    """Unique per scenario; the Kafka key, and the `chaos_id` its API call carries."""
    kind: str
    topic: str
    partition: int
    value: bytes
    identity: Identity | None
    """What a 200 for this record looks like; None when the record can never reach its API."""
    order: tuple[OrderKey, int] | None
    """(ordering key, position among that key's records); None for published rows and poison."""
    inference_id: str | None = None
    """For a published row: the id it must carry; None when the service derives one."""
    poison: str | None = None
    """The kind of poison, or None for a record that must be delivered."""

    @property
    def reasons(self) -> frozenset[str]:
        return POISON_REASONS[self.poison] if self.poison is not None else frozenset()

    @property
    def update_id(self) -> str | None:
        """The id an update's call addresses (the row's inference id, the log's reference id); None otherwise."""
        if self.identity is None or self.kind == "inference" or self.poison is not None:
            return None
        return self.identity[1]


class WorkloadBuilder:
    """Builds the records of one scenario: valid ones keyed for ordering, poison mixed in at random places."""

    def __init__(
        self, topics: Topics, partitions: int, rng: random.Random, schema_ids: Mapping[str, int], tag: str
    ) -> None:
        self._topics = {
            "inference": topics.inferences,
            "row_update": topics.row_updates,
            "log_update": topics.log_updates,
        }
        self._partitions = partitions
        self._rng = rng
        self._schema_ids = schema_ids
        self._tag = tag
        self._encoder = AvroEncoder()
        self._count = 0
        self._pipelines = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2 * partitions)]

    def build(
        self, total: int, *, poison_share: float, updates_per_key: int, inference_share: float = INFERENCE_SHARE
    ) -> list[Sent]:
        """`total` records over the three topics (poison included), each topic's in the order to produce them."""
        inferences = round(total * inference_share)
        rows = (total - inferences) // 2
        counts = {"inference": inferences, "row_update": rows, "log_update": total - inferences - rows}
        records: list[Sent] = []
        for kind, count in counts.items():
            bad = round(count * poison_share)
            valid = self._valid(kind, count - bad, updates_per_key)
            poison = [self._poison(kind, POISON_KINDS[kind][i % len(POISON_KINDS[kind])]) for i in range(bad)]
            records.extend(self._mix(valid, poison))
        return records

    def _rid(self, kind: str) -> str:
        self._count += 1
        return f"{self._tag}-{kind}-{self._count:06d}"

    def _encode(self, kind: str, datum: dict[str, Any], *, framed: bool | None = None) -> bytes:
        body = self._encoder.plain(kind, datum)
        if framed is None:
            framed = self._rng.random() < CONFLUENT_SHARE
        # The writer schema is the shipped one, so the framed body is the plain body behind the 5-byte header.
        return _confluent(self._schema_ids[kind], body) if framed else body

    def _valid(self, kind: str, count: int, updates_per_key: int) -> list[Sent]:
        if kind == "inference":
            return [self._inference(index) for index in range(count)]
        keys = max(1, count // max(1, updates_per_key))
        order = [i % keys for i in range(count)]
        self._rng.shuffle(order)
        positions: Counter[int] = Counter()
        out = []
        for key in order:
            out.append(self._update(kind, key, positions[key]))
            positions[key] += 1
        return out

    def _inference(self, index: int) -> Sent:
        rid = self._rid("inference")
        which = self._rng.randrange(len(self._pipelines))
        pipeline = self._pipelines[which]
        row = {"chaos_id": rid, "user_query": f"question {index}?", "output": f"answer {index}", "tokens": index}
        inference_id = f"id-{rid}" if self._rng.random() < 0.5 else None
        config = INFERENCE_CONFIG if which % 2 == 0 else None
        datum = avro_io.inference(pipeline, row, inference_id=inference_id, config=config)
        return Sent(
            rid=rid,
            kind="inference",
            topic=self._topics["inference"],
            partition=which % self._partitions,  # one pipeline, one partition, as a producer keyed by pipeline would
            value=self._encode("inference", datum),
            identity=("publish", rid),
            order=None,  # publish calls of one pipeline may run in parallel: no order to check
            inference_id=inference_id,
        )

    def _update(self, kind: str, key: int, position: int) -> Sent:
        rid = self._rid(kind)
        partition = key % self._partitions
        if kind == "row_update":
            pipeline = self._pipelines[key % len(self._pipelines)]
            target = f"{self._tag}-target-{key}"
            row = {"chaos_id": rid, "seq": position, "ground_truth": f"truth {position}"}
            config = ROW_UPDATE_CONFIG if key % 2 == 0 else None
            datum = avro_io.row_update(pipeline, target, row, config)
            identity: Identity = ("update_row", target, rid)
            order_key: OrderKey = ("update_row", f"{pipeline}/{target}")
        else:
            reference = f"{self._tag}-ref-{key}"
            datum = avro_io.log_update(reference, output=rid, duration=float(position))
            identity, order_key = ("update_log", reference, rid), ("update_log", reference)
        return Sent(
            rid=rid,
            kind=kind,
            topic=self._topics[kind],
            partition=partition,
            value=self._encode(kind, datum),
            identity=identity,
            order=(order_key, position),
        )

    def _poison(self, kind: str, poison: str) -> Sent:
        rid = self._rid(kind)
        rng = self._rng
        pipeline = rng.choice(self._pipelines)
        identity: Identity | None = None
        if poison == "random-bytes":
            value = bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randrange(8, 96))  # never 0: not framed
        elif poison == "truncated":
            whole = self._encode(kind, self._datum(kind, rid, pipeline), framed=False)
            value = whole[: rng.randrange(1, len(whole))]
        elif poison == "wrong-schema":
            other = KINDS[(KINDS.index(kind) + 1 + rng.randrange(2)) % 3]
            value = _confluent(self._schema_ids[other], self._encoder.plain(other, self._datum(other, rid, pipeline)))
        elif poison == "unknown-schema-id":
            value = _confluent(UNKNOWN_SCHEMA_ID, self._encoder.plain(kind, self._datum(kind, rid, pipeline)))
        elif poison == "missing-id":
            # A plain log update with an empty reference id starts with byte 0 and reads as Confluent-framed;
            # framing it for real makes the empty id, not the framing, the thing to find.
            value = self._encode(kind, self._datum(kind, rid, pipeline, empty_id=True), framed=kind == "log_update")
        elif poison == "row-too-large":
            row: dict[str, Any] = {"chaos_id": rid, **{f"column_{i}": i for i in range(100 + rng.randrange(1, 40))}}
            value = self._encode(kind, avro_io.row_update(pipeline, f"{self._tag}-big-{rid}", row))
        elif poison == "api-rejected":
            datum = self._datum(kind, rid, pipeline, marked=True)
            value = self._encode(kind, datum)
            identity = _expected_identity(kind, datum, rid)
        else:
            raise ValueError(f"unknown poison {poison!r}")
        return Sent(
            rid=rid,
            kind=kind,
            topic=self._topics[kind],
            partition=rng.randrange(self._partitions),
            value=value,
            identity=identity,
            order=None,
            inference_id=f"id-{rid}" if kind == "inference" else None,
            poison=poison,
        )

    def _datum(
        self, kind: str, rid: str, pipeline: str, *, empty_id: bool = False, marked: bool = False
    ) -> dict[str, Any]:
        """A standalone record of `kind` (its own key), optionally with an empty id or the rejection marker."""
        row: dict[str, Any] = {"chaos_id": rid, "output": "poison", "user_query": "why?"}
        if marked:
            row["reject_me"] = True
        if kind == "inference":
            return avro_io.inference(pipeline, row, inference_id="" if empty_id else f"id-{rid}")
        if kind == "row_update":
            return avro_io.row_update(pipeline, "" if empty_id else f"{self._tag}-lone-{rid}", row, ROW_UPDATE_CONFIG)
        output = f"reject_me {rid}" if marked else rid
        return avro_io.log_update("" if empty_id else f"{self._tag}-lone-{rid}", output=output, duration=1.0)

    def _mix(self, valid: list[Sent], poison: list[Sent]) -> list[Sent]:
        """Poison at random places among the valid records, whose own order is kept."""
        total = len(valid) + len(poison)
        spots = set(self._rng.sample(range(total), len(poison)))
        good, bad = iter(valid), iter(poison)
        return [next(bad) if i in spots else next(good) for i in range(total)]


def _confluent(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _expected_identity(kind: str, datum: Mapping[str, Any], rid: str) -> Identity:
    if kind == "inference":
        return ("publish", rid)
    if kind == "row_update":
        return ("update_row", str(datum["inference_id"]), rid)
    return ("update_log", str(datum["reference_id"]), str(datum["output"]))


def stages(records: Sequence[Sent], count: int) -> list[list[Sent]]:
    """Split a workload into `count` consecutive parts, each topic's records cut evenly and kept in order."""
    by_topic: dict[str, list[Sent]] = defaultdict(list)
    for record in records:
        by_topic[record.topic].append(record)
    parts: list[list[Sent]] = [[] for _ in range(count)]
    for items in by_topic.values():
        for i in range(count):
            parts[i].extend(items[i * len(items) // count : (i + 1) * len(items) // count])
    return parts


def calls_in(records: Sequence[Sent]) -> int:
    """A lower bound of the API calls a stage causes: one per update that decodes (rows are batched)."""
    return max(1, sum(1 for r in records if r.kind != "inference" and r.identity is not None))


# -- accounting ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter as read back: its key and headers."""

    key: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Figure:
    """A measured figure of a scenario, printed in its result line as `name=value` and, with a target,
    `target_name=target`; a missed target fails the scenario."""

    name: str
    value: float
    target: float | None = None
    at_most: bool = False
    """The target is a ceiling (429 share, seconds) rather than a floor (a share of the healthy rate)."""
    target_name: str | None = None
    """How the target is printed; default `target_<name>`, or `max_<name>` for a ceiling."""
    digits: int = 2
    bound: bool = False
    """The measurement gave up before its end: `value` is a bound (an upper one for a floor target), printed
    with `<` (or `>`) in front."""

    @property
    def met(self) -> bool:
        if self.target is None:
            return True
        if self.bound:  # the measurement gave up: the target was not shown to be met
            return False
        return self.value <= self.target if self.at_most else self.value >= self.target

    @property
    def shown(self) -> str:
        """The value as printed: with `<` or `>` in front when it is a bound."""
        sign = (">" if self.at_most else "<") if self.bound else ""
        return f"{sign}{self.value:.{self.digits}f}"

    def text(self) -> str:
        out = f"{self.name}={self.shown}"
        if self.target is not None:
            out += f" {self.target_name or ('max_' if self.at_most else 'target_') + self.name}={self.target:g}"
        return out

    def miss(self) -> str | None:
        if self.met or self.target is None:
            return None
        relation = "above its ceiling" if self.at_most else "below its target"
        return f"{self.name} {self.shown} is {relation} {self.target:g}"


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    name: str
    produced: int
    delivered: int = 0
    duplicate_deliveries: int = 0
    duplicate_dead_letters: int = 0
    dead_lettered: int = 0
    expected_dead_lettered: int = 0
    valid_dead_lettered: int = 0
    lost: int = 0
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    figures: tuple[Figure, ...] = ()
    duration_s: float = 0.0

    @property
    def duplicates(self) -> int:
        return self.duplicate_deliveries + self.duplicate_dead_letters

    @property
    def missed(self) -> list[str]:
        """The figures whose targets were missed, as sentences."""
        return [miss for figure in self.figures if (miss := figure.miss()) is not None]

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0
            and self.dead_lettered == self.expected_dead_lettered
            and self.valid_dead_lettered == 0
            and not self.problems
            and not self.missed
        )

    def line(self) -> str:
        figures = "".join(f" {figure.text()}" for figure in self.figures)
        return (
            f"scenario={self.name} produced={self.produced} delivered={self.delivered} "
            f"duplicates={self.duplicates} duplicate_deliveries={self.duplicate_deliveries} "
            f"duplicate_dead_letters={self.duplicate_dead_letters} dead_lettered={self.dead_lettered} "
            f"expected_dead_lettered={self.expected_dead_lettered} valid_dead_lettered={self.valid_dead_lettered} "
            f"lost={self.lost}{figures} result={'pass' if self.passed else 'fail'}"
        )


def carried(request: ReceivedRequest) -> list[tuple[Identity, str | None]]:
    """The records one successful call carries, each with the inference id its row had (publish only)."""
    body, query = request.json, request.query
    if request.endpoint == "publish":
        return [(("publish", str(row.get("chaos_id"))), row.get("inference_id")) for row in body["rows"]]
    if request.endpoint == "update_row":
        return [(("update_row", query.get("inferenceId", ""), str(body["row"].get("chaos_id"))), None)]
    return [(("update_log", query.get("reference_id", ""), str(body.get("output"))), None)]


def account(
    name: str,
    records: Sequence[Sent],
    requests: Sequence[ReceivedRequest],
    letters: Sequence[Letter],
    problems: Sequence[str] = (),
    notes: Sequence[str] = (),
    figures: Sequence[Figure] = (),
) -> ScenarioResult:
    """Compare what reached the APIs and the dead-letter topics with what was produced."""
    found = list(problems)
    by_rid = {r.rid: r for r in records}
    by_identity = {r.identity: r for r in records if r.identity is not None}

    deliveries: Counter[str] = Counter()
    ids_seen: dict[str, set[str]] = defaultdict(set)
    first_positions: dict[OrderKey, list[int]] = defaultdict(list)
    strangers: list[str] = []
    for request in requests:  # in arrival order
        if request.status != 200:
            continue
        try:
            items = carried(request)
        except (KeyError, TypeError, AttributeError):
            strangers.append(f"{request.method} {request.path} (unreadable body)")
            continue
        for identity, inference_id in items:
            record = by_identity.get(identity)
            if record is None:
                strangers.append(f"{request.method} {request.path} {identity}")
                continue
            if deliveries[record.rid] == 0 and record.order is not None:
                key, position = record.order
                first_positions[key].append(position)
            deliveries[record.rid] += 1
            if record.kind == "inference":
                ids_seen[record.rid].add(inference_id if isinstance(inference_id, str) else "")
    if strangers:
        found.append(f"{len(strangers)} successful call(s) carry no produced record, e.g. {strangers[:3]}")

    found.extend(_id_problems(by_rid, ids_seen))
    found.extend(_order_problems(first_positions))
    ordered = [positions for positions in first_positions.values() if len(positions) > 1]
    checked = f"order checked for {len(ordered)} update keys with 2+ records ({sum(map(len, ordered))} records)"

    dead: Counter[str] = Counter()
    wrong_reason: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[tuple[str, str]] = Counter()
    misplaced: list[str] = []
    for letter in letters:
        record = by_rid.get(letter.key)
        if record is None:
            misplaced.append(f"unknown key {letter.key!r}")
            continue
        dead[record.rid] += 1
        reason = letter.headers.get("bridge.reason", "<none>")
        origin = (letter.headers.get("__connect.errors.topic"), letter.headers.get("__connect.errors.partition"))
        if origin != (record.topic, str(record.partition)):
            misplaced.append(f"{record.rid}: origin headers {origin}, produced to {record.topic}/{record.partition}")
        if dead[record.rid] == 1:
            outcomes[(record.poison or "valid", reason)] += 1
        if reason not in record.reasons:
            wrong_reason[(record.poison or "valid record", reason)] += 1
    if misplaced:
        found.append(f"{len(misplaced)} dead letter(s) do not match what was produced, e.g. {misplaced[:3]}")
    for (poison, reason), count in sorted(wrong_reason.items()):
        expected = sorted(POISON_REASONS.get(poison, ()))
        found.append(f"{count} dead letter(s) of {poison} have reason {reason!r}, expected one of {expected}")

    expected_dead = {r.rid for r in records if r.poison is not None}
    delivered_poison = sorted(rid for rid in expected_dead if deliveries[rid])
    if delivered_poison:
        found.append(f"{len(delivered_poison)} poison record(s) reached their API, e.g. {delivered_poison[:3]}")
    missing = sorted(expected_dead - set(dead) - set(deliveries))
    if missing:
        found.append(f"{len(missing)} poison record(s) were not dead-lettered, e.g. {missing[:3]}")

    lost = sorted(set(by_rid) - set(deliveries) - set(dead))
    if lost:
        kinds = Counter(by_rid[rid].poison or by_rid[rid].kind for rid in lost)
        found.append(f"lost {len(lost)} record(s) by kind {dict(kinds)}, e.g. {lost[:5]}")
    valid_dead = [rid for rid in dead if by_rid[rid].poison is None]  # each is a problem already: its reason is wrong
    summary = ", ".join(f"{poison}->{reason}: {n}" for (poison, reason), n in sorted(outcomes.items()))
    return ScenarioResult(
        name=name,
        produced=len(records),
        delivered=len(deliveries),
        duplicate_deliveries=sum(n - 1 for n in deliveries.values()),
        duplicate_dead_letters=sum(n - 1 for n in dead.values()),
        dead_lettered=len(dead),
        expected_dead_lettered=len(expected_dead),
        valid_dead_lettered=len(valid_dead),
        lost=len(lost),
        problems=tuple(found),
        notes=(*notes, checked, f"dead letters by kind and reason: {summary or 'none'}"),
        figures=tuple(figures),
    )


def _id_problems(by_rid: Mapping[str, Sent], ids_seen: Mapping[str, set[str]]) -> list[str]:
    wrong, unstable = [], []
    for rid, seen in ids_seen.items():
        want = by_rid[rid].inference_id
        if want is not None and seen != {want}:
            wrong.append(f"{rid}: {sorted(seen)} instead of {want}")
        elif want is None and (len(seen) != 1 or not next(iter(seen))):
            unstable.append(f"{rid}: {sorted(seen)}")
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} published row(s) lost their inference id, e.g. {wrong[:3]}")
    if unstable:
        problems.append(f"{len(unstable)} row(s) without an id got a different one on redelivery, e.g. {unstable[:3]}")
    return problems


def _order_problems(first_positions: Mapping[OrderKey, list[int]]) -> list[str]:
    """Per key, the first successful delivery of each record must come in produced order."""
    broken = []
    for key, positions in first_positions.items():
        overtaken = [(a, b) for a, b in itertools.pairwise(positions) if b < a]
        if overtaken:
            broken.append(f"{key}: position {overtaken[0][1]} arrived after {overtaken[0][0]}")
    if not broken:
        return []
    return [f"{len(broken)} key(s) saw their records out of produced order, e.g. {broken[:3]}"]


# -- the harness -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosEnvironment:
    """Where scenarios run: the broker (and the object to restart it, when this process owns it), logs."""

    bootstrap: str
    log_dir: Path
    broker: LocalKafkaBroker | None = None
    jars_dir: Path | None = None
    """To start a broker of its own for `broker-restart` when `broker` is None."""


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    records: int | None = None
    """Records per scenario over the three topics, poison included; None: each scenario's own size."""
    partitions: int = 4
    kills: int = 6
    broker_restarts: int = 2
    outage_s: float = 60.0
    drain_timeout_s: float = 900.0
    """The longest wait for the group to commit everything; a scenario may set a shorter one."""
    seed: int | None = None


MAX_REPLACEMENTS: Final = 5
"""Services started in place of ones that died on their own; one more death ends the scenario (a crash loop)."""
SETTINGS_REFUSED: Final = 2
"""The service's exit code for invalid settings: starting another one with the same environment is pointless."""
READY_TIMEOUT_S: Final = 60.0
MEASURE_TIMEOUT_S: Final = 150.0
"""The longest a measured run waits for the records it times; past it, the figure printed is a bound."""


class ScenarioAborted(Exception):
    """The scenario cannot go on (the service keeps dying); it fails with what was found so far."""


@dataclass(slots=True)
class _Member:
    process: BridgeProcess
    log: Path
    label: str
    expect_running: bool = True
    assigned: list[list[str]] = field(default_factory=list)
    """The partition sets the service logged as assigned to it, oldest first (read so far)."""
    log_read: int = 0
    """How many bytes of the log were read for `assigned`."""


def write_key(path: Path, key: str) -> None:
    """Replace a key file at once, as the kubelet swaps a mounted Secret: never a half-written key."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(key)
    staged.chmod(0o600)
    os.replace(staged, path)


class Harness:
    """One scenario's world: fresh topics, fake APIs and registry, service processes, and what went wrong."""

    def __init__(
        self,
        name: str,
        env: ChaosEnvironment,
        options: ChaosOptions,
        *,
        seed: int,
        scenario: Scenario,
        tag: str | None = None,
    ) -> None:
        """`tag` names the records (default `name`): two harnesses with the same tag and seed produce the same
        records, ids included, to their own topics."""
        self.name = name
        self.env = env
        self.options = options
        self.seed = seed
        self.scenario = scenario
        self.tag = tag or name
        self.rng = random.Random(seed)
        suffix = uuid.uuid4().hex[:8]
        self.topics = Topics(
            f"chaos-{name}-inferences-{suffix}",
            f"chaos-{name}-row-updates-{suffix}",
            f"chaos-{name}-log-updates-{suffix}",
        )
        self.group = f"chaos-{name}-{suffix}"
        self.fake = FakeApiServer(openlayer_key=OPENLAYER_KEY, humanloop_key=HUMANLOOP_KEY)
        self.registry = FakeSchemaRegistry()
        self.records: list[Sent] = []
        self.problems: list[str] = []
        self.notes: list[str] = [f"seed={seed}"]
        self.figures: list[Figure] = []
        self.key_files: dict[Api, Path] = {}
        """With `Scenario.key_files`: the files the service reads its API keys from."""
        self.drained_at: float | None = None
        """time.monotonic() when the group was first seen to have committed everything."""
        self._members: list[_Member] = []
        self._environ: dict[str, str] = {}
        self._replacements = 0
        self._drain_gave_up = False
        self._by_identity: dict[Identity, Sent] = {}
        self._scanned = 0
        self._done_at: dict[str, float] = {}

    @property
    def record_count(self) -> int:
        return self.options.records or self.scenario.records or DEFAULT_RECORDS

    @property
    def valid(self) -> list[Sent]:
        """The records that must be delivered."""
        return [r for r in self.records if r.poison is None]

    async def start(self) -> None:
        partitions = self.options.partitions
        names = self.topics.all()
        await create_topics(self.env.bootstrap, {t: partitions for t in [*names, *map(self.topics.dlq, names)]})
        self.fake.start()
        self.registry.start()
        encoder = AvroEncoder()
        schema_ids = {
            kind: self.registry.register(f"{topic}-value", encoder.raw[kind])
            for kind, topic in zip(KINDS, names, strict=True)
        }
        builder = WorkloadBuilder(self.topics, partitions, self.rng, schema_ids, self.tag)
        scenario = self.scenario
        self.records = builder.build(
            self.record_count,
            poison_share=scenario.poison_share,
            updates_per_key=scenario.updates_per_key,
            inference_share=scenario.inference_share,
        )
        self._by_identity = {r.identity: r for r in self.records if r.identity is not None}
        self.fake.reject_when(None, is_marked, Fault(status=422))
        environ = bridge_environment(
            bootstrap=self.env.bootstrap,
            group=self.group,
            topics=self.topics,
            openlayer_url=self.fake.openlayer_base_url,
            humanloop_url=self.fake.humanloop_base_url,
            openlayer_key=OPENLAYER_KEY,
            humanloop_key=HUMANLOOP_KEY,
            registry_url=self.registry.url,
            extra={
                "BRIDGE_OPENLAYER__DEFAULT_CONFIG": orjson.dumps(DEFAULT_CONFIG).decode(),
                "BRIDGE_OBSERVABILITY__LOG_LEVEL": "INFO",
            },
        )
        # The service's own delivery defaults, always: bridge_environment shortens backoffs and the stop's drain
        # for the integration tests, which would hide what an operator's deployment does under these faults.
        for name in [n for n in environ if n.startswith("BRIDGE_DELIVERY__")]:
            del environ[name]
        if scenario.key_files:
            key_dir = self.env.log_dir / f"{self.group}-keys"
            key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            keys: dict[Api, str] = {"openlayer": OPENLAYER_KEY, "humanloop": HUMANLOOP_KEY}
            for api, key in keys.items():
                path = key_dir / f"{api}-api-key"
                write_key(path, key)
                self.key_files[api] = path
                del environ[f"BRIDGE_{api.upper()}__API_KEY"]
                environ[f"BRIDGE_{api.upper()}__API_KEY_FILE"] = str(path)
        self._environ = environ

    async def close(self) -> None:
        """Stop whatever is still running, whatever happened before."""
        for member in self._members:
            if member.process.returncode is None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(member.process.terminate, 30)
            if member.process.returncode is None:
                member.process.kill()
        self.fake.stop()
        self.registry.stop()

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def figure(self, figure: Figure) -> None:
        self.figures.append(figure)

    # -- Kafka ---------------------------------------------------------------------------------------------------

    async def produce(self, records: Sequence[Sent]) -> None:
        """Produce `records` in order, each to its chosen partition (one producer per partition, in parallel)."""
        groups: dict[tuple[str, int], list[Sent]] = defaultdict(list)
        for record in records:
            groups[(record.topic, record.partition)].append(record)
        await asyncio.gather(
            *(
                produce(
                    self.env.bootstrap,
                    topic,
                    [r.value for r in items],
                    keys=[r.rid.encode() for r in items],
                    partition=partition,
                )
                for (topic, partition), items in groups.items()
            )
        )

    async def drained(self) -> bool:
        """The group has committed every record of the three topics."""
        return await all_committed(self.env.bootstrap, self.group, *self.topics.all())

    async def dead_letters(self) -> list[Letter]:
        letters = []
        for topic in self.topics.all():
            for record in await read_all(self.env.bootstrap, self.topics.dlq(topic)):
                headers = {name: value.decode("utf-8", "replace") for name, value in record.headers}
                letters.append(Letter((record.key or b"").decode("utf-8", "replace"), headers))
        return letters

    # -- what the APIs received so far -------------------------------------------------------------------------

    def progress(self) -> Mapping[str, float]:
        """Record id -> when its API first answered it 200 (the fake's arrival time, time.time()); read
        incrementally, so polling it is cheap."""
        new = self.fake.requests(since=self._scanned)
        self._scanned += len(new)
        for request in new:
            if request.status != 200:
                continue
            try:
                items = carried(request)
            except (KeyError, TypeError, AttributeError):
                continue  # the accounting reports it
            for identity, _ in items:
                record = self._by_identity.get(identity)
                if record is not None and record.rid not in self._done_at:
                    self._done_at[record.rid] = request.received_at
        return self._done_at

    def time_to(self, rids: Collection[str], share: float, started: float) -> float | None:
        """Seconds from `started` until `share` of `rids` had been delivered; None if not yet."""
        return time_to(self.progress(), rids, share, started)

    # -- service processes -------------------------------------------------------------------------------------

    def start_bridge(self, label: str = "") -> BridgeProcess:
        label = label or str(len(self._members) + 1)
        log = self.env.log_dir / f"{self.name}-{label}.log"
        process = BridgeProcess(self._environ, log)
        process.start()
        self._members.append(_Member(process, log, label))
        return process

    @property
    def started_services(self) -> int:
        """How many service processes this scenario started, replacements included."""
        return len(self._members)

    def _member(self, process: BridgeProcess) -> _Member:
        return next(m for m in self._members if m.process is process)

    def label(self, process: BridgeProcess) -> str:
        return self._member(process).label

    def kill(self, process: BridgeProcess) -> None:
        self._member(process).expect_running = False
        process.kill()

    async def terminate(self, process: BridgeProcess) -> None:
        """SIGTERM; a clean stop exits 0."""
        member = self._member(process)
        member.expect_running = False
        try:
            code = await asyncio.to_thread(process.terminate, 90)
        except subprocess.TimeoutExpired as exc:
            self.problem(f"service {member.label} did not stop within 90s of SIGTERM ({exc}); killed")
            process.kill()
            return
        if code != 0:
            self.problem(f"service {member.label} exited {code} on SIGTERM; log tail:\n{_tail(member.log)}")

    def running(self) -> list[BridgeProcess]:
        return [m.process for m in self._members if m.expect_running and m.process.returncode is None]

    def _check_members(self) -> None:
        """A service that dies on its own is a problem; start another one so the accounting stays meaningful,
        unless they keep dying."""
        for member in list(self._members):
            code = member.process.returncode
            if member.expect_running and code is not None:
                member.expect_running = False
                self.problem(f"service {member.label} exited {code} on its own; log tail:\n{_tail(member.log)}")
                if code == SETTINGS_REFUSED:
                    raise ScenarioAborted("the service refused its settings (exit 2); another one would too")
                if self._replacements >= MAX_REPLACEMENTS:
                    raise ScenarioAborted(f"{self._replacements + 1} services died on their own; gave up")
                self._replacements += 1
                self.start_bridge(f"replacement-{self._replacements}")

    def assignments(self, process: BridgeProcess) -> list[list[str]]:
        """The partition sets a service logged as assigned to it, oldest first."""
        member = self._member(process)
        with member.log.open("rb") as log:
            log.seek(member.log_read)
            text = log.read()
        complete = text[: text.rfind(b"\n") + 1]  # a line still being written is read next time
        member.log_read += len(complete)
        for line in complete.splitlines():
            if b'"partitions assigned"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("partitions"), list):
                    member.assigned.append([str(p) for p in entry["partitions"]])
        return member.assigned

    # -- waiting -----------------------------------------------------------------------------------------------

    async def wait_until(self, check: Callable[[], bool], *, timeout_s: float, what: str, problem: bool = True) -> bool:
        """Wait for `check` while watching the services; a timeout is a problem (unless `problem` is False, for a
        measurement that reports its own bound), not an exception."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_members()
            if check():
                return True
            if time.monotonic() > deadline:
                if problem:
                    self.problem(f"gave up after {timeout_s:.0f}s waiting for {what}")
                return False
            await asyncio.sleep(0.05)

    async def wait_calls(self, count: int, *, since: int | None = None, timeout_s: float = 300.0) -> int:
        """Wait until `count` more API calls (any outcome) arrived than `since` (a `fake.count()` taken earlier;
        default now); return how many arrived."""
        base = self.fake.count() if since is None else since
        await self.wait_until(lambda: self.fake.count() >= base + count, timeout_s=timeout_s, what=f"{count} calls")
        return self.fake.count() - base

    async def wait_ready(self) -> bool:
        """Until the running services together hold every partition, by their "partitions assigned" log lines."""
        total = 3 * self.options.partitions

        def ready() -> bool:
            held: set[str] = set()
            for process in self.running():
                assigned = self.assignments(process)
                if assigned:
                    held.update(assigned[-1])
            return len(held) == total

        return await self.wait_until(ready, timeout_s=READY_TIMEOUT_S, what="the service to take its partitions")

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check_members()
            await asyncio.sleep(min(0.2, left))

    @property
    def drain_timeout_s(self) -> float:
        return min(self.options.drain_timeout_s, self.scenario.drain_timeout_s or math.inf)

    async def wait_drained(self) -> bool:
        """Until the group has committed everything (at most `drain_timeout_s`, once per scenario)."""
        if self._drain_gave_up:
            return False
        deadline = time.monotonic() + self.drain_timeout_s
        while self.drained_at is None:
            self._check_members()
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                if await self.drained():
                    self.drained_at = time.monotonic()
                    break
            if time.monotonic() > deadline:
                self.problem(f"not everything was committed after {self.drain_timeout_s:.0f}s")
                self._drain_gave_up = True
                return False
            await asyncio.sleep(1.0)
        return True

    async def finish(self) -> ScenarioResult:
        """Wait for the drain, stop the services with SIGTERM, account for every record."""
        await self.wait_drained()
        for process in self.running():
            await self.terminate(process)
        return account(
            self.name,
            self.records,
            self.fake.requests(),
            await self.dead_letters(),
            self.problems,
            self.notes,
            self.figures,
        )


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log: {exc}>"


def time_to(done_at: Mapping[str, float], rids: Collection[str], share: float, started: float) -> float | None:
    """Seconds from `started` until `share` of `rids` were in `done_at`; None when fewer are."""
    need = math.ceil(share * len(rids) - 1e-9)
    if need <= 0:
        return 0.0
    times = sorted(done_at[rid] for rid in rids if rid in done_at)
    return times[need - 1] - started if len(times) >= need else None


# -- measuring against a healthy run ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reference:
    """When each record of a healthy run of a scenario's workload was delivered."""

    started: float
    done_at: Mapping[str, float]

    def time_to(self, rids: Collection[str], share: float) -> float | None:
        return time_to(self.done_at, rids, share, self.started)


async def _run_measured(h: Harness) -> float:
    """Produce the whole workload to the running, ready service(s); when production started (time.time())."""
    started = time.time()
    await h.produce(h.records)
    return started


async def healthy_reference(h: Harness) -> Reference:
    """Run `h`'s records (same seed, same ids) with no fault on fresh topics, group and fake APIs, measured the
    way the faulty run will be: one service, ready before production starts."""
    twin = Harness(f"{h.name}-healthy", h.env, h.options, seed=h.seed, scenario=h.scenario, tag=h.tag)
    try:
        await twin.start()
        twin.start_bridge()
        await twin.wait_ready()
        started = await _run_measured(twin)
        valid = len(twin.valid)
        await twin.wait_until(
            lambda: len(twin.progress()) >= valid, timeout_s=MEASURE_TIMEOUT_S, what="the healthy run's deliveries"
        )
        reference = Reference(started, dict(twin.progress()))
        result = await twin.finish()
    finally:
        await twin.close()
    took = reference.time_to([r.rid for r in h.valid], 1.0)
    rate = f"{len(h.valid) / took:.0f} records/s" if took else "not measured"
    h.note(f"healthy run of the same {len(h.records)} records: all delivered in {took or 0:.1f}s ({rate})")
    if not result.passed:
        h.problem(f"the healthy reference run failed: {result.line()}; {'; '.join(result.problems)}")
    return reference


def share_figure(
    h: Harness,
    reference: Reference,
    rids: Collection[str],
    *,
    share: float,
    started: float,
    name: str,
    target: float,
    target_name: str | None = None,
    what: str,
) -> Figure:
    """The faulty run's rate as a share of the healthy one's, over the first `share` of `rids` delivered."""
    healthy = reference.time_to(rids, share)
    faulty = h.time_to(rids, share, started)
    if not rids or healthy is None:
        h.problem(f"{name}: the healthy run never delivered {share:.0%} of the {what}")
        return Figure(name, 0.0, target, target_name=target_name)
    healthy = max(healthy, 1e-3)
    if faulty is None:
        waited = time.time() - started
        h.note(f"{name}: {share:.0%} of {len(rids)} {what} took {healthy:.1f}s healthy, not reached in {waited:.0f}s")
        return Figure(name, healthy / waited, target, target_name=target_name, bound=True)
    h.note(f"{name}: {share:.0%} of {len(rids)} {what} took {healthy:.1f}s healthy, {faulty:.1f}s here")
    return Figure(name, healthy / max(faulty, 1e-3), target, target_name=target_name)


# -- the scenarios ---------------------------------------------------------------------------------------------


async def _kill_cycles(h: Harness, kills: int, *, early_kill: bool) -> None:
    """Produce in `kills + 1` parts; before each part but the last, run a service and SIGKILL it mid-stream."""
    parts = stages(h.records, kills + 1)
    for i in range(kills):
        await h.produce(parts[i])
        process = h.start_bridge()
        if early_kill and i == 1:
            # One kill lands while the service starts, joins its group or takes its first records.
            delay = h.rng.uniform(0.3, 3.0)
            await h.sleep(delay)
            moment = f"{delay:.1f}s after start"
        else:
            fraction = h.rng.uniform(0.1, 0.9)
            arrived = await h.wait_calls(max(1, int(calls_in(parts[i]) * fraction)))
            moment = f"after {arrived} calls ({fraction:.0%} of this part's updates)"
        h.kill(process)
        h.note(f"kill -9 #{i + 1}: {moment}")
    await h.produce(parts[-1])
    h.start_bridge()


async def kill9(h: Harness) -> None:
    await _kill_cycles(h, h.options.kills, early_kill=h.options.kills >= 5)


async def broker_restart(h: Harness) -> None:
    broker = h.env.broker
    if broker is None:
        raise RuntimeError("broker-restart needs a broker this process owns")
    restarts = max(1, h.options.broker_restarts)
    parts = stages(h.records, restarts + 1)
    await h.produce(parts[0])
    h.start_bridge()
    for i in range(restarts):
        await h.wait_calls(max(1, int(calls_in(parts[i]) * h.rng.uniform(0.2, 0.6))))
        started = time.monotonic()
        if i % 2 == 0:
            await asyncio.to_thread(broker.restart)
        else:  # a longer outage: down for a while before it comes back
            await asyncio.to_thread(broker.stop, keep_data=True)
            await h.sleep(10.0)
            await asyncio.to_thread(broker.start)
        h.note(f"broker restart #{i + 1}: back after {time.monotonic() - started:.1f}s")
        await h.produce(parts[i + 1])


HTTP_FAULTS: Final = (
    *[Fault(status=s) for s in (500, 502, 503) for _ in range(4)],
    *[Fault(reset=True)] * 4,
    # Slow answers, one the API processed and one it did not. Within the default read timeout; a service that
    # cuts attempts sooner (by observed latency) times the first out, and then its 200 is a duplicate by design.
    *[Fault(status=None, delay_s=2.0)] * 2,
    *[Fault(status=503, delay_s=2.0)] * 2,
    # Retry-After pauses a whole destination; kept rare so the scenario ends within minutes.
    Fault(status=429, headers={"Retry-After": "1"}),
)


async def http_faults(h: Harness) -> None:
    h.fake.set_random_faults(None, 0.3, HTTP_FAULTS, seed=h.seed)
    parts = stages(h.records, 2)
    await h.produce(parts[0])
    h.start_bridge()
    await h.wait_calls(max(1, calls_in(parts[0]) // 4))
    await h.produce(parts[1])


OPENLAYER_ENDPOINTS: Final[tuple[Endpoint, ...]] = ("publish", "update_row")


async def outage(h: Harness) -> None:
    """Openlayer hangs for `outage_s`: its records wait (nothing dead-lettered), Humanloop's keep flowing."""
    parts = stages(h.records, 2)
    await h.produce(parts[0])
    h.start_bridge()
    await h.wait_calls(max(1, calls_in(parts[0]) // 5))
    started = time.time()
    for endpoint in OPENLAYER_ENDPOINTS:
        h.fake.set_down(endpoint, mode=DownMode.HANG, hold_s=10.0)
    await h.produce(parts[1])
    await h.sleep(h.options.outage_s)
    for endpoint in OPENLAYER_ENDPOINTS:
        h.fake.set_down(endpoint, down=False)
    ended = time.time()
    during = [r for r in h.fake.requests() if started <= r.received_at < ended]
    logs_ok = sum(1 for r in during if r.endpoint == "update_log" and r.status == 200)
    openlayer_calls = sum(1 for r in during if r.endpoint != "update_log")
    h.note(f"during the {h.options.outage_s:.0f}s outage: {openlayer_calls} Openlayer calls, {logs_ok} log updates ok")
    if logs_ok == 0:
        h.problem("no log update was delivered while Openlayer was down: one API's outage stalled the other")


async def poison(h: Harness) -> None:
    parts = stages(h.records, 2)
    await h.produce(parts[0])
    h.start_bridge()
    await h.wait_calls(max(1, calls_in(parts[0]) // 4))
    await h.produce(parts[1])


async def rebalance(h: Harness) -> None:
    """One consumer, then three in the same group sharing a stage of the workload, then one again.

    The middle stage is produced only once the three hold the partitions between them, and its calls are
    counted from before it was produced, so a fast service cannot finish the stage before the count starts."""
    parts = stages(h.records, 3)
    all_partitions = 3 * h.options.partitions
    await h.produce(parts[0])
    first = h.start_bridge("a")
    await h.wait_calls(max(1, calls_in(parts[0]) // 3))
    others = [h.start_bridge("b"), h.start_bridge("c")]
    members = (first, *others)

    def split() -> bool:
        """Each of the three holds partitions, and together they hold each partition exactly once."""
        latest = [h.assignments(p)[-1] if h.assignments(p) else [] for p in members]
        return all(latest) and len(set().union(*latest)) == sum(map(len, latest)) == all_partitions

    if await h.wait_until(split, timeout_s=120, what="the three consumers to split the partitions between them"):
        sizes = {h.label(p): len(h.assignments(p)[-1]) for p in members}
        h.note(f"partitions held while three consumers ran: {sizes}")
    before = h.fake.count()
    await h.produce(parts[1])
    arrived = await h.wait_calls(max(1, calls_in(parts[1]) // 3), since=before)
    h.note(f"two of the three stopped after {arrived} calls of the middle stage")
    await asyncio.gather(*(h.terminate(p) for p in others))
    await h.produce(parts[2])
    await h.wait_until(
        lambda: bool(h.assignments(first)) and len(h.assignments(first)[-1]) == all_partitions,
        timeout_s=120,
        what="the remaining consumer to take all partitions back",
    )


ORDERING_FAULTS: Final = (Fault(status=503), Fault(status=500), Fault(reset=True), Fault(status=None, delay_s=1.5))


async def ordering(h: Harness) -> None:
    """Many updates per key, retried (10% faults, slow answers) and replayed (two kill -9s)."""
    h.fake.set_random_faults(None, 0.1, ORDERING_FAULTS, seed=h.seed)
    await _kill_cycles(h, 2, early_kill=False)


HANG: Final = Fault(status=504, delay_s=30.0)
"""A call that hangs 30 s and then answers 504, as a gateway in front of a stuck backend does."""
HANG_SHARE: Final = 0.05
HANGS_TARGET: Final = 0.5
MEASURED_SHARE: Final = 0.9
"""hangs times the first 90% of the records: the hung ones themselves may take their 30 s."""


async def hangs(h: Harness) -> None:
    """5% of all calls hang 30 s, then 504; rows and update calls must keep flowing around them."""
    reference = await healthy_reference(h)
    h.start_bridge()
    await h.wait_ready()
    h.fake.set_random_faults(None, HANG_SHARE, (HANG,), seed=h.seed)
    started = await _run_measured(h)
    groups = {
        "share": ([r.rid for r in h.valid], "records", "target"),
        "share_rows": ([r.rid for r in h.valid if r.kind == "inference"], "published rows", None),
        "share_calls": ([r.rid for r in h.valid if r.kind != "inference"], "updates", None),
    }

    def measured() -> bool:
        return all(h.time_to(rids, MEASURED_SHARE, started) is not None for rids, _, _ in groups.values())

    await h.wait_until(measured, timeout_s=MEASURE_TIMEOUT_S, what="90% of each kind", problem=False)
    for name, (rids, what, target_name) in groups.items():
        h.figure(
            share_figure(
                h,
                reference,
                rids,
                share=MEASURED_SHARE,
                started=started,
                name=name,
                target=HANGS_TARGET,
                target_name=target_name,
                what=what,
            )
        )
    hung = sum(1 for r in h.fake.requests() if r.fault == "random:504")
    h.note(f"{hung} calls hung so far, of {h.fake.count()}")


RATE_LIMIT: Final = 300.0
"""Calls a second per API (Openlayer's two endpoints share it), well below what the service sends when healthy."""
RATE_TARGET: Final = 0.9
MAX_429_SHARE: Final = 0.1


async def rate_limit(h: Harness) -> None:
    """A token bucket of RATE_LIMIT calls/s per API: the service must use the limit (>= 90% of it) without
    hammering (<= 10% of its calls answered 429)."""
    h.start_bridge()
    await h.wait_ready()
    h.fake.set_rate_limit(None, RATE_LIMIT)
    started = await _run_measured(h)
    valid = len(h.valid)
    await h.wait_until(
        lambda: len(h.progress()) >= valid, timeout_s=MEASURE_TIMEOUT_S, what="every record", problem=False
    )
    ended = time.time()
    requests = h.fake.requests()
    shares, refused = [], []
    for api in APIS:
        calls = [r for r in requests if API_OF[r.endpoint] == api and r.received_at >= started]
        ok = [r.received_at for r in calls if r.status == 200]
        limited = sum(1 for r in calls if r.fault == f"{RATE_LIMITED}:429")
        refused.append(limited / max(1, len(calls)))
        if not ok:
            h.problem(f"{api}: no successful call to measure")
            shares.append(0.0)
            continue
        # The bucket starts full: its one second of burst is left out of the rate. The run ends with the last
        # success, or now if the records are not all delivered yet.
        first = min(r.received_at for r in calls)
        window = (first + 1.0, max(ok) if len(h.progress()) >= valid else ended)
        in_window = sum(1 for t in ok if window[0] <= t <= window[1])
        rate = in_window / max(window[1] - window[0], 1e-3)
        shares.append(rate / RATE_LIMIT)
        h.note(
            f"{api}: {len(ok)} calls ok at {rate:.0f}/s over {window[1] - window[0]:.1f}s, "
            f"{limited} of {len(calls)} calls answered 429"
        )
        h.figure(Figure(f"calls_per_s_{api}", rate, digits=0))
    h.figure(Figure("limit", RATE_LIMIT, digits=0))
    h.figure(Figure("share", min(shares), RATE_TARGET, target_name="target"))
    h.figure(Figure("share_429", max(refused), MAX_429_SHARE, at_most=True, target_name="max_429"))


REVOKED_S: Final = 30.0
RESUME_TARGET_S: Final = 10.0


async def auth_revoked(h: Harness) -> None:
    """Both APIs refuse the service's key (401) for REVOKED_S; then a new key is written to the key files the
    service was started with, and only that key is accepted. Nothing valid may be dead-lettered, the service
    must not restart, and calls must succeed again within RESUME_TARGET_S of the new key being written."""
    parts = stages(h.records, 2)
    process = h.start_bridge()
    await h.wait_ready()
    await h.produce(parts[0])
    await h.wait_calls(max(1, calls_in(parts[0]) // 4))
    h.fake.set_keys(openlayer=(), humanloop=())
    revoked = time.time()
    await h.produce(parts[1])
    await h.sleep(REVOKED_S)
    new_keys = {api: f"{api}-rotated-{h.seed}-{uuid.uuid4().hex[:8]}" for api in APIS}
    h.fake.set_keys(openlayer=new_keys["openlayer"], humanloop=new_keys["humanloop"])
    for api in APIS:
        write_key(h.key_files[api], new_keys[api])
    written = time.time()
    mark = len(h.fake.requests())

    def first_success(api: Api) -> float | None:
        return next(
            (
                r.received_at - written
                for r in h.fake.requests(since=mark)
                if r.received_at >= written and r.status == 200 and API_OF[r.endpoint] == api
            ),
            None,
        )

    await h.wait_until(
        lambda: all(first_success(api) is not None for api in APIS),
        timeout_s=60.0,
        what="a successful call to each API with the new key",
        problem=False,
    )
    during = [r for r in h.fake.requests() if revoked <= r.received_at < written]
    h.note(f"while the key was refused: {len(during)} calls, {sum(r.status == 401 for r in during)} answered 401")
    resumed = {api: first_success(api) for api in APIS}
    h.note(
        "first success after the new key was written: "
        + ", ".join(f"{api} {'never' if s is None else f'{s:.1f}s'}" for api, s in resumed.items())
    )
    missing = [api for api, s in resumed.items() if s is None]
    worst = time.time() - written if missing else max(s for s in resumed.values() if s is not None)
    h.figure(Figure("resume_s", worst, RESUME_TARGET_S, at_most=True, digits=1, bound=bool(missing)))
    h.figure(Figure("restarts", h.started_services - 1, 0, at_most=True, digits=0))
    if process.returncode is not None:
        h.problem(f"the service exited ({process.returncode}) instead of waiting for a new key")


NOT_YET_SHARE: Final = 0.3
NOT_YET_S: Final = 20.0
NOT_YET_TARGET: Final = 0.8


async def not_yet(h: Harness) -> None:
    """30% of update ids answer 404 for their first 20 s: the other records must flow as in a healthy run."""
    reference = await healthy_reference(h)
    held = {r.rid for r in h.valid if r.update_id and not_yet_chosen(r.update_id, NOT_YET_SHARE, h.seed)}
    others = [r.rid for r in h.valid if r.update_id and r.rid not in held]
    h.start_bridge()
    await h.wait_ready()
    h.fake.set_not_yet(NOT_YET_SHARE, NOT_YET_S, seed=h.seed)
    started = await _run_measured(h)
    await h.wait_until(
        lambda: h.time_to(others, 1.0, started) is not None,
        timeout_s=MEASURE_TIMEOUT_S,
        what="the updates of ready ids",
        problem=False,
    )
    h.figure(
        share_figure(
            h,
            reference,
            others,
            share=1.0,
            started=started,
            name="share",
            target=NOT_YET_TARGET,
            target_name="target",
            what="updates of ids that never answer 404",
        )
    )
    await h.wait_until(
        lambda: h.time_to(held, 1.0, started) is not None, timeout_s=MEASURE_TIMEOUT_S, what="the not-yet updates"
    )
    first_held = h.time_to(held, 1.0 / max(1, len(held)), started)
    all_held = h.time_to(held, 1.0, started)
    not_found = sum(1 for r in h.fake.requests() if r.fault == f"{NOT_YET}:404")
    h.note(
        f"{len(held)} updates of not-yet ids: first delivered after {first_held or 0:.1f}s, all after "
        f"{all_held or 0:.1f}s; {not_found} calls answered 404"
    )


LATENCY_WARMUP_S: Final = 3.0
"""At 0 ms before anything is measured: the service's first fetches and connections are not its steady rate."""
LATENCY_PHASES: Final = ((0.0, 6.0), (0.2, 8.0), (0.0, 6.0), (0.05, 6.0))
"""(API latency, seconds) in order after the warm-up: the step 0 -> 200 ms -> 0, then 50 ms. Each phase's rate is
taken after its first SETTLE_S, and each latency phase is compared with the 0 ms phase just before it (this
machine's speed drifts from one minute to the next). The workload must outlast them all at full speed."""
SETTLE_S: Final = 2.0
LATENCY_TARGETS: Final[Mapping[float, float]] = {0.05: 0.9, 0.2: 0.6}


async def latency_step(h: Harness) -> None:
    """A backlog of updates drained while every API call's latency steps 0 -> 200 ms -> 0 -> 50 ms; each latency
    phase's delivery rate as a share of the 0 ms phase before it."""
    await h.produce(h.records)  # the whole backlog first: the rates below are the service's, not the producer's
    h.start_bridge()
    await h.wait_ready()
    await h.sleep(LATENCY_WARMUP_S)
    valid = len(h.valid)
    windows: list[tuple[float, float, float]] = []
    for latency, seconds in LATENCY_PHASES:
        h.fake.set_latency(latency)
        begin, before = time.time(), len(h.progress())
        await h.sleep(seconds)
        windows.append((latency, begin + SETTLE_S, time.time()))
        # A phase whose backlog ran (nearly) dry measured the supply of records, not the service.
        finished = len(h.progress())
        left = valid - finished
        if left < (finished - before) / seconds * SETTLE_S:
            h.problem(f"the backlog ran out in the {latency * 1000:.0f} ms phase ({left} left); it needs more records")
            break
    h.fake.set_latency(0.0)
    await h.sleep(0.5)  # a call is recorded when answered, with the time it arrived: let the last ones land
    done = h.progress()
    rates = [(lat, sum(1 for t in done.values() if a <= t < b) / (b - a)) for lat, a, b in windows]
    h.note("delivered per second by phase: " + ", ".join(f"{lat * 1000:.0f} ms {r:.0f}/s" for lat, r in rates))
    h.figure(Figure("rate_0ms", rates[0][1], digits=0))
    reference = rates[0][1]
    for latency, rate in rates[1:]:
        if latency == 0.0:
            h.figure(Figure("share_0ms_after", rate / max(rates[0][1], 1e-3)))  # back to speed after the step?
            reference = rate
            continue
        label = f"{latency * 1000:.0f}ms"
        target = LATENCY_TARGETS.get(latency)
        h.figure(Figure(f"share_{label}", rate / max(reference, 1e-3), target, target_name=f"target_{label}"))


MIXED_FAULTS: Final = (
    *[HANG] * 5,
    *[Fault(status=503)] * 3,
    *[Fault(status=500)] * 2,
    *[Fault(status=502)] * 2,
    *[Fault(reset=True)] * 3,
    *[Fault(status=429, headers={"Retry-After": "1"})] * 2,
    *[Fault(status=None, delay_s=2.0)] * 2,
    Fault(status=504),
)
"""At a 20% fault rate: 5% of calls hang 30 s, 15% fail at once or answer slowly."""
MIXED_FAULT_RATE: Final = 0.2
MIXED_KILLS: Final = 3
MIXED_OUTAGE_S: Final = 30.0
MIXED_TARGET_S: Final = 120.0


async def mixed(h: Harness) -> None:
    """20% mixed faults (5% hangs of 30 s), 3 kill -9 and a 30 s outage of both APIs: the backlog must drain
    within MIXED_TARGET_S of being produced, with nothing lost and no valid record dead-lettered."""
    h.fake.set_random_faults(None, MIXED_FAULT_RATE, MIXED_FAULTS, seed=h.seed)
    current = h.start_bridge()
    await h.wait_ready()
    started = time.monotonic()
    await h.produce(h.records)
    calls = calls_in(h.records)

    async def kill_and_replace(number: int, moment: str) -> None:
        nonlocal current
        h.kill(current)
        current = h.start_bridge()
        h.note(f"kill -9 #{number} at {time.monotonic() - started:.1f}s, {moment}")

    fraction = h.rng.uniform(0.1, 0.25)
    arrived = await h.wait_calls(max(1, int(calls * fraction)), timeout_s=60.0)
    await kill_and_replace(1, f"after {arrived} calls")
    await h.sleep(2.0)
    h.fake.set_down(None, True, mode=DownMode.STATUS)
    down_at = time.monotonic()
    h.note(f"both APIs down (503) from {down_at - started:.1f}s for {MIXED_OUTAGE_S:.0f}s")
    into = h.rng.uniform(8.0, 20.0)
    await h.sleep(into)
    await kill_and_replace(2, f"{into:.0f}s into the outage")
    await h.sleep(max(0.0, down_at + MIXED_OUTAGE_S - time.monotonic()))
    h.fake.set_down(None, False)
    arrived = await h.wait_calls(max(1, int(calls * h.rng.uniform(0.1, 0.25))), timeout_s=60.0)
    await kill_and_replace(3, f"{arrived} calls after the outage")
    drained = await h.wait_drained()
    seconds = (h.drained_at if drained and h.drained_at is not None else time.monotonic()) - started
    h.figure(Figure("drained_s", seconds, MIXED_TARGET_S, at_most=True, digits=0, bound=not drained))


@dataclass(frozen=True, slots=True)
class Scenario:
    run: Callable[[Harness], Awaitable[None]]
    poison_share: float
    updates_per_key: int
    inference_share: float = INFERENCE_SHARE
    records: int | None = None
    """The scenario's size when the options name none; None: DEFAULT_RECORDS."""
    needs_broker: bool = False
    key_files: bool = False
    """Start the service with its API keys in files (BRIDGE_*__API_KEY_FILE) rather than in variables."""
    drain_timeout_s: float | None = None
    """A shorter wait for the drain than the options' (it bounds a scenario the service fails)."""
    clean_handovers: bool = False
    """Every member that gives up partitions does so cleanly (a rebalance, SIGTERM) with a healthy API, so it
    finishes what it has in flight and commits it (docs/semantics.md): any duplicate is a failure."""


SCENARIOS: Final[Mapping[str, Scenario]] = {
    "kill9": Scenario(kill9, poison_share=0.02, updates_per_key=3),
    "broker-restart": Scenario(broker_restart, poison_share=0.02, updates_per_key=3, needs_broker=True),
    "http-faults": Scenario(http_faults, poison_share=0.02, updates_per_key=3),
    "outage": Scenario(outage, poison_share=0.0, updates_per_key=3),
    "poison": Scenario(poison, poison_share=0.10, updates_per_key=3),
    "rebalance": Scenario(rebalance, poison_share=0.02, updates_per_key=3, clean_handovers=True),
    "ordering": Scenario(ordering, poison_share=0.0, updates_per_key=20),
    "hangs": Scenario(
        hangs, poison_share=0.0, updates_per_key=3, inference_share=0.9, records=60_000, drain_timeout_s=300
    ),
    "rate-limit": Scenario(
        rate_limit, poison_share=0.0, updates_per_key=3, inference_share=0.1, records=12_000, drain_timeout_s=300
    ),
    "auth-revoked": Scenario(
        auth_revoked, poison_share=0.02, updates_per_key=3, records=9_000, key_files=True, drain_timeout_s=300
    ),
    "not-yet": Scenario(
        not_yet, poison_share=0.0, updates_per_key=3, inference_share=0.1, records=24_000, drain_timeout_s=300
    ),
    "latency-step": Scenario(
        latency_step, poison_share=0.0, updates_per_key=3, inference_share=0.0, records=260_000, drain_timeout_s=300
    ),
    "mixed": Scenario(mixed, poison_share=0.02, updates_per_key=3, records=12_000, drain_timeout_s=300),
}


async def run_scenario(name: str, env: ChaosEnvironment, options: ChaosOptions) -> ScenarioResult:
    """Run one scenario start to finish and account for it; it never leaves a process or a server behind."""
    scenario = SCENARIOS[name]
    started = time.monotonic()
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    async with contextlib.AsyncExitStack() as stack:
        if scenario.needs_broker and env.broker is None:
            if env.jars_dir is None:
                raise RuntimeError(f"{name} needs a local broker to restart; give ChaosEnvironment.jars_dir")
            broker = stack.enter_context(LocalKafkaBroker(env.jars_dir))
            env = ChaosEnvironment(broker.bootstrap_servers, env.log_dir, broker, env.jars_dir)
        harness = Harness(name, env, options, seed=seed, scenario=scenario)
        stack.push_async_callback(harness.close)
        await harness.start()
        try:
            await scenario.run(harness)
            result = await harness.finish()
            if scenario.clean_handovers and result.duplicates:
                problem = (
                    f"{result.duplicate_deliveries} duplicate deliveries and {result.duplicate_dead_letters} duplicate "
                    "dead letters although every member left cleanly: a revoke or stop must commit what it finished"
                )
                result = replace(result, problems=(*result.problems, problem))
        except ScenarioAborted as exc:
            result = ScenarioResult(
                name,
                len(harness.records),
                problems=(*harness.problems, str(exc)),
                notes=tuple(harness.notes),
                figures=tuple(harness.figures),
            )
    return replace(result, duration_s=time.monotonic() - started)
