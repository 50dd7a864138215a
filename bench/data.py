"""The bench's records: the demo's realistic inference mix, and update events that all succeed.

Encoding a million records with fastavro would take minutes (the row schema is a deep union), so a
few thousand distinct records are encoded once and the rest are those templates with a fresh,
fixed-width id spliced into the bytes: an Avro string is its length then its bytes, so an id of the
same length leaves every other byte where it was. Every update gets its own id, hence its own
ordering key, as it would in production.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.demo import PIPELINE_LLM, PIPELINE_TABULAR, TABULAR_CONFIG
from tests.support.demo import _inference as demo_inference

TEMPLATES = 2000
_PLACEHOLDER = "bench-id-{:016d}"
_ID_WIDTH = len(_PLACEHOLDER.format(0))

PIPELINE_CONFIGS_ENV = json.dumps({PIPELINE_TABULAR: TABULAR_CONFIG})
"""`BRIDGE_OPENLAYER__PIPELINE_CONFIGS` for the tabular rows, which carry no config of their own."""


@dataclass(frozen=True, slots=True)
class Template:
    value: bytes
    id_at: int
    """Where the id's bytes start, or -1 when the record has no id to vary (its id is derived from its offset)."""

    def render(self, n: int, prefix: str) -> bytes:
        if self.id_at < 0:
            return self.value
        new_id = _fresh_id(prefix, n).encode()
        return self.value[: self.id_at] + new_id + self.value[self.id_at + _ID_WIDTH :]


def _fresh_id(prefix: str, n: int) -> str:
    # Fixed width: the spliced id must have exactly the placeholder's length.
    fresh = prefix + str(n).zfill(_ID_WIDTH - len(prefix))
    if len(fresh) != _ID_WIDTH:
        raise ValueError(f"id {fresh!r} does not fit in {_ID_WIDTH} characters")
    return fresh


def _row_update(i: int, rng: random.Random) -> dict[str, Any]:
    row = {"ground_truth": str(2 * i), "human_feedback": rng.choice(["thumbs_up", "thumbs_down"])}
    return avro_io.row_update(PIPELINE_LLM, _PLACEHOLDER.format(i), row, {"ground_truth_column_name": "ground_truth"})


def _log_update(i: int, rng: random.Random) -> dict[str, Any]:
    if i % 10 == 0:
        return avro_io.log_update(_PLACEHOLDER.format(i), error="upstream provider timeout", duration=30.0)
    return avro_io.log_update(
        _PLACEHOLDER.format(i), output=f"The answer is {2 * i}.", duration=round(rng.uniform(0.2, 4.0), 3)
    )


def _inference(i: int, rng: random.Random) -> dict[str, Any]:
    datum = demo_inference(i, rng)
    if datum["inference_id"] is not None:
        datum["inference_id"] = _PLACEHOLDER.format(i)
    return datum


_MAKERS: dict[str, Callable[[int, random.Random], dict[str, Any]]] = {
    "inference": _inference,
    "row_update": _row_update,
    "log_update": _log_update,
}


class RecordFactory:
    """Encodes each kind's templates once; `values` then renders any number of distinct records."""

    def __init__(self, seed: int = 7) -> None:
        self._encoder = AvroEncoder()
        rng = random.Random(seed)
        self._templates = {
            kind: [self._template(kind, make(i, rng)) for i in range(TEMPLATES)] for kind, make in _MAKERS.items()
        }

    @property
    def encoder(self) -> AvroEncoder:
        return self._encoder

    def _template(self, kind: str, datum: dict[str, Any]) -> Template:
        value = self._encoder.plain(kind, datum)
        for field in ("inference_id", "reference_id"):
            found = datum.get(field)
            if isinstance(found, str) and found.startswith("bench-id-"):
                at = value.find(found.encode())
                if at < 0 or value.find(found.encode(), at + 1) >= 0:
                    raise RuntimeError(f"cannot locate the id of a {kind} template in its bytes")
                return Template(value, at)
        return Template(value, -1)

    def values(self, kind: str, count: int, prefix: str, start: int = 0) -> Iterator[bytes]:
        """`count` encoded records of `kind`, ids `prefix` + number, numbered from `start`."""
        templates = self._templates[kind]
        for n in range(start, start + count):
            yield templates[n % len(templates)].render(n, prefix)

    def record_id(self, prefix: str, n: int) -> str:
        """The id `values` gives record number `n` (updates: the key the sink sees in the query)."""
        return _fresh_id(prefix, n)
