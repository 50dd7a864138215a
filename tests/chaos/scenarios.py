"""Fault scenarios and their accounting: each one produces a known workload to fresh topics, runs the real service
(`python -m service` child processes) against the local broker and the fake APIs while it breaks something, waits
until the group has committed everything, stops the service with SIGTERM and then checks what the APIs received
and what the dead-letter topics hold against what was produced.

Every produced record has a unique id (its Kafka key, also carried in the body its API receives: the `chaos_id`
column of a row, the `output` of a log update), so the accounting is set logic, not arithmetic on counts:

    delivered      records with at least one 200 from their API
    dead_lettered  records with at least one dead letter (by Kafka key, checked against the origin headers)
    duplicates     extra 200s for a record plus extra dead letters for a record
    lost           produced records that are neither delivered nor dead-lettered

A scenario passes when nothing is lost, the dead-lettered records are exactly the poison the workload planted,
and no invariant broke: each dead letter carries the reason its kind of poison calls for, every key's first
deliveries arrive in produced order, a row published without an inference id keeps one id across redeliveries,
and every service process the scenario did not kill exits 0 on SIGTERM. What broke is reported as `problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import orjson
from aiokafka.errors import KafkaError

from tests.integration.cases import HUMANLOOP_KEY, OPENLAYER_KEY, is_marked
from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics, bridge_environment
from tests.support.fake_apis import DownMode, Endpoint, FakeApiServer, Fault, ReceivedRequest
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
"""Share of new inferences in a workload. Rows travel in batches while every update is a call of its own, so the
update topics set a scenario's length; on a busy 2-core machine the service manages about 100 calls a second."""
CONFLUENT_SHARE: Final = 0.2
"""Share of valid records written Confluent-framed (with the registered schema) rather than as plain Avro."""

# The reasons each kind of poison must be dead-lettered with (service/codec.py, registry.py, routes.py, delivery.py).
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
"""(endpoint, the service's ordering key): the pipeline for rows, pipeline/inference id, reference id."""


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
    """(ordering key, position among that key's records); None for poison."""
    inference_id: str | None = None
    """For a published row: the id it must carry; None when the service derives one."""
    poison: str | None = None
    """The kind of poison, or None for a record that must be delivered."""

    @property
    def reasons(self) -> frozenset[str]:
        return POISON_REASONS[self.poison] if self.poison is not None else frozenset()


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
            # One pipeline, one partition: its rows are ordered, and the order can be checked.
            partition=which % self._partitions,
            value=self._encode("inference", datum),
            identity=("publish", rid),
            order=(("publish", pipeline), index),  # any increasing number will do as a position
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
class ScenarioResult:
    name: str
    produced: int
    delivered: int
    duplicates: int
    dead_lettered: int
    expected_dead_lettered: int
    lost: int
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.dead_lettered == self.expected_dead_lettered and not self.problems

    def line(self) -> str:
        return (
            f"scenario={self.name} produced={self.produced} delivered={self.delivered} "
            f"duplicates={self.duplicates} dead_lettered={self.dead_lettered} "
            f"expected_dead_lettered={self.expected_dead_lettered} lost={self.lost} "
            f"result={'pass' if self.passed else 'fail'}"
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
    checked = f"order checked for {len(ordered)} keys with 2+ records ({sum(map(len, ordered))} records)"

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
    summary = ", ".join(f"{poison}->{reason}: {n}" for (poison, reason), n in sorted(outcomes.items()))
    return ScenarioResult(
        name=name,
        produced=len(records),
        delivered=len(deliveries),
        duplicates=sum(n - 1 for n in deliveries.values()) + sum(n - 1 for n in dead.values()),
        dead_lettered=len(dead),
        expected_dead_lettered=len(expected_dead),
        lost=len(lost),
        problems=tuple(found),
        notes=(*notes, checked, f"dead letters by kind and reason: {summary or 'none'}"),
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
    records: int = 21_000
    """Records per scenario over the three topics, poison included."""
    partitions: int = 4
    kills: int = 6
    broker_restarts: int = 2
    outage_s: float = 60.0
    drain_timeout_s: float = 900.0
    seed: int | None = None


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


class Harness:
    """One scenario's world: fresh topics, fake APIs and registry, service processes, and what went wrong."""

    def __init__(
        self,
        name: str,
        env: ChaosEnvironment,
        options: ChaosOptions,
        *,
        seed: int,
        service_env: Mapping[str, str],
    ) -> None:
        self.name = name
        self.env = env
        self.options = options
        self.seed = seed
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
        self._service_env = dict(service_env)
        self._members: list[_Member] = []
        self._environ: dict[str, str] = {}

    async def start(self, *, poison_share: float, updates_per_key: int) -> None:
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
        builder = WorkloadBuilder(self.topics, partitions, self.rng, schema_ids, self.name)
        self.records = builder.build(self.options.records, poison_share=poison_share, updates_per_key=updates_per_key)
        self.fake.reject_when(None, is_marked, Fault(status=422))
        self._environ = bridge_environment(
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
                **self._service_env,
            },
        )

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

    # -- service processes -------------------------------------------------------------------------------------

    def start_bridge(self, label: str = "") -> BridgeProcess:
        label = label or str(len(self._members) + 1)
        log = self.env.log_dir / f"{self.name}-{label}.log"
        process = BridgeProcess(self._environ, log)
        process.start()
        self._members.append(_Member(process, log, label))
        return process

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
        """A service that dies on its own is a problem; start another one so the accounting stays meaningful."""
        for member in list(self._members):
            if member.expect_running and member.process.returncode is not None:
                member.expect_running = False
                self.problem(
                    f"service {member.label} exited {member.process.returncode} on its own; "
                    f"log tail:\n{_tail(member.log)}"
                )
                self.start_bridge(f"{member.label}-replacement")

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

    async def wait_until(self, check: Callable[[], bool], *, timeout_s: float, what: str) -> bool:
        """Wait for `check` while watching the services; a timeout is a problem, not an exception."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_members()
            if check():
                return True
            if time.monotonic() > deadline:
                self.problem(f"gave up after {timeout_s:.0f}s waiting for {what}")
                return False
            await asyncio.sleep(0.05)

    async def wait_calls(self, count: int, *, timeout_s: float = 300.0) -> int:
        """Wait until `count` more API calls arrived than now (any outcome); return how many arrived."""
        base = self.fake.count()
        await self.wait_until(lambda: self.fake.count() >= base + count, timeout_s=timeout_s, what=f"{count} calls")
        return self.fake.count() - base

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check_members()
            await asyncio.sleep(min(0.2, left))

    async def wait_drained(self) -> bool:
        deadline = time.monotonic() + self.options.drain_timeout_s
        while True:
            self._check_members()
            with contextlib.suppress(KafkaError, OSError, TimeoutError):
                if await self.drained():
                    return True
            if time.monotonic() > deadline:
                self.problem(f"not everything was committed after {self.options.drain_timeout_s:.0f}s")
                return False
            await asyncio.sleep(1.0)

    async def finish(self) -> ScenarioResult:
        """Wait for the drain, stop the services with SIGTERM, account for every record."""
        await self.wait_drained()
        for process in self.running():
            await self.terminate(process)
        return account(
            self.name, self.records, self.fake.requests(), await self.dead_letters(), self.problems, self.notes
        )


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log: {exc}>"


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
    # Longer than the service's read timeout (1 s): one the API processed (a 200 the client never sees, so a
    # duplicate by design) and one it did not.
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
    """One consumer, then three in the same group mid-stream, then one again."""
    parts = stages(h.records, 3)
    all_partitions = 3 * h.options.partitions
    await h.produce(parts[0])
    first = h.start_bridge("a")
    await h.wait_calls(max(1, calls_in(parts[0]) // 3))
    others = [h.start_bridge("b"), h.start_bridge("c")]
    await h.produce(parts[1])
    members = (first, *others)

    def split() -> bool:
        """Each of the three holds partitions, and together they hold each partition exactly once."""
        latest = [h.assignments(p)[-1] if h.assignments(p) else [] for p in members]
        return all(latest) and len(set().union(*latest)) == sum(map(len, latest)) == all_partitions

    if await h.wait_until(split, timeout_s=120, what="the three consumers to split the partitions between them"):
        sizes = {h.label(p): len(h.assignments(p)[-1]) for p in members}
        h.note(f"partitions held while three consumers ran: {sizes}")
    await h.wait_calls(max(1, calls_in(parts[1]) // 3))
    await asyncio.gather(*(h.terminate(p) for p in others))
    await h.produce(parts[2])
    await h.wait_until(
        lambda: bool(h.assignments(first)) and len(h.assignments(first)[-1]) == all_partitions,
        timeout_s=120,
        what="the remaining consumer to take all partitions back",
    )


ORDERING_FAULTS: Final = (Fault(status=503), Fault(status=500), Fault(reset=True), Fault(status=None, delay_s=1.5))


async def ordering(h: Harness) -> None:
    """Many updates per key, retried (10% faults, timeouts that hide a success) and replayed (two kill -9s)."""
    h.fake.set_random_faults(None, 0.1, ORDERING_FAULTS, seed=h.seed)
    await _kill_cycles(h, 2, early_kill=False)


@dataclass(frozen=True, slots=True)
class Scenario:
    run: Callable[[Harness], Awaitable[None]]
    poison_share: float
    updates_per_key: int
    service_env: Mapping[str, str] = field(default_factory=dict)
    needs_broker: bool = False


_FAST_TIMEOUTS: Final = {"BRIDGE_DELIVERY__READ_TIMEOUT_S": "1"}

SCENARIOS: Final[Mapping[str, Scenario]] = {
    "kill9": Scenario(kill9, poison_share=0.02, updates_per_key=3),
    "broker-restart": Scenario(broker_restart, poison_share=0.02, updates_per_key=3, needs_broker=True),
    "http-faults": Scenario(http_faults, poison_share=0.02, updates_per_key=3, service_env=_FAST_TIMEOUTS),
    "outage": Scenario(
        outage, poison_share=0.0, updates_per_key=3, service_env={"BRIDGE_DELIVERY__READ_TIMEOUT_S": "5"}
    ),
    "poison": Scenario(poison, poison_share=0.10, updates_per_key=3),
    "rebalance": Scenario(rebalance, poison_share=0.02, updates_per_key=3),
    "ordering": Scenario(ordering, poison_share=0.0, updates_per_key=20, service_env=_FAST_TIMEOUTS),
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
        harness = Harness(name, env, options, seed=seed, service_env=scenario.service_env)
        stack.push_async_callback(harness.close)
        await harness.start(poison_share=scenario.poison_share, updates_per_key=scenario.updates_per_key)
        await scenario.run(harness)
        result = await harness.finish()
    return replace(result, duration_s=time.monotonic() - started)
