"""The probes' answers (`HealthState` on a manual clock) and the operations port over a real socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from service.ops.health import MAX_HEADER_LINES, MAX_LINE_BYTES, HealthState, OpsServer
from service.ops.metrics import Metrics


class ManualClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def joined_state(clock: ManualClock, stale_after_s: float = 30.0) -> HealthState:
    state = HealthState(stale_after_s=stale_after_s, clock=clock)
    state.mark_joined()
    return state


def test_a_fresh_heartbeat_is_live_and_a_silent_loop_is_not() -> None:
    clock = ManualClock()
    state = HealthState(stale_after_s=30.0, clock=clock)
    assert state.live() == (True, "ok")

    clock.now += 30.0
    assert state.live() == (True, "ok"), "exactly the stale age is still live"
    clock.now += 1.0
    assert state.live() == (False, "consumer loop silent for 31s")

    state.heartbeat()
    assert state.live() == (True, "ok")


def test_a_fatal_error_is_not_live_however_fresh_the_heartbeat() -> None:
    clock = ManualClock()
    state = joined_state(clock)
    state.mark_fatal("the dead-letter topic refused the record")
    state.heartbeat()

    assert state.live() == (False, "fatal: the dead-letter topic refused the record")
    assert state.ready() == (False, "fatal: the dead-letter topic refused the record")


def test_ready_only_between_joining_the_group_and_stopping() -> None:
    clock = ManualClock()
    state = HealthState(stale_after_s=30.0, clock=clock)
    assert state.ready() == (False, "not yet joined the consumer group")

    state.mark_joined()
    assert state.ready() == (True, "ok")

    state.mark_stopping()
    assert state.ready() == (False, "stopping")
    assert state.live() == (True, "ok"), "a stopping member is still alive while it drains"


def test_a_silent_loop_is_not_ready_either() -> None:
    clock = ManualClock()
    state = joined_state(clock)
    clock.now += 31.0
    assert state.ready() == (False, "consumer loop silent for 31s")


# --- the operations port --------------------------------------------------------------------------------------------


class Answer:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {name.lower(): value.strip() for name, value in (h.split(":", 1) for h in header_lines)}


async def ask(port: int, request: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection after each answer
    writer.close()
    await writer.wait_closed()
    return Answer(raw)


async def get(port: int, path: str) -> Answer:
    return await ask(port, f"GET {path} HTTP/1.1\r\nHost: probe\r\nUser-Agent: kubelet\r\n\r\n".encode())


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def state(clock: ManualClock) -> HealthState:
    return HealthState(stale_after_s=30.0, clock=clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def port(state: HealthState, metrics: Metrics) -> AsyncIterator[int]:
    server = OpsServer(state, metrics, "127.0.0.1", 0)
    await server.start()
    yield server.port
    await server.stop()


async def test_livez_and_readyz_answer_200_or_503_with_the_reason(port: int, state: HealthState) -> None:
    live, ready = await get(port, "/livez"), await get(port, "/readyz")
    assert (live.status, live.body) == (200, b"ok\n")
    assert (ready.status, ready.body) == (503, b"not yet joined the consumer group\n")

    state.mark_joined()
    ready = await get(port, "/readyz")
    assert (ready.status, ready.body) == (200, b"ok\n")

    state.mark_fatal("boom")
    live = await get(port, "/livez")
    assert (live.status, live.body) == (503, b"fatal: boom\n")


async def test_an_answer_has_its_length_and_closes_the_connection(port: int) -> None:
    answer = await get(port, "/livez")
    assert answer.headers["content-length"] == str(len(answer.body))
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "text/plain"


async def test_metrics_are_the_registry_in_prometheus_text_format(port: int, metrics: Metrics) -> None:
    metrics.consumed.labels("inferences").inc(3)

    answer = await get(port, "/metrics")

    assert answer.status == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b'bridge_records_consumed_total{topic="inferences"} 3.0\n' in answer.body


async def test_a_query_string_is_ignored_and_an_unknown_path_is_404(port: int) -> None:
    assert (await get(port, "/livez?verbose=1")).status == 200
    missing = await get(port, "/healthz")
    assert (missing.status, missing.body) == (404, b"not found\n")


@pytest.mark.parametrize("request_line", [b"POST /livez HTTP/1.1", b"garbage"])
async def test_anything_but_get_or_head_is_405(port: int, request_line: bytes) -> None:
    answer = await ask(port, request_line + b"\r\n\r\n")
    assert (answer.status, answer.body) == (405, b"only GET\n")


async def test_head_is_answered_like_get(port: int) -> None:
    answer = await ask(port, b"HEAD /livez HTTP/1.1\r\n\r\n")
    assert answer.status == 200


async def test_a_client_that_hangs_up_early_does_not_break_the_port(port: int) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /livez HTTP/1.1\r\n")  # and never the blank line
    writer.close()
    await writer.wait_closed()

    assert (await get(port, "/livez")).status == 200


async def test_a_stopped_port_refuses_connections(state: HealthState, metrics: Metrics) -> None:
    server = OpsServer(state, metrics, "127.0.0.1", 0)
    await server.start()
    port = server.port
    await server.stop()

    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# --- requests too large to read ---------------------------------------------------------------------------------


async def handlers_done() -> None:
    """Wait for the port's connection handlers to end: asyncio reports a handler that raised only once it has ended
    (its done callback runs before gather's, so the report, if any, is in the log when this returns)."""
    handlers = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "OpsServer._handle"]
    await asyncio.gather(*handlers, return_exceptions=True)


@pytest.mark.parametrize(
    ("request_bytes", "status", "body"),
    [
        pytest.param(
            b"GET /" + b"a" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n", 414, b"request line too long\n", id="request-line"
        ),
        pytest.param(b"GET /" + b"a" * (2 * MAX_LINE_BYTES), 414, b"request line too long\n", id="no-line-end"),
        pytest.param(
            b"GET /livez HTTP/1.1\r\nCookie: " + b"c" * MAX_LINE_BYTES + b"\r\n\r\n",
            431,
            b"headers too large\n",
            id="header-line",
        ),
        pytest.param(
            b"GET /livez HTTP/1.1\r\n" + b"X-Filler: x\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n",
            431,
            b"headers too large\n",
            id="too-many-headers",
        ),
    ],
)
async def test_a_request_too_large_is_refused_and_logged_at_debug_only(
    port: int, caplog: pytest.LogCaptureFixture, request_bytes: bytes, status: int, body: bytes
) -> None:
    caplog.set_level(logging.DEBUG)

    answer = await ask(port, request_bytes)
    await handlers_done()

    assert (answer.status, answer.body) == (status, body)
    assert answer.headers["connection"] == "close"
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.INFO] == []
    assert (await get(port, "/livez")).status == 200, "the port still answers"


async def test_a_request_with_the_most_header_lines_allowed_is_answered(port: int) -> None:
    request = b"GET /livez HTTP/1.1\r\n" + b"X-Filler: x\r\n" * MAX_HEADER_LINES + b"\r\n"

    assert (await ask(port, request)).status == 200
