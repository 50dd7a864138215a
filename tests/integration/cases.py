"""One table of what each topic carries and what its API must receive, shared by the end-to-end tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support import avro_io
from tests.support.bridge import Topics
from tests.support.fake_apis import Endpoint

PIPELINE = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
OPENLAYER_KEY = "ol-secret-key-7f3a9c"
HUMANLOOP_KEY = "hl-secret-key-2b8e4d"
PARTITIONS = 3


@dataclass(frozen=True, slots=True)
class Case:
    kind: str
    endpoint: Endpoint
    topic_of: Callable[[Topics], str]
    datum: Callable[[int, bool], dict[str, Any]]
    """(sequence number, rejected?) -> the Avro datum a producer writes."""
    expected: Callable[[int, bool], tuple[str, str, dict[str, str], Any]]
    """(sequence number, rejected?) -> (method, path, query, JSON body) the API must receive."""
    identities: Callable[[dict[str, str], Any], list[str]]
    """Which produced records a received request carries (query, body) -> ids; a publish batches rows."""

    def identity(self, query: dict[str, str], body: Any) -> str:
        """The id of the single record an expected request carries."""
        (single,) = self.identities(query, body)
        return single

    def split(self, query: dict[str, str], body: Any) -> list[tuple[str, Any]]:
        """A received request as (record id, the body a lone request for that record would have)."""
        if self.endpoint != "publish":
            return [(self.identity(query, body), body)]
        return [(str(row["inference_id"]), {"rows": [row], "config": body["config"]}) for row in body["rows"]]


def _ref(i: int) -> str:
    return f"ref-{i:06d}"


def _inference_id(i: int) -> str:
    return f"inf-{i:06d}"


def _inference_datum(i: int, rejected: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "user_query": f"question {i}?",
        "output": f"answer {i}",
        "tokens": i,
        "cost": 0.25,
        "timestamp": 1_700_000_000 + i,
        "context": ["a", "b"],
        "meta": {"ok": True, "n": None},
    }
    if rejected:
        row["reject_me"] = True
    config = {
        "output_column_name": "output",
        "input_variable_names": ["user_query"],
        "num_of_token_column_name": "tokens",
        "cost_column_name": "cost",
        "timestamp_column_name": "timestamp",
        "prompt": [{"role": "user", "content": "{{ user_query }}"}],
    }
    return avro_io.inference(PIPELINE, row, inference_id=_inference_id(i), config=config)


def _inference_expected(i: int, rejected: bool) -> tuple[str, str, dict[str, str], Any]:
    row = dict(_inference_datum(i, rejected)["row"])
    row["inference_id"] = _inference_id(i)
    config = {
        "outputColumnName": "output",
        "inputVariableNames": ["user_query"],
        "numOfTokenColumnName": "tokens",
        "costColumnName": "cost",
        "timestampColumnName": "timestamp",
        "prompt": [{"role": "user", "content": "{{ user_query }}"}],
        "inferenceIdColumnName": "inference_id",
    }
    return "POST", f"/openlayer/v1/inference-pipelines/{PIPELINE}/data-stream", {}, {"rows": [row], "config": config}


def _row_datum(i: int, rejected: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"ground_truth": f"truth {i}", "seq": i}
    if rejected:
        row["reject_me"] = True
    return avro_io.row_update(PIPELINE, _inference_id(i), row, {"ground_truth_column_name": "ground_truth"})


def _row_expected(i: int, rejected: bool) -> tuple[str, str, dict[str, str], Any]:
    body = {"row": _row_datum(i, rejected)["row"], "config": {"groundTruthColumnName": "ground_truth"}}
    return "PUT", f"/openlayer/v1/inference-pipelines/{PIPELINE}/rows", {"inferenceId": _inference_id(i)}, body


def _log_datum(i: int, rejected: bool) -> dict[str, Any]:
    return avro_io.log_update(_ref(i), output=f"reject_me {i}" if rejected else f"Paris {i}", duration=1.5 + i)


def _log_expected(i: int, rejected: bool) -> tuple[str, str, dict[str, str], Any]:
    body = {"output": f"reject_me {i}" if rejected else f"Paris {i}", "duration": 1.5 + i}
    return "PATCH", "/humanloop/v4/logs", {"reference_id": _ref(i)}, body


CASES = [
    Case(
        "inference",
        "publish",
        lambda t: t.inferences,
        _inference_datum,
        _inference_expected,
        lambda q, b: [str(row["inference_id"]) for row in b["rows"]],
    ),
    Case(
        "row_update", "update_row", lambda t: t.row_updates, _row_datum, _row_expected, lambda q, b: [q["inferenceId"]]
    ),
    Case(
        "log_update", "update_log", lambda t: t.log_updates, _log_datum, _log_expected, lambda q, b: [q["reference_id"]]
    ),
]


def is_marked(body: Any) -> bool:
    """The fake API's rejection rule: a record the producer marked is refused with a 422."""
    return "reject_me" in repr(body)


def unique() -> str:
    return uuid.uuid4().hex
