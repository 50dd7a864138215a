"""The record path under test, with a fixed schema registry, and the judges of what it produces.

A record's outcome is either a request the APIs accept or a `RecordError` whose reason the documentation lists
(docs/semantics.md's reason codes, schemas/README.md's table of rejections). Anything else is a finding:
another exception (a crash), an undocumented reason (unclassified), or a request the API spec refuses. The
spec is not written a second time here: `SpecJudge` hands each request, as the default HTTP client (aiohttp)
would put it on the wire, to the fake APIs' own routing and validation (tests/support/fake_apis.py), and also
checks that the API reads back exactly the ids the record carried (a pipeline id stays one path segment).
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast
from urllib.parse import unquote

import httpx
import orjson
import yarl
from aiohttp import web
from fastavro import parse_schema, schemaless_writer
from multidict import CIMultiDict, MultiDictProxy

from service.avro.codec import AvroCodec
from service.avro.registry import SchemaRegistry
from service.config.settings import DEFAULT_SCHEMA_DIR
from service.core.errors import RecordError
from service.core.events import Event, EventKind, LogUpdate, NewInference, RowUpdate
from service.core.requests import ApiRequest, Endpoint, RecordCoordinates
from service.streams import Router, schema_set
from tests.support.fake_apis import FakeApiServer, _parse_json
from tests.support.settings_doc import documented_reasons as docs_reasons

ROOT: Final = Path(__file__).resolve().parents[2]
PIPELINE: Final = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
"""The pipeline the operator configured (BRIDGE_OPENLAYER__PIPELINE_CONFIGS); others have no config."""
PIPELINE_CONFIG: Final = {"outputColumnName": "output", "inferenceIdColumnName": "id"}
WHERE: Final = RecordCoordinates(topic="inferences", partition=0, offset=42, timestamp_ms=1_763_870_000_000)
SERVER: Final = "http://fake-apis.invalid"
OPENLAYER_KEY: Final = "ol-fuzz-key"
HUMANLOOP_KEY: Final = "hl-fuzz-key"

T = TypeVar("T")


# --- the reasons the documentation promises -------------------------------------------------------------------


def documented_reasons(root: Path = ROOT) -> frozenset[str]:
    """Every `bridge.reason` code of the documentation's tables (docs/semantics.md's reason codes, the table of
    rejections in schemas/README.md) that decode and route can give. `internal-error` is left out: it is how a
    bug in the service is dead-lettered, and a fuzzer that meets one has found that bug."""
    return docs_reasons(root) - {"http-<status>", "internal-error"}


DOCUMENTED_REASONS: Final = documented_reasons()


# --- an in-memory schema registry ------------------------------------------------------------------------------


def shipped_schema(kind: EventKind) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads((DEFAULT_SCHEMA_DIR / f"{kind.value}.avsc").read_bytes())
    return schema


def _evolved_inference() -> dict[str, Any]:
    # A newer producer: one more field, which the shipped (reader) schema does not know and resolution skips.
    schema = shipped_schema(EventKind.INFERENCE)
    schema["fields"] = [*schema["fields"], {"name": "producer", "type": "string", "default": ""}]
    return schema


SCHEMA_IDS: Final[Mapping[EventKind, int]] = {EventKind.INFERENCE: 1, EventKind.ROW_UPDATE: 2, EventKind.LOG_UPDATE: 3}
EVOLVED_INFERENCE_ID: Final = 4
REGISTERED: Final[Mapping[int, dict[str, Any]]] = {
    **{schema_id: {"schema": orjson.dumps(shipped_schema(kind)).decode()} for kind, schema_id in SCHEMA_IDS.items()},
    EVOLVED_INFERENCE_ID: {"schema": orjson.dumps(_evolved_inference()).decode()},
    5: {"schema": 'syntax = "proto3"; message M { string a = 1; }', "schemaType": "PROTOBUF"},
    6: {"schema": '"string"'},
    7: {"schema": orjson.dumps({"type": "record", "name": "Other", "fields": [{"name": "x", "type": "int"}]}).decode()},
}
"""Schema ids the fake registry knows: each kind's shipped schema, an evolved inference writer, and three that
no record can be read with (PROTOBUF, a bare string, an unrelated record). Every other id is unknown (40403)."""


_WRITERS: Final = {kind: parse_schema(shipped_schema(kind)) for kind in EventKind}


def encode(kind: EventKind, record: Mapping[str, Any], schema_id: int | None = None) -> bytes:
    """`record` as a producer sends it: plain Avro, or Confluent-framed under `schema_id` (a shipped schema's)."""
    buf = io.BytesIO()
    if schema_id is not None:
        buf.write(b"\x00" + schema_id.to_bytes(4, "big"))
    schemaless_writer(buf, _WRITERS[kind], dict(record))
    return buf.getvalue()


def _registry_answer(request: httpx.Request) -> httpx.Response:
    schema_id = int(request.url.path.rsplit("/", 1)[1])
    if schema_id not in REGISTERED:
        return httpx.Response(404, json={"error_code": 40403, "message": "Schema not found"})
    return httpx.Response(200, json=REGISTERED[schema_id])


# --- the record path -------------------------------------------------------------------------------------------


class Rig:
    """The codec (auto wire format with a registry, or plain without) and the router, on an event loop of its own.

    Synchronous callers (hypothesis tests) use `decode_and_route`; the async driver awaits `adecode_and_route`.
    Close it when done.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(transport=httpx.MockTransport(_registry_answer))
        schemas = schema_set(DEFAULT_SCHEMA_DIR)
        self.codec = AvroCodec(schemas, SchemaRegistry(self._client, "http://registry.invalid"), "auto")
        self.plain_codec = AvroCodec(schemas, None, "auto")
        self.router = Router(
            openlayer_base_url=f"{SERVER}/openlayer/v1",
            humanloop_base_url=f"{SERVER}/humanloop/v4",
            pipeline_configs={PIPELINE: PIPELINE_CONFIG},
            default_config=None,
            inference_id_column="inference_id",
        )

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    async def adecode_and_route(
        self, kind: EventKind, value: bytes | None, *, registry: bool = True
    ) -> tuple[Event, ApiRequest]:
        """What the pipeline does with a record before delivery: decode, then route. Raises what they raise."""
        event = await (self.codec if registry else self.plain_codec).decode(kind, value)
        return event, self.router.route(event, WHERE)

    def decode_and_route(self, kind: EventKind, value: bytes | None, *, registry: bool = True) -> Outcome:
        """The outcome of one record; exceptions other than `RecordError` propagate (they are findings)."""
        try:
            event, request = self.run(self.adecode_and_route(kind, value, registry=registry))
        except RecordError as error:
            return Outcome(error=error)
        return Outcome(event=event, request=request)

    def close(self) -> None:
        self.run(self._client.aclose())
        self.loop.close()

    async def aclose(self) -> None:
        """`close` for a caller that ran the rig on its own loop (the driver)."""
        await self._client.aclose()
        self.loop.close()


@dataclass(frozen=True, slots=True)
class Outcome:
    event: Event | None = None
    request: ApiRequest | None = None
    error: RecordError | None = None


def undocumented(error: RecordError) -> str | None:
    """Why a refusal is not an acceptable outcome, or None when its reason is a documented one."""
    if error.reason in DOCUMENTED_REASONS:
        return None
    return f"reason {error.reason!r} ({type(error).__name__}: {error}) is not one the documentation lists"


# --- the API spec, as the fake APIs implement it ---------------------------------------------------------------


class _WireRequest:
    """What the fake APIs' validation reads of an aiohttp request: method, URL, headers, query, match_info.

    aiohttp's `make_mocked_request` gives the same and costs ~1.4 ms; this costs microseconds, and the fuzz
    driver judges hundreds of thousands of requests.
    """

    def __init__(self, method: str, raw_path_qs: str, headers: Mapping[str, str]) -> None:
        self.method = method
        self.rel_url = yarl.URL(raw_path_qs, encoded=True)
        self.headers = CIMultiDict(headers)
        self.match_info: dict[str, str] = {}

    @property
    def query(self) -> MultiDictProxy[str]:
        return self.rel_url.query

    @property
    def path(self) -> str:
        return self.rel_url.path

    @property
    def raw_path(self) -> str:
        return self.rel_url.raw_path


_PIPELINE_PATH: Final = re.compile(r"(?P<head>/openlayer/v1/inference-pipelines/)(?P<segment>[^/]+)(?P<tail>/[^/]+)")
_HANDLERS: Final[Mapping[str, Endpoint]] = {
    "_publish": Endpoint.PUBLISH,
    "_update_row": Endpoint.UPDATE_ROW,
    "_update_log": Endpoint.UPDATE_LOG,
}


class SpecJudge:
    """Judges requests with the fake APIs' routing and validation, without a socket."""

    def __init__(self) -> None:
        self._server = FakeApiServer(openlayer_key=OPENLAYER_KEY, humanloop_key=HUMANLOOP_KEY)
        self._app = self._server._build_app()

    async def problem(self, request: ApiRequest, event: Event | None = None) -> str | None:
        """None when the API would accept `request` (and read back `event`'s ids); else what is wrong."""
        # As aiohttp sends it: the URL parsed (dot segments resolved), then the params appended.
        wire = yarl.URL(request.url).extend_query(request.params)
        if not wire.raw_path_qs.startswith(("/openlayer/v1/", "/humanloop/v4/")) or wire.host != "fake-apis.invalid":
            return f"{request.method} {wire}: outside the API's base URL"
        headers = (
            {"X-API-KEY": HUMANLOOP_KEY}
            if request.endpoint is Endpoint.UPDATE_LOG
            else {"Authorization": f"Bearer {OPENLAYER_KEY}"}
        )
        # aiohttp's router matches `{pipeline_id}` with [^{}/]+, so it 404s ids with braces, which the real API
        # routes (and answers for that pipeline). Route on a stand-in segment; the API reads the real one.
        raw_path, segment = wire.raw_path, None
        found = _PIPELINE_PATH.fullmatch(raw_path)
        if found is not None:
            segment = found["segment"]
            raw_path = f"{found['head']}pipeline{found['tail']}"
        query = f"?{wire.raw_query_string}" if wire.raw_query_string else ""
        incoming = _WireRequest(request.method, raw_path + query, headers)
        match = await self._app.router.resolve(cast(web.Request, incoming))
        endpoint = _HANDLERS.get(getattr(match.handler, "__name__", ""))
        if match.http_exception is not None or endpoint is None:
            return f"{request.method} {wire.raw_path_qs}: no such endpoint ({match.http_exception})"
        if endpoint is not request.endpoint:
            return f"{request.method} {wire.raw_path_qs} reaches {endpoint.value}, not {request.endpoint.value}"
        incoming.match_info = dict(match)
        if segment is not None:
            incoming.match_info["pipeline_id"] = unquote(segment)
        refusal = self._server._judge(
            cast(web.Request, incoming), endpoint.value, request.body, _parse_json(request.body)
        )
        if refusal is not None:
            return f"{request.method} {wire.raw_path_qs}: {refusal.status} {refusal.text}"
        return _ids_problem(event, incoming) if event is not None else None


def _ids_problem(event: Event, incoming: _WireRequest) -> str | None:
    """The ids the API reads from the URL must be the record's, byte for byte."""
    read: dict[str, str | None] = {}
    expected: dict[str, str] = {}
    if isinstance(event, NewInference | RowUpdate):
        read["pipeline id"] = incoming.match_info.get("pipeline_id")
        expected["pipeline id"] = event.pipeline_id
    if isinstance(event, RowUpdate):
        read["inferenceId"] = incoming.query.get("inferenceId")
        expected["inferenceId"] = event.inference_id
    if isinstance(event, LogUpdate):
        read["reference_id"] = incoming.query.get("reference_id")
        expected["reference_id"] = event.reference_id
    wrong = [f"{name} {read[name]!r} instead of {value!r}" for name, value in expected.items() if read[name] != value]
    return f"the API reads {'; '.join(wrong)}" if wrong else None
