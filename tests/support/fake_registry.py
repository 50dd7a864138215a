"""A fake Confluent Schema Registry: the REST subset a consumer and a test producer use, served over real HTTP
on 127.0.0.1 from a background thread (the same `ServerThread` as the fake APIs). Ids are global and given
once per distinct schema, as Confluent does, so registering the same schema again (even with other
whitespace or key order) returns the same id; answers carry `application/vnd.schemaregistry.v1+json` and
Confluent's `{"error_code", "message"}` errors. It counts lookups per schema id, so tests can prove the client
caches, and it can be taken down (503 or connection resets) to simulate a registry outage.

    GET  /schemas/ids/{id}                    {"schema": "..."} (+ "schemaType" when not AVRO) | 404 40403
    GET  /subjects                            ["subject", ...]
    GET  /subjects/{subject}/versions         [1, 2, ...] | 404 40401
    GET  /subjects/{subject}/versions/{v}     {"subject", "version", "id", "schema"}; v may be "latest"
    POST /subjects/{subject}/versions         {"schema": "...", "schemaType"?: "AVRO"} -> {"id": N}

`python -m tests.support.fake_registry --register SUBJECT=FILE.avsc` runs it as a process until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

# Relative, so this works both as `support.fake_registry` (how the tests import it) and as
# `python -m tests.support.fake_registry` from the repository root.
from .fake_apis import DownMode, ServerThread, ThreadedServer, abort_request

CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"
SCHEMA_TYPES: Final = frozenset({"AVRO", "JSON", "PROTOBUF"})


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    """One schema as the registry holds it."""

    id: int
    schema: str
    """The schema text as served: compact JSON for AVRO and JSON schemas, verbatim for PROTOBUF."""
    schema_type: str = "AVRO"


class SchemaError(ValueError):
    """The schema text does not parse; the HTTP API answers 422 with error code 42201 for it."""


def _normalise(schema: Mapping[str, Any] | str, schema_type: str) -> tuple[str, str]:
    """(served text, identity key): the key ignores whitespace and key order, which do not change a schema."""
    if schema_type not in SCHEMA_TYPES:
        raise SchemaError(f"unknown schema type {schema_type!r}")
    if schema_type == "PROTOBUF":
        if not isinstance(schema, str):
            raise SchemaError("a PROTOBUF schema is text")
        return schema, schema
    try:
        parsed = orjson.loads(schema) if isinstance(schema, str) else schema
        served = orjson.dumps(parsed).decode()
        key = orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise SchemaError(f"invalid {schema_type} schema: {exc}") from exc
    return served, key


def _answer(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), headers={"Content-Type": CONTENT_TYPE})


def _error(status: int, code: int, message: str) -> web.Response:
    return _answer(status, {"error_code": code, "message": message})


class FakeSchemaRegistry(ThreadedServer):
    """The fake registry; every public method is thread-safe."""

    def __init__(self, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self._host = host
        self._server = ServerThread(self._build_app, host=host, port=port, name="fake-schema-registry")
        self._lock = threading.Lock()
        self._by_id: dict[int, RegisteredSchema] = {}
        self._by_key: dict[tuple[str, str], int] = {}
        self._subjects: dict[str, list[int]] = {}
        self._lookups: Counter[int] = Counter()
        self._total = 0
        self._down: DownMode | None = None
        self._hold_s = 1.0

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def register(self, subject: str, schema: Mapping[str, Any] | str, schema_type: str = "AVRO") -> int:
        """Register `schema` under `subject` (a new version unless already there) and return its global id."""
        served, key = _normalise(schema, schema_type)
        with self._lock:
            schema_id = self._by_key.get((schema_type, key))
            if schema_id is None:
                schema_id = len(self._by_id) + 1
                self._by_id[schema_id] = RegisteredSchema(schema_id, served, schema_type)
                self._by_key[(schema_type, key)] = schema_id
            versions = self._subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def schema(self, schema_id: int) -> RegisteredSchema | None:
        with self._lock:
            return self._by_id.get(schema_id)

    def request_count(self, schema_id: int | None = None) -> int:
        """GET /schemas/ids/{schema_id} requests received (all HTTP requests with None), outages included."""
        with self._lock:
            return self._total if schema_id is None else self._lookups[schema_id]

    def reset_counts(self) -> None:
        with self._lock:
            self._lookups.clear()
            self._total = 0

    def set_down(self, down: bool = True, *, mode: DownMode = DownMode.STATUS, hold_s: float = 1.0) -> None:
        """Simulate an outage: STATUS answers 503, RESET resets every connection, HANG holds then resets."""
        with self._lock:
            self._down = DownMode(mode) if down else None
            self._hold_s = hold_s

    # -- HTTP ------------------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_and_fail])
        app.router.add_get("/schemas/ids/{id}", self._get_by_id)
        app.router.add_get("/subjects", self._list_subjects)
        app.router.add_get("/subjects/{subject}/versions", self._list_versions)
        app.router.add_get("/subjects/{subject}/versions/{version}", self._get_version)
        app.router.add_post("/subjects/{subject}/versions", self._post_version)
        return app

    @web.middleware
    async def _count_and_fail(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        schema_id = request.match_info.get("id") if request.path.startswith("/schemas/ids/") else None
        with self._lock:
            self._total += 1
            if schema_id is not None and schema_id.isdigit():
                self._lookups[int(schema_id)] += 1
            down, hold_s = self._down, self._hold_s
        if down is DownMode.STATUS:
            return _error(503, 50301, "Schema registry unavailable (fake outage)")
        if down is not None:
            if down is DownMode.HANG:
                await asyncio.sleep(hold_s)
            abort_request(request)
        return await handler(request)

    async def _get_by_id(self, request: web.Request) -> web.StreamResponse:
        raw = request.match_info["id"]
        found = self.schema(int(raw)) if raw.isdigit() else None
        if found is None:
            return _error(404, 40403, "Schema not found")
        answer: dict[str, Any] = {"schema": found.schema}
        # Confluent leaves schemaType out for AVRO, and clients treat its absence as AVRO.
        if found.schema_type != "AVRO":
            answer["schemaType"] = found.schema_type
        return _answer(200, answer)

    async def _list_subjects(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            return _answer(200, sorted(self._subjects))

    async def _list_versions(self, request: web.Request) -> web.StreamResponse:
        subject = request.match_info["subject"]
        with self._lock:
            versions = self._subjects.get(subject)
        if versions is None:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        return _answer(200, list(range(1, len(versions) + 1)))

    async def _get_version(self, request: web.Request) -> web.StreamResponse:
        subject, raw = request.match_info["subject"], request.match_info["version"]
        with self._lock:
            versions = list(self._subjects.get(subject, ()))
        if not versions:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        if raw in ("latest", "-1"):
            version = len(versions)
        elif raw.isdigit() and 1 <= int(raw) <= len(versions):
            version = int(raw)
        else:
            return _error(404, 40402, f"Version {raw} not found.")
        found = self.schema(versions[version - 1])
        assert found is not None
        answer: dict[str, Any] = {"subject": subject, "version": version, "id": found.id, "schema": found.schema}
        if found.schema_type != "AVRO":
            answer["schemaType"] = found.schema_type
        return _answer(200, answer)

    async def _post_version(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, 400, "Unrecognized request body")
        if not isinstance(payload, dict) or not isinstance(payload.get("schema"), str):
            return _error(422, 42201, "Input schema is an invalid schema: a string 'schema' is required")
        try:
            schema_id = self.register(
                request.match_info["subject"], payload["schema"], str(payload.get("schemaType", "AVRO"))
            )
        except SchemaError as exc:
            return _error(422, 42201, f"Either the input schema or one its references is invalid: {exc}")
        return _answer(200, {"id": schema_id})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake registry as a process: print SCHEMA_REGISTRY_URL=..., serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_registry", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--register", action="append", default=[], metavar="SUBJECT=FILE", help="pre-register (repeatable)"
    )
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    registry = FakeSchemaRegistry(port=args.port, host=args.host)
    for item in args.register:
        subject, _, path = item.partition("=")
        if not path:
            parser.error(f"--register expects SUBJECT=FILE, got {item!r}")
        registry.register(subject, Path(path).read_text())
    with registry:
        print(f"SCHEMA_REGISTRY_URL={registry.url}", flush=True)
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
