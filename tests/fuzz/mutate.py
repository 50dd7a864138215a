"""The `make fuzz` driver's inputs: valid seed records (hostile in content) and fast byte-level mutations of them.

Hypothesis is thorough but draws a few thousand examples a second; a million records need plain `random`. The
seeds cover the three schemas in both wire formats (shipped and evolved writer ids); the mutations are the
usual havoc of a coverage-less fuzzer (bit flips, interesting bytes, inserted, deleted, duplicated and
truncated ranges, huge varints, splices of two seeds, a Confluent header with another schema id), stacked one
to four deep, plus whole random values and records sent to the wrong topic.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from typing import Any, Final

from service.apis.openlayer import TASK_RULES
from service.core.events import EventKind
from tests.fuzz.rig import EVOLVED_INFERENCE_ID, PIPELINE, REGISTERED, SCHEMA_IDS, encode

Seed = tuple[EventKind, bytes]

_ODD: Final = "\u0000\u0007\u007f\u0085\u00a0\u00ad\u0301\u200b\u202e\u2028\ufeff\ufffd\U0001f600é€"
_INTERESTING_BYTES: Final = (0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF)
_HUGE_VARINTS: Final = (
    b"\xfe\xff\xff\xff\x0f",  # 2**31 - 1 as a zigzag varint: a length no value has
    b"\xff\xff\xff\xff\x0f",  # a negative block count (a block with a byte size follows)
    b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # the largest long
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # a varint longer than 64 bits
    b"\x81\x01",
)
_SCHEMA_IDS: Final = (*REGISTERED, 0, 8, 2**31 - 1, -1)


class Records:
    """Valid records of each kind, as a producer would write them, varied and often hostile."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def text(self, hostile: bool = True) -> str:
        rng = self.rng
        roll = rng.random()
        if not hostile or roll < 0.6:
            return "".join(rng.choices(string.ascii_letters + string.digits + " _-", k=rng.randint(0, 16)))
        if roll < 0.95:
            return "".join(rng.choices(_ODD + string.printable, k=rng.randint(0, 24)))
        return rng.choice("xé\U0001f600\u0000") * rng.randint(1_000, 100_000)

    def scalar(self) -> Any:
        rng = self.rng
        return rng.choice(
            [
                None,
                rng.random() < 0.5,
                rng.randint(-(2**63), 2**63 - 1),
                rng.choice([0, -1, 2**63 - 1, -(2**63), 2**53 + 1]),
                rng.uniform(-1e6, 1e6),
                rng.choice([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1.7976931348623157e308]),
                self.text(),
            ]
        )

    def value(self, depth: int) -> Any:
        rng = self.rng
        if depth == 0 or rng.random() < 0.6:
            return self.scalar()
        if rng.random() < 0.5:
            return [self.value(depth - 1) for _ in range(rng.randint(0, 4))]
        return {self.text(): self.value(depth - 1) for _ in range(rng.randint(0, 4))}

    def row(self, depth: int = 3) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.05:  # around the 100-column limit of Update record
            return {f"column_{i}": self.scalar() for i in range(rng.randint(98, 102))}
        return {self.text(): self.value(depth) for _ in range(rng.randint(0, 6))}

    def id(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.5:
            return PIPELINE
        if roll < 0.8:
            return f"{rng.getrandbits(128):032x}"
        if roll < 0.9:
            return rng.choice(["", ".", "..", "a/b", "?x=1", "#f", "%2e%2e", "+", "&a=b", "i" * 1025])
        return self.text()

    def inference_config(self) -> dict[str, Any] | None:
        rng = self.rng
        if rng.random() < 0.5:
            return None
        config: dict[str, Any] = {
            "task_type": rng.choice([None, *sorted(TASK_RULES)]),
            "output_column_name": rng.choice([None, "output", self.text()]),
            "class_names": rng.choice([None, [self.text() for _ in range(rng.randint(0, 3))]]),
            "inference_id_column_name": rng.choice([None, None, "id", ""]),
            "prompt": rng.choice([None, [{"role": "user", "content": self.text()}]]),
            "metadata": rng.choice([None, {self.text(): self.value(2)}]),
        }
        return config

    def record(self, kind: EventKind) -> dict[str, Any]:
        rng = self.rng
        if kind is EventKind.INFERENCE:
            return {
                "inference_pipeline_id": self.id(),
                "row": self.row(),
                "inference_id": rng.choice([None, self.id()]),
                "config": self.inference_config(),
            }
        if kind is EventKind.ROW_UPDATE:
            config = rng.choice([None, {"ground_truth_column_name": "label", "latency_column_name": None}])
            return {"inference_pipeline_id": self.id(), "inference_id": self.id(), "row": self.row(), "config": config}
        return {
            "reference_id": self.id(),
            "output": rng.choice([None, self.text()]),
            "error": rng.choice([None, self.text()]),
            "duration": rng.choice([None, rng.uniform(0, 100), self.scalar() if rng.random() < 0.1 else 1.5]),
        }


def seeds(rng: random.Random, count: int) -> list[Seed]:
    """`count` valid encoded records, kinds and wire formats mixed (records a schema cannot carry are skipped)."""
    records = Records(rng)
    corpus: list[Seed] = []
    while len(corpus) < count:
        kind = rng.choice(list(EventKind))
        record = records.record(kind)
        if kind is EventKind.LOG_UPDATE and not isinstance(record["duration"], float | None):
            record["duration"] = None
        roll = rng.random()
        try:
            if roll < 0.45:
                value = encode(kind, record)
            elif kind is EventKind.INFERENCE and roll < 0.55:
                value = encode(kind, record, EVOLVED_INFERENCE_ID) + encode_string(records.text(hostile=False))
            else:
                value = encode(kind, record, SCHEMA_IDS[kind])
        except (ValueError, TypeError, OverflowError):
            continue
        corpus.append((kind, value))
    return corpus


def encode_string(text: str) -> bytes:
    data = text.encode()
    return zigzag(len(data)) + data


def zigzag(number: int) -> bytes:
    value = (number << 1) ^ (number >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Mutator:
    """Havoc on seed values; `next()` gives (kind to decode as, value, what was done)."""

    def __init__(self, rng: random.Random, corpus: list[Seed]) -> None:
        self.rng = rng
        self.corpus = corpus
        self._operations: list[Callable[[bytearray], str]] = [
            self._flip,
            self._set,
            self._interesting,
            self._insert,
            self._delete,
            self._truncate,
            self._duplicate,
            self._varint,
            self._splice,
            self._reframe,
        ]

    def next(self) -> tuple[EventKind, bytes, str]:
        rng = self.rng
        kind, value = rng.choice(self.corpus)
        roll = rng.random()
        if roll < 0.02:
            return kind, rng.randbytes(rng.randint(0, 64)), "random"
        if roll < 0.05:
            return kind, value, "seed"
        if roll < 0.10:
            return rng.choice([k for k in EventKind if k is not kind]), value, "wrong-topic"
        data = bytearray(value)
        done = [rng.choice(self._operations)(data) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
        return kind, bytes(data), "+".join(done)

    def _at(self, data: bytearray) -> int:
        return self.rng.randrange(len(data)) if data else 0

    def _flip(self, data: bytearray) -> str:
        if data:
            data[self._at(data)] ^= 1 << self.rng.randrange(8)
        return "flip"

    def _set(self, data: bytearray) -> str:
        if data:
            data[self._at(data)] = self.rng.randrange(256)
        return "set"

    def _interesting(self, data: bytearray) -> str:
        if data:
            data[self._at(data)] = self.rng.choice(_INTERESTING_BYTES)
        return "interesting"

    def _insert(self, data: bytearray) -> str:
        at = self._at(data)
        data[at:at] = self.rng.randbytes(self.rng.randint(1, 8))
        return "insert"

    def _delete(self, data: bytearray) -> str:
        at = self._at(data)
        del data[at : at + self.rng.randint(1, 16)]
        return "delete"

    def _truncate(self, data: bytearray) -> str:
        del data[self._at(data) :]
        return "truncate"

    def _duplicate(self, data: bytearray) -> str:
        at = self._at(data)
        data[at:at] = data[at : at + self.rng.randint(1, 32)]
        return "duplicate"

    def _varint(self, data: bytearray) -> str:
        at = self._at(data)
        data[at : at + self.rng.randint(0, 2)] = self.rng.choice(_HUGE_VARINTS)
        return "varint"

    def _splice(self, data: bytearray) -> str:
        _, other = self.rng.choice(self.corpus)
        at = self._at(data)
        data[at:] = other[self.rng.randrange(len(other)) :] if other else b""
        return "splice"

    def _reframe(self, data: bytearray) -> str:
        header = b"\x00" + self.rng.choice(_SCHEMA_IDS).to_bytes(4, "big", signed=True)
        if data[:1] == b"\x00" and self.rng.random() < 0.7:
            data[:5] = header
        else:
            data[:0] = header
        return "reframe"
