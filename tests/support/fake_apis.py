"""Fake Openlayer and Humanloop APIs: one real HTTP server on 127.0.0.1 that implements the three endpoints
the bridge calls (Openlayer *Publish records* and *Update record*, Humanloop v4 *Update By Reference*) as
their contracts in `shared/seeds` describe them, records every request it receives, and misbehaves on demand:
scripted error statuses with Retry-After, random faults, permanent rejection of marked records, slow answers,
connection resets, whole outages, a token-bucket rate limit per API, update ids that are "not found yet" for a
while, and API keys that change at runtime. Tests flip those switches on the object from their own thread; chaos
scripts and `make demo` flip them from another process through a small JSON control API under `/_control`.
The server runs its own event loop in a daemon thread, so synchronous tests and the service's asyncio loop
never share a loop with it. `python -m tests.support.fake_apis` (from the repository root; or
`python -m support.fake_apis` with `tests` on the path) runs it as a process until SIGTERM.

URL layout (one port):
    POST  /openlayer/v1/inference-pipelines/{id}/data-stream     endpoint "publish"
    PUT   /openlayer/v1/inference-pipelines/{id}/rows?inferenceId endpoint "update_row"
    PATCH /humanloop/v4/logs?reference_id=...                    endpoint "update_log"
    GET   /_control/health | /_control/requests?endpoint= | /_control/counts
    POST  /_control/faults (one action object or a list, see `FakeApiControl`) | /_control/reset

Validation follows the documents and is deliberately strict where they leave room, so a client bug shows up
as an error rather than passing silently: Openlayer answers 400 for a request that cannot be read (no JSON,
missing `inferenceId`) and 422 for JSON that breaks the schema, always as `{"code", "error"}`; Humanloop
answers FastAPI's 422 `{"detail": [{"loc", "msg", "type", "input"}]}` and, unlike the real service, also
refuses unknown body keys, nulls and numeric strings. The Openlayer `config` is only checked to be an object,
because the `oneOf` of Openlayer's published API schema rejects some valid configs.

Per request, the first of these that applies decides the answer: an outage (`set_down`), the rate limit
(`set_rate_limit`: 429 with `Retry-After: 1` when the API's token bucket is empty), the next scripted fault
(`script`), a random fault (`set_random_faults`), the authentication (`set_keys`) and validation checks, the
not-yet rule (`set_not_yet`: 404 for a chosen share of update ids until some seconds after the fake first saw
them), a rejection rule (`reject_when`), and otherwise success. `set_latency` delays every call before all of
that; it is read when a call arrives, so a change takes effect for the next call. `delayed_calls` and
`wait_for_delayed_calls` tell how many calls are waiting out their latency, and `end_delays` lets those go on at
once, so a test can hold calls in flight without measuring time. The rate limits and the not-yet windows measure
time with the server's `clock` (`time.monotonic` unless a test passes one it moves by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any, Final, Literal, NoReturn, Self, TypeGuard

import httpx
import orjson
from aiohttp import web

Endpoint = Literal["publish", "update_row", "update_log"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("publish", "update_row", "update_log")
Api = Literal["openlayer", "humanloop"]
APIS: Final[tuple[Api, ...]] = ("openlayer", "humanloop")
API_OF: Final[Mapping[Endpoint, Api]] = {"publish": "openlayer", "update_row": "openlayer", "update_log": "humanloop"}
"""Which API serves an endpoint; a rate limit and the keys belong to an API, not to one endpoint."""
RATE_LIMITED: Final = "ratelimit"
"""The `fault` label prefix of a call the token bucket refused ("ratelimit:429")."""
NOT_YET: Final = "notyet"
"""The `fault` label prefix of an update answered 404 because its id is not there yet ("notyet:404")."""

OPENLAYER_PREFIX: Final = "/openlayer/v1"
HUMANLOOP_PREFIX: Final = "/humanloop/v4"
CONTROL_PREFIX: Final = "/_control"

MAX_ROW_KEYS: Final = 100
"""Openlayer *Update record*: `row` has `minProperties: 1`, `maxProperties: 100`."""

_JSON: Final = "application/json"
_SUCCESS: Final = b'{"success":true}'
_NO_RESPONSE: Final = 0
"""The status recorded for a request whose connection was reset instead of answered."""


class _Unparsable:
    """Marks a body that is not JSON, which `None` cannot do because `null` is valid JSON."""

    __slots__ = ()


_UNPARSABLE: Final = _Unparsable()


class DownMode(StrEnum):
    """How an endpoint behaves during a simulated outage; each one exercises a different client path."""

    STATUS = "status"
    """Answer 503 at once, like a load balancer with no healthy backend."""
    RESET = "reset"
    """Reset the connection at once without answering: a crashed backend."""
    HANG = "hang"
    """Hold the connection for `hold_s` and then reset it: a stuck backend, for client timeouts."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected misbehaviour. The default, `Fault()`, is an immediate 503 in the vendor's error shape."""

    status: int | None = 503
    """The status to answer; None answers the request normally once `delay_s` has passed (a slow success)."""
    body: Any = None
    """None for the vendor's own error body; str or bytes are sent as they are; anything else as JSON."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. {"Retry-After": "1"}; a Content-Type here overrides the default."""
    delay_s: float = 0.0
    """Seconds to wait before answering (or resetting), to make clients time out."""
    reset: bool = False
    """Close the TCP connection with a reset instead of answering."""

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status or None, got {self.status}")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        # A private copy, so a caller mutating its dict cannot change a fault already scheduled.
        object.__setattr__(self, "headers", dict(self.headers))

    def describe(self) -> str:
        """The short label recorded with the request: "503", "reset" or "slow 2.0s"."""
        if self.reset:
            return "reset"
        if self.status is None:
            return f"slow {self.delay_s}s"
        return str(self.status)

    def to_json(self) -> dict[str, Any]:
        """The control API's form of this fault; bytes bodies travel as text."""
        body = self.body.decode("utf-8", "replace") if isinstance(self.body, bytes) else self.body
        return {
            "status": self.status,
            "body": body,
            "headers": dict(self.headers),
            "delay_s": self.delay_s,
            "reset": self.reset,
        }

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """Build a fault from the control API's JSON; unknown keys are refused so typos do not pass."""
        if not isinstance(data, dict):
            raise ValueError("a fault must be a JSON object")
        unknown = set(data) - {"status", "body", "headers", "delay_s", "reset"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        status = data.get("status", 503)
        headers = data.get("headers") or {}
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise ValueError("fault status must be an integer or null")
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            raise ValueError("fault headers must be an object of strings")
        return cls(
            status=status,
            body=data.get("body"),
            headers=headers,
            delay_s=float(data.get("delay_s", 0.0)),
            reset=bool(data.get("reset", False)),
        )


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake received it, with what it answered."""

    endpoint: Endpoint
    method: str
    path: str
    """Percent-decoded, as aiohttp's `request.path`."""
    query: dict[str, str]
    headers: dict[str, str]
    """Header names lower-cased."""
    body: bytes
    json: Any
    """The parsed body, or None when it was empty or not JSON."""
    status: int
    """The status answered; 0 when the connection was reset instead."""
    fault: str | None
    """Which injected fault decided the answer ("script:503", "random:reset", "rule:422", "down:503"), or
    None when the request was judged on its merits (success, 401, validation errors)."""
    received_at: float
    """time.time() when the request arrived."""
    raw_path: str = ""
    """The request target exactly as it came over the wire (path and query), percent-encoding included."""
    pipeline_id: str | None = None
    """The decoded `{id}` path segment of an Openlayer endpoint."""

    def to_json(self) -> dict[str, Any]:
        """The control API's form: the body decoded as JSON, or as text when it is not JSON."""
        body = self.json
        if body is None and self.body:
            body = self.body.decode("utf-8", "replace")
        return {
            "endpoint": self.endpoint,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": body,
            "status": self.status,
            "fault": self.fault,
            "received_at": self.received_at,
            "raw_path": self.raw_path,
            "pipeline_id": self.pipeline_id,
        }


@dataclass(frozen=True, slots=True)
class _RandomFaults:
    rate: float
    choices: tuple[Fault, ...]
    rng: random.Random


@dataclass(frozen=True, slots=True)
class _Rule:
    predicate: Callable[[Any], bool]
    fault: Fault


class _TokenBucket:
    """`rate` tokens a second, holding at most `capacity`; a call takes one or is refused. Starts full at `now`,
    a reading of the clock that `take` is given later."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class _NotYet:
    share: float
    seconds: float
    seed: int
    first_seen: dict[str, float] = field(default_factory=dict)
    """Chosen id -> the server's clock reading at the first valid call that named it."""


RATE_LIMIT_FAULT: Final = Fault(status=429, headers={"Retry-After": "1"})
"""What a call gets when its API's bucket is empty: whole seconds in Retry-After, as the real APIs send."""


def not_yet_chosen(identifier: str, share: float, seed: int) -> bool:
    """Whether `set_not_yet(share, ..., seed)` makes updates of `identifier` (an Update-record `inferenceId` or
    a log's `reference_id`) answer 404 at first. A hash of seed and id, so a scenario can tell in advance."""
    if share <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{identifier}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < share


def update_id(endpoint: Endpoint, query: Mapping[str, str]) -> str | None:
    """The id an update call addresses (None for a publish): the row's `inferenceId` or the log's
    `reference_id`."""
    if endpoint == "update_row":
        return query.get("inferenceId")
    if endpoint == "update_log":
        return query.get("reference_id")
    return None


def _key_set(keys: str | Iterable[str]) -> frozenset[str]:
    return frozenset((keys,)) if isinstance(keys, str) else frozenset(keys)


def is_endpoint(value: object) -> TypeGuard[Endpoint]:
    """True for the three endpoint names."""
    return value in ENDPOINTS


def _endpoints(endpoint: Endpoint | None) -> tuple[Endpoint, ...]:
    if endpoint is None:
        return ENDPOINTS
    if not is_endpoint(endpoint):
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {ENDPOINTS}")
    return (endpoint,)


def contains_key(key: str) -> Callable[[Any], bool]:
    """A `reject_when` predicate: true when any object anywhere in the JSON body has `key`.

    Producers mark a record as poison by giving it a marker column; the walk finds it inside `rows[*]` of a
    publish, `row` of an update or the top level of a log update, so one rule works for every endpoint.
    """

    def found(value: Any) -> bool:
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                if key in item:
                    return True
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return False

    return found


def _parse_json(body: bytes) -> Any:
    if not body:
        return _UNPARSABLE
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _UNPARSABLE


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Injected fault"


def _json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    merged = {"Content-Type": _JSON, **(headers or {})}
    return web.Response(status=status, body=orjson.dumps(payload), headers=merged)


def _openlayer_error(status: int, message: str) -> web.Response:
    return _json_response(status, {"code": status, "error": message})


def _validation_error(*errors: dict[str, Any]) -> web.Response:
    return _json_response(422, {"detail": list(errors)})


def _error_item(loc: Sequence[str | int], msg: str, kind: str, value: Any = None) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind, "input": value}


def abort_request(request: web.BaseRequest) -> NoReturn:
    """Reset the request's TCP connection without answering and end the handler.

    SO_LINGER with a zero timeout turns the close into an RST, so the client sees a reset rather than a
    clean end of stream. The handler then ends as cancelled, which aiohttp takes for a client that went away:
    nothing is written and nothing is logged.
    """
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise asyncio.CancelledError


class ThreadedServer:
    """Start/stop, context manager and port for a fake whose `_server` is a `ServerThread`."""

    _server: ServerThread

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.port


class ServerThread:
    """Serves an aiohttp application on 127.0.0.1 from a daemon thread that owns its event loop.

    The socket is bound in `start()` before the thread runs, so the port is known (and taken) as soon as
    `start()` returns; handlers are cancelled when their client disconnects, so a delayed answer never
    outlives the test that asked for it.
    """

    def __init__(
        self,
        make_app: Callable[[], web.Application],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "fake-http",
    ) -> None:
        self._make_app = make_app
        self._host = host
        self._requested_port = port
        self._name = name
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self._name} is not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._requested_port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        ready = threading.Event()
        failures: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(sock, ready, failures), name=self._name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{self._name} did not start within {timeout}s")
        if failures:
            self._thread.join()
            self._thread = None
            raise RuntimeError(f"{self._name} failed to start") from failures[0]

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None

    def _run(self, sock: socket.socket, ready: threading.Event, failures: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # access_log=None: per-request logging would cost more than the handlers themselves in benchmarks.
        runner = web.AppRunner(self._make_app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
        except Exception as exc:  # noqa: BLE001 - not swallowed: start() re-raises it in the caller's thread
            failures.append(exc)
            sock.close()
            loop.close()
            ready.set()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


class FakeApiServer(ThreadedServer):
    """The fake Openlayer + Humanloop server. All public methods are thread-safe and take effect at once."""

    def __init__(
        self,
        *,
        openlayer_key: str = "ol-test-key",
        humanloop_key: str = "hl-test-key",
        port: int = 0,
        host: str = "127.0.0.1",
        pipelines: Iterable[str] | None = None,
        record: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`pipelines` is an allow-list of pipeline ids (others get 404); None accepts any id. `record=False`
        keeps only the counts, for benchmarks that send more requests than are worth holding in memory.
        `clock` gives the seconds (only differences matter) that the rate limits and the not-yet windows
        measure; it is called from the server thread. Latency and fault delays always run on real time."""
        self._initial_keys = (frozenset((openlayer_key,)), frozenset((humanloop_key,)))
        self._openlayer_keys, self._humanloop_keys = self._initial_keys
        self._pipelines = frozenset(pipelines) if pipelines is not None else None
        self._record = record
        self._host = host
        self._server = ServerThread(self._build_app, host=host, port=port, name="fake-apis")
        # One lock for the recordings and the switches: the handler thread reads what test threads write.
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._delays_changed = threading.Condition(self._lock)
        self._clock = clock
        self._requests: list[ReceivedRequest] = []
        self._counts: dict[Endpoint, int] = dict.fromkeys(ENDPOINTS, 0)
        self._scripts: dict[Endpoint, deque[Fault]] = {e: deque() for e in ENDPOINTS}
        self._random: dict[Endpoint, _RandomFaults] = {}
        self._rules: dict[Endpoint, list[_Rule]] = {e: [] for e in ENDPOINTS}
        self._down: dict[Endpoint, tuple[Fault, DownMode]] = {}
        self._latency_s = 0.0
        self._delayed: set[asyncio.Future[None]] = set()
        """One future per call waiting out its latency; the call goes on when it is done."""
        self._buckets: dict[Api, _TokenBucket] = {}
        self._not_yet: _NotYet | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def openlayer_base_url(self) -> str:
        return self.base_url + OPENLAYER_PREFIX

    @property
    def humanloop_base_url(self) -> str:
        return self.base_url + HUMANLOOP_PREFIX

    @property
    def control_url(self) -> str:
        return self.base_url + CONTROL_PREFIX

    # -- recordings ------------------------------------------------------------------------------------

    def requests(self, endpoint: Endpoint | None = None, *, since: int = 0) -> list[ReceivedRequest]:
        """What arrived so far, oldest first, faulted requests included; `since` skips the first recordings
        (of all endpoints), so a poller can read only what is new."""
        with self._lock:
            if endpoint is None:
                return self._requests[since:]
            return [r for r in self._requests[since:] if r.endpoint == endpoint]

    def count(self, endpoint: Endpoint | None = None) -> int:
        """How many requests arrived; kept even when recording is off."""
        with self._lock:
            return sum(self._counts[e] for e in _endpoints(endpoint))

    def clear(self) -> None:
        """Forget the recordings and counts; faults stay as they are."""
        with self._lock:
            self._requests.clear()
            self._counts = dict.fromkeys(ENDPOINTS, 0)

    def wait_for_requests(
        self,
        count: int,
        endpoint: Endpoint | None = None,
        *,
        where: Callable[[ReceivedRequest], bool] | None = None,
        timeout: float = 10.0,
    ) -> list[ReceivedRequest]:
        """Block until at least `count` matching requests were recorded; TimeoutError otherwise."""

        def matching() -> list[ReceivedRequest]:
            return [
                r
                for r in self._requests
                if (endpoint is None or r.endpoint == endpoint) and (where is None or where(r))
            ]

        with self._arrived:
            if not self._arrived.wait_for(lambda: len(matching()) >= count, timeout):
                raise TimeoutError(f"{len(matching())} of {count} requests arrived within {timeout}s")
            return matching()

    def delayed_calls(self) -> int:
        """How many API calls are waiting out their latency (`set_latency`) right now."""
        with self._lock:
            return len(self._delayed)

    def wait_for_delayed_calls(self, count: int, *, timeout: float = 10.0) -> None:
        """Block until at least `count` API calls are waiting out their latency; TimeoutError otherwise."""
        with self._delays_changed:
            if not self._delays_changed.wait_for(lambda: len(self._delayed) >= count, timeout):
                raise TimeoutError(f"{len(self._delayed)} of {count} calls were waiting out their latency")

    def end_delays(self) -> int:
        """End the latency wait of every call waiting now, as if its time were up, and return how many there
        were. Calls that arrive later wait out the latency as usual."""
        with self._lock:
            ending = list(self._delayed)
            self._delayed.clear()
            self._delays_changed.notify_all()
        for ended in ending:
            ended.get_loop().call_soon_threadsafe(_finish, ended)
        return len(ending)

    # -- faults ----------------------------------------------------------------------------------------

    def script(self, endpoint: Endpoint, faults: Iterable[Fault]) -> None:
        """Queue faults that answer the next requests to `endpoint`, one each, in order."""
        (target,) = _endpoints(endpoint)
        queued = list(faults)
        with self._lock:
            self._scripts[target].extend(queued)

    def pending_script(self, endpoint: Endpoint) -> int:
        """How many scripted faults are still waiting for a request."""
        with self._lock:
            return len(self._scripts[endpoint])

    def set_random_faults(
        self,
        endpoint: Endpoint | None,
        rate: float,
        choices: Sequence[Fault] = (Fault(),),
        seed: int | None = None,
    ) -> None:
        """Fail a share `rate` of the requests (0 turns it off) with a fault drawn from `choices`.

        With a seed each endpoint gets its own generator, so one endpoint's sequence does not depend on how
        requests to the others interleave with it.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        if rate > 0 and not choices:
            raise ValueError("choices must not be empty")
        with self._lock:
            for target in _endpoints(endpoint):
                if rate == 0:
                    self._random.pop(target, None)
                else:
                    self._random[target] = _RandomFaults(rate, tuple(choices), random.Random(seed))

    def reject_when(
        self,
        endpoint: Endpoint | None,
        predicate: Callable[[Any], bool],
        fault: Fault | None = None,
    ) -> None:
        """Answer `fault` (default 422) to every valid request whose parsed body matches `predicate`.

        This makes chosen records permanently rejected, however often they are retried. The predicate runs
        in the server thread after authentication and validation passed, and must not raise.
        """
        rule = _Rule(predicate, fault or Fault(status=422))
        with self._lock:
            for target in _endpoints(endpoint):
                self._rules[target].append(rule)

    def set_down(
        self,
        endpoint: Endpoint | None = None,
        down: bool = True,
        *,
        mode: DownMode = DownMode.STATUS,
        hold_s: float = 1.0,
    ) -> None:
        """Start (or end, with down=False) an outage of one endpoint or, with None, of all of them."""
        outage = {
            DownMode.STATUS: Fault(status=503),
            DownMode.RESET: Fault(reset=True),
            DownMode.HANG: Fault(reset=True, delay_s=hold_s),
        }[DownMode(mode)]
        with self._lock:
            for target in _endpoints(endpoint):
                if down:
                    self._down[target] = (outage, DownMode(mode))
                else:
                    self._down.pop(target, None)

    def set_latency(self, seconds: float) -> None:
        """Delay every API call (not the control API) by `seconds` before anything else happens."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        with self._lock:
            self._latency_s = seconds

    def set_rate_limit(self, api: Api | None, rate: float | None, capacity: float | None = None) -> None:
        """A token bucket for `api` (None: each API its own): `rate` calls a second, bursts up to `capacity`
        (default `rate`, one second's worth). Openlayer's two endpoints share one bucket. A call that finds it
        empty is answered 429 with `Retry-After: 1` in the vendor's error shape, recorded as "ratelimit:429".
        `rate` None or 0 removes the limit. The bucket starts full."""
        if rate is not None and rate < 0:
            raise ValueError("rate must not be negative")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be at least 1")
        with self._lock:
            for target in APIS if api is None else (api,):
                if target not in APIS:
                    raise ValueError(f"unknown api {target!r}; expected one of {APIS}")
                if not rate:
                    self._buckets.pop(target, None)
                else:
                    bucket = _TokenBucket(rate, capacity if capacity is not None else rate, self._clock())
                    self._buckets[target] = bucket

    def set_not_yet(self, share: float, seconds: float, seed: int = 0) -> None:
        """Answer 404 ("not found", in the vendor's shape; recorded as "notyet:404") to updates of a share of
        ids, chosen by `not_yet_chosen(id, share, seed)`, until `seconds` after the first valid call that named
        the id; then judge them normally. Ids are row updates' `inferenceId` and log updates' `reference_id`.
        `share` 0 turns it off. Each call starts a fresh clock for every id."""
        if not 0.0 <= share <= 1.0:
            raise ValueError("share must be within [0, 1]")
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        with self._lock:
            self._not_yet = _NotYet(share, seconds, int(seed)) if share > 0 else None

    def set_keys(
        self, openlayer: str | Iterable[str] | None = None, humanloop: str | Iterable[str] | None = None
    ) -> None:
        """Change the accepted API key(s) of an API at once (None leaves that API's as they are). A key or an
        iterable of keys; an empty iterable refuses every key, so every call of that API answers 401."""
        with self._lock:
            if openlayer is not None:
                self._openlayer_keys = _key_set(openlayer)
            if humanloop is not None:
                self._humanloop_keys = _key_set(humanloop)

    def clear_faults(self, endpoint: Endpoint | None = None) -> None:
        """Drop scripts, random faults, rules and outages (and, for all endpoints, the latency, the rate limits
        and the not-yet rule)."""
        with self._lock:
            for target in _endpoints(endpoint):
                self._scripts[target].clear()
                self._random.pop(target, None)
                self._rules[target].clear()
                self._down.pop(target, None)
            if endpoint is None:
                self._latency_s = 0.0
                self._buckets.clear()
                self._not_yet = None

    def reset(self) -> None:
        """Back to a fresh server: no faults, no recordings, the keys it was made with."""
        self.clear_faults()
        self.clear()
        with self._lock:
            self._openlayer_keys, self._humanloop_keys = self._initial_keys

    # -- HTTP ------------------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        # Publish batches can be large; the default 1 MiB limit would turn them into 413s.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        pipelines = f"{OPENLAYER_PREFIX}/inference-pipelines/{{pipeline_id}}"
        app.router.add_post(f"{pipelines}/data-stream", self._publish)
        app.router.add_put(f"{pipelines}/rows", self._update_row)
        app.router.add_patch(f"{HUMANLOOP_PREFIX}/logs", self._update_log)
        app.router.add_get(f"{CONTROL_PREFIX}/health", self._control_health)
        app.router.add_get(f"{CONTROL_PREFIX}/requests", self._control_requests)
        app.router.add_get(f"{CONTROL_PREFIX}/counts", self._control_counts)
        app.router.add_post(f"{CONTROL_PREFIX}/faults", self._control_faults)
        app.router.add_post(f"{CONTROL_PREFIX}/reset", self._control_reset)
        return app

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "publish")

    async def _update_row(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "update_row")

    async def _update_log(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "update_log")

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        received_at = time.time()
        body = await request.read()
        payload = _parse_json(body)
        with self._lock:
            latency = self._latency_s
        if latency:
            await self._wait_out(latency)

        chosen = self._take_fault(endpoint)
        response: web.Response | None = None
        if chosen is None or (chosen[0].status is None and not chosen[0].reset):
            # No fault, or a slow success: judge the request on its merits.
            response = self._judge(request, endpoint, body, payload)
            if response is None:
                not_yet = self._not_yet_fault(endpoint, request)
                rule = self._match_rule(endpoint, payload) if not_yet is None else None
                if not_yet is not None:
                    chosen = (not_yet, NOT_YET)
                elif rule is not None:
                    chosen = (rule, "rule")
                else:
                    response = self._succeed(request, endpoint, payload)

        fault, label = chosen if chosen is not None else (None, None)
        if fault is not None and (fault.reset or fault.status is not None):
            response = None if fault.reset else self._fault_response(endpoint, fault)
        status = response.status if response is not None else _NO_RESPONSE
        self._note(
            request,
            endpoint,
            body,
            payload,
            status,
            f"{label}:{fault.describe()}" if fault is not None else None,
            received_at,
        )

        if fault is not None and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if response is None:
            abort_request(request)
        return response

    async def _wait_out(self, latency: float) -> None:
        """Sleep `latency` seconds, or until `end_delays`; `delayed_calls` counts the call meanwhile."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(latency, _finish, ended)
        with self._delays_changed:
            self._delayed.add(ended)
            self._delays_changed.notify_all()
        try:
            await ended
        finally:
            timer.cancel()
            with self._delays_changed:
                self._delayed.discard(ended)
                self._delays_changed.notify_all()

    def _take_fault(self, endpoint: Endpoint) -> tuple[Fault, str] | None:
        with self._lock:
            outage = self._down.get(endpoint)
            if outage is not None:
                return outage[0], "down"
            bucket = self._buckets.get(API_OF[endpoint])
            if bucket is not None and not bucket.take(self._clock()):
                return RATE_LIMIT_FAULT, RATE_LIMITED
            script = self._scripts[endpoint]
            if script:
                return script.popleft(), "script"
            chaos = self._random.get(endpoint)
            if chaos is not None and chaos.rng.random() < chaos.rate:
                return chaos.rng.choice(chaos.choices), "random"
        return None

    def _not_yet_fault(self, endpoint: Endpoint, request: web.Request) -> Fault | None:
        identifier = update_id(endpoint, request.query)
        with self._lock:
            rule = self._not_yet
            if rule is None or not identifier or not not_yet_chosen(identifier, rule.share, rule.seed):
                return None
            now = self._clock()
            first = rule.first_seen.setdefault(identifier, now)
        if now - first >= rule.seconds:
            return None
        if endpoint == "update_row":
            body: Any = {"code": 404, "error": f"Row with inferenceId {identifier} not found"}
        else:
            body = {"detail": f"Log with reference_id {identifier} not found"}
        return Fault(status=404, body=body)

    def _match_rule(self, endpoint: Endpoint, payload: Any) -> Fault | None:
        with self._lock:
            rules = list(self._rules[endpoint])
        for rule in rules:
            if rule.predicate(payload):
                return rule.fault
        return None

    def _note(
        self,
        request: web.Request,
        endpoint: Endpoint,
        body: bytes,
        payload: Any,
        status: int,
        fault: str | None,
        received_at: float,
    ) -> None:
        if not self._record:
            with self._lock:
                self._counts[endpoint] += 1
            return
        entry = ReceivedRequest(
            endpoint=endpoint,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            json=None if payload is _UNPARSABLE else payload,
            status=status,
            fault=fault,
            received_at=received_at,
            raw_path=request.raw_path,
            pipeline_id=request.match_info.get("pipeline_id"),
        )
        with self._arrived:
            self._counts[endpoint] += 1
            self._requests.append(entry)
            self._arrived.notify_all()

    def _judge(self, request: web.Request, endpoint: Endpoint, body: bytes, payload: Any) -> web.Response | None:
        """Authentication and validation: the error response, or None when the request is acceptable."""
        if endpoint == "update_log":
            return self._judge_log(request, body, payload)
        auth = request.headers.get("Authorization")
        if auth is None:
            return _openlayer_error(401, "Missing API key: send Authorization: Bearer <key>")
        scheme, _, key = auth.partition(" ")
        with self._lock:
            accepted = self._openlayer_keys
        if scheme != "Bearer" or key not in accepted:
            return _openlayer_error(401, "Invalid API key")
        pipeline_id = request.match_info["pipeline_id"]
        if self._pipelines is not None and pipeline_id not in self._pipelines:
            return _openlayer_error(404, f"Inference pipeline {pipeline_id} not found")
        if endpoint == "update_row" and not request.query.get("inferenceId"):
            return _openlayer_error(400, "Missing required query parameter inferenceId")
        if payload is _UNPARSABLE:
            return _openlayer_error(400, "Request body must be JSON")
        if not isinstance(payload, dict):
            return _openlayer_error(422, "Request body must be a JSON object")
        problem = _publish_problem(payload) if endpoint == "publish" else _update_row_problem(payload)
        return _openlayer_error(422, problem) if problem else None

    def _judge_log(self, request: web.Request, body: bytes, payload: Any) -> web.Response | None:
        with self._lock:
            accepted = self._humanloop_keys
        if request.headers.get("X-API-KEY") not in accepted:
            return _json_response(401, {"detail": "Invalid or missing API key"})
        errors: list[dict[str, Any]] = []
        reference_id = request.query.get("reference_id")
        if reference_id is None:
            errors.append(_error_item(("query", "reference_id"), "Field required", "missing"))
        elif not reference_id:
            errors.append(
                _error_item(
                    ("query", "reference_id"),
                    "String should have at least 1 character",
                    "string_too_short",
                    reference_id,
                )
            )
        errors.extend(_update_log_problems(body, payload))
        return _validation_error(*errors) if errors else None

    def _succeed(self, request: web.Request, endpoint: Endpoint, payload: Any) -> web.Response:
        if endpoint != "update_log":
            return web.Response(body=_SUCCESS, content_type=_JSON)
        reference_id = request.query["reference_id"]
        # A stable id per reference, as the real service returns the id of the log it already holds.
        log_id = "data_" + hashlib.blake2b(reference_id.encode(), digest_size=10).hexdigest()
        answer: dict[str, Any] = {
            "id": log_id,
            "config": {
                "id": "config_fakeinferencebridge",
                "type": "generic",
                "status": "committed",
                "name": "inference-bridge-fake",
                "other": {},
            },
            "evaluation_results": [],
            "observability_status": "completed",
            "updated_at": datetime.now(UTC),
            "reference_id": reference_id,
            **payload,
        }
        return web.Response(body=orjson.dumps(answer, option=orjson.OPT_UTC_Z), content_type=_JSON)

    def _fault_response(self, endpoint: Endpoint, fault: Fault) -> web.Response:
        assert fault.status is not None
        status = fault.status
        if fault.body is None:
            if endpoint != "update_log":
                return _json_response(status, {"code": status, "error": _phrase(status)}, fault.headers)
            if status == 422:
                item = _error_item(("body",), "Rejected by the fake's rule", "value_error")
                return _json_response(status, {"detail": [item]}, fault.headers)
            return _json_response(status, {"detail": _phrase(status)}, fault.headers)
        if isinstance(fault.body, bytes | str):
            raw = fault.body.encode() if isinstance(fault.body, str) else fault.body
            headers = {"Content-Type": "text/plain; charset=utf-8", **fault.headers}
            return web.Response(status=status, body=raw, headers=headers)
        return _json_response(status, fault.body, fault.headers)

    # -- control API -----------------------------------------------------------------------------------

    async def _control_health(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, {"ok": True})

    async def _control_requests(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.query.get("endpoint")
        if endpoint is not None and not is_endpoint(endpoint):
            return _json_response(400, {"error": f"unknown endpoint {endpoint!r}"})
        return _json_response(200, {"requests": [r.to_json() for r in self.requests(endpoint)]})

    async def _control_counts(self, request: web.Request) -> web.StreamResponse:
        return _json_response(200, {e: self.count(e) for e in ENDPOINTS})

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json_response(200, {"ok": True})

    async def _control_faults(self, request: web.Request) -> web.StreamResponse:
        payload = _parse_json(await request.read())
        actions = payload if isinstance(payload, list) else [payload]
        try:
            for action in actions:
                self._apply(action)
        except (ValueError, TypeError, KeyError) as exc:
            return _json_response(400, {"error": str(exc)})
        return _json_response(200, {"ok": True})

    def _apply(self, action: Any) -> None:
        """One control action; see `FakeApiControl` for the forms."""
        if not isinstance(action, dict):
            raise ValueError("an action must be a JSON object")
        endpoint = action.get("endpoint")
        if endpoint is not None and not is_endpoint(endpoint):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        kind = action.get("action")
        if kind == "script":
            if endpoint is None:
                raise ValueError("script needs an endpoint")
            self.script(endpoint, [Fault.from_json(f) for f in action["faults"]])
        elif kind == "random":
            choices = [Fault.from_json(f) for f in action.get("choices", [{}])]
            self.set_random_faults(endpoint, float(action["rate"]), choices, action.get("seed"))
        elif kind == "reject_key":
            fault = Fault.from_json(action["fault"]) if "fault" in action else None
            self.reject_when(endpoint, contains_key(str(action["key"])), fault)
        elif kind == "down":
            mode = DownMode(action.get("mode", DownMode.STATUS))
            hold_s = float(action.get("hold_s", 1.0))
            self.set_down(endpoint, bool(action.get("down", True)), mode=mode, hold_s=hold_s)
        elif kind == "latency":
            self.set_latency(float(action["seconds"]))
        elif kind == "rate_limit":
            api = action.get("api")
            if api is not None and api not in APIS:
                raise ValueError(f"unknown api {api!r}")
            rate, capacity = action.get("rate"), action.get("capacity")
            self.set_rate_limit(
                api, None if rate is None else float(rate), None if capacity is None else float(capacity)
            )
        elif kind == "not_yet":
            self.set_not_yet(float(action["share"]), float(action["seconds"]), int(action.get("seed", 0)))
        elif kind == "keys":
            keys = {name: action.get(name) for name in APIS}
            for name, value in keys.items():
                if value is not None and not (
                    isinstance(value, str) or (isinstance(value, list) and all(isinstance(k, str) for k in value))
                ):
                    raise ValueError(f"{name} keys must be a string or a list of strings")
            self.set_keys(openlayer=keys["openlayer"], humanloop=keys["humanloop"])
        elif kind == "clear":
            self.clear_faults(endpoint)
        else:
            raise ValueError(f"unknown action {kind!r}")


def _finish(waiting: asyncio.Future[None]) -> None:
    """Let a latency wait go on; its timer and `end_delays` may both try, and the call may be cancelled."""
    if not waiting.done():
        waiting.set_result(None)


def _publish_problem(payload: dict[str, Any]) -> str | None:
    rows = payload.get("rows")
    if not isinstance(rows, list):
        return "rows is required and must be an array of objects"
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"rows[{index}] must be an object"
    if not isinstance(payload.get("config"), dict):
        return "config is required and must be an object"
    return None


def _update_row_problem(payload: dict[str, Any]) -> str | None:
    row = payload.get("row")
    if not isinstance(row, dict):
        return "row is required and must be an object"
    if not 1 <= len(row) <= MAX_ROW_KEYS:
        return f"row must have between 1 and {MAX_ROW_KEYS} properties, got {len(row)}"
    config = payload.get("config")
    if config is not None and not isinstance(config, dict):
        return "config must be an object or null"
    return None


def _update_log_problems(body: bytes, payload: Any) -> list[dict[str, Any]]:
    if payload is _UNPARSABLE:
        if not body:
            return [_error_item(("body",), "Field required", "missing")]
        return [_error_item(("body", 0), "JSON decode error", "json_invalid")]
    if not isinstance(payload, dict):
        return [
            _error_item(
                ("body",),
                "Input should be a valid dictionary or object to extract fields from",
                "model_attributes_type",
                payload,
            )
        ]
    errors = []
    for key, value in payload.items():
        loc = ("body", key)
        if key in ("output", "error"):
            if not isinstance(value, str):
                errors.append(_error_item(loc, "Input should be a valid string", "string_type", value))
        elif key == "duration":
            if isinstance(value, bool) or not isinstance(value, int | float):
                errors.append(_error_item(loc, "Input should be a valid number", "float_type", value))
        else:
            errors.append(_error_item(loc, "Extra inputs are not permitted", "extra_forbidden", value))
    return errors


class FakeApiControl:
    """Drives a `FakeApiServer` in another process through its control API.

    Action forms accepted by `apply` (and by POST /_control/faults, alone or in a list):
        {"action": "script", "endpoint": E, "faults": [F, ...]}
        {"action": "random", "endpoint": E|null, "rate": 0.3, "choices": [F, ...], "seed": 7}
        {"action": "reject_key", "endpoint": E|null, "key": "marker", "fault": F}   (fault optional: 422)
        {"action": "down", "endpoint": E|null, "down": true, "mode": "status"|"reset"|"hang", "hold_s": 1}
        {"action": "latency", "seconds": 0.05}
        {"action": "rate_limit", "api": "openlayer"|"humanloop"|null, "rate": 300, "capacity": 300}
            (rate 0 or null removes the limit; capacity optional, default the rate)
        {"action": "not_yet", "share": 0.3, "seconds": 20, "seed": 7}   (share 0 turns it off)
        {"action": "keys", "openlayer": "key" | ["k1", "k2"], "humanloop": ...}   (either optional; [] refuses all)
        {"action": "clear", "endpoint": E|null}
    where F is `Fault.to_json()`'s form, e.g. {"status": 503, "headers": {"Retry-After": "1"}}.
    """

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        """`base_url` is the server's root, e.g. "http://127.0.0.1:8099"."""
        self._client = httpx.Client(base_url=base_url.rstrip("/") + CONTROL_PREFIX, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def healthy(self) -> bool:
        try:
            return self._client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def apply(self, *actions: Mapping[str, Any]) -> None:
        response = self._client.post("/faults", content=orjson.dumps(list(actions)))
        response.raise_for_status()

    def script(self, endpoint: Endpoint, faults: Iterable[Fault]) -> None:
        self.apply({"action": "script", "endpoint": endpoint, "faults": [f.to_json() for f in faults]})

    def requests(self, endpoint: Endpoint | None = None) -> list[dict[str, Any]]:
        params = {"endpoint": endpoint} if endpoint is not None else {}
        response = self._client.get("/requests", params=params)
        response.raise_for_status()
        recorded: list[dict[str, Any]] = orjson.loads(response.content)["requests"]
        return recorded

    def counts(self) -> dict[str, int]:
        response = self._client.get("/counts")
        response.raise_for_status()
        counts: dict[str, int] = orjson.loads(response.content)
        return counts

    def reset(self) -> None:
        self._client.post("/reset").raise_for_status()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake as a process: print the base URLs as KEY=value lines, serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.fake_apis", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--openlayer-key", default="ol-test-key")
    parser.add_argument("--humanloop-key", default="hl-test-key")
    parser.add_argument("--pipeline", action="append", help="allow-listed pipeline id (repeatable)")
    parser.add_argument("--no-record", action="store_true", help="keep counts only (for benchmarks)")
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = FakeApiServer(
        openlayer_key=args.openlayer_key,
        humanloop_key=args.humanloop_key,
        port=args.port,
        host=args.host,
        pipelines=args.pipeline,
        record=not args.no_record,
    )
    with server:
        print(f"OPENLAYER_BASE_URL={server.openlayer_base_url}")
        print(f"HUMANLOOP_BASE_URL={server.humanloop_base_url}")
        print(f"FAKE_APIS_URL={server.base_url}", flush=True)
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
