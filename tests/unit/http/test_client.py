"""The `HttpClient` implementations against a real HTTP server on 127.0.0.1, the same cases over each one.

`PyreqwestClient` must behave as `AiohttpClient` does, so every case runs over all three clients unless
a comment says why not. The server (`Wire`) is a bare asyncio server scripted by the first path
segment, so it can also misbehave: stall, reset, close early, answer garbage. Everything runs on
uvloop, the service's default loop (service/ops/runtime.py); cancellation runs on both loops.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import os
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import h2.config
import h2.connection
import h2.events
import pytest

from service.http.client import (
    AiohttpClient,
    HttpClient,
    HttpClientKind,
    HttpxClient,
    LastTimeout,
    TransportFailure,
    build_http_client,
)
from service.http.reqwest import RUNTIME_BLOCKING_THREADS, RUNTIME_WORKER_THREADS, PyreqwestClient
from service.ops.runtime import event_loop_factory
from tests.support.tls import TlsFiles, generate_tls

CLIENTS: tuple[HttpClientKind, ...] = ("aiohttp", "httpx", "pyreqwest")
HEADERS = {"content-type": "application/json", "accept": "application/json", "authorization": "Bearer k-1"}
READ_TIMEOUT_S = 0.5
T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]], loop: str = "uvloop") -> T:
    with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]


def client(
    kind: HttpClientKind, *, connect_timeout_s: float = 1.0, max_connections: int = 16, max_body_bytes: int = 65536
) -> HttpClient:
    return build_http_client(
        kind,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=READ_TIMEOUT_S,
        max_connections=max_connections,
        max_body_bytes=max_body_bytes,
    )


@dataclass(slots=True)
class Received:
    method: str
    target: str
    """The request target exactly as it arrived: path and query, or the absolute URL a proxy gets."""
    headers: dict[str, str]
    body: bytes
    connection: int

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.target).query, keep_blank_values=True)


@dataclass(slots=True)
class Wire:
    """An HTTP/1.1 server on 127.0.0.1 whose answer is chosen by the first path segment (see `_answer`)."""

    tls: ssl.SSLContext | None = None
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    closed: list[float] = field(default_factory=list)
    """When each connection was closed (by the client, or by a scripted answer)."""
    url: str = ""
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _any_closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Wire:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(writer)
        connection = self.connections
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ")
                headers = dict(line.split(": ", 1) for line in head[1:] if line)
                headers = {name.lower(): value for name, value in headers.items()}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append(Received(method, target, headers, body, connection))
                if not await self._answer(urlsplit(target).path.split("/")[1], reader, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.append(time.monotonic())
            self._any_closed.set()
            self._open.discard(writer)
            writer.close()

    async def a_connection_closed(self, within_s: float) -> None:
        await asyncio.wait_for(self._any_closed.wait(), within_s)

    async def every_connection_closed(self, within_s: float) -> None:
        """Until every connection a client opened was closed (the client hung up, or a scripted answer did)."""

        async def wait() -> None:
            while len(self.closed) < self.connections:
                self._any_closed.clear()
                await self._any_closed.wait()

        await asyncio.wait_for(wait(), within_s)

    async def _answer(self, script: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to end."""
        if script == "answer":  # /answer/<status>
            status = int(self.requests[-1].path.split("/")[2])
            body = b'{"error":"x"}'
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nX-Request-Id: req-7\r\n"
                f"Retry-After: 7\r\nX-Mixed-Case: Yes\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        elif script == "odd-headers":  # /odd-headers/<status>: values that are not ASCII, a repeated Retry-After
            status = int(self.requests[-1].path.split("/")[2])
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nX-Served-By: caf\u00e9\r\n".encode()
                + b"Content-Type: text/plain; charset=\xe9\r\nX-Request-Id: req-7\r\n"
                + b"Retry-After: 7\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\n{}"
            )
        elif script == "big":  # /big/<bytes>, with a length, or chunked when the path ends in /chunked
            size = int(self.requests[-1].path.split("/")[2])
            body = bytes(range(256)) * (size // 256)
            if self.requests[-1].path.endswith("/chunked"):
                writer.write(b"HTTP/1.1 422 Whatever\r\nTransfer-Encoding: chunked\r\n\r\n")
                for start in range(0, len(body), 65536):
                    piece = body[start : start + 65536]
                    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(f"HTTP/1.1 422 Whatever\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        elif script == "gzip":  # a small answer that inflates to 50 MB
            packed = gzip.compress(b"\0" * 50_000_000)
            writer.write(
                b"HTTP/1.1 422 Whatever\r\nContent-Encoding: gzip\r\n"
                + f"Content-Length: {len(packed)}\r\n\r\n".encode()
                + packed
            )
        elif script == "trickle":  # a byte every 0.1 s, for ever: each wait for bytes is short
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        elif script == "redirect":
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: /answer/200\r\nContent-Length: 0\r\n\r\n")
        elif script in ("stall", "stall-body"):  # no answer (or half a body) until the client hangs up
            if script == "stall-body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await reader.read()
            return False
        elif script == "late":  # the answer, after the caller gave up
            await asyncio.sleep(0.3)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        elif script == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif script == "close":
            return False
        elif script == "partial":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            await writer.drain()
            return False
        elif script == "garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
            return False
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        return True


async def failure(http: HttpClient, url: str) -> TransportFailure:
    with pytest.raises(TransportFailure) as caught:
        await http.send("PUT", url, (), HEADERS, b"{}")
    return caught.value


@pytest.mark.parametrize("kind", CLIENTS)
def test_any_status_is_an_answer_with_lower_case_headers_and_the_body(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                for status in (200, 201, 400, 404, 409, 429, 500, 503):
                    response = await http.send("PATCH", f"{wire.url}/answer/{status}", (), HEADERS, b'{"a":1}')
                    assert response.status == status
                    assert response.headers["retry-after"] == "7"
                    assert response.headers["x-request-id"] == "req-7"
                    assert response.headers["x-mixed-case"] == "Yes"
                    assert response.headers["content-type"] == "application/json"
                    assert response.body == b'{"error":"x"}'
            finally:
                await http.aclose()
            request = wire.requests[0]
            assert request.method == "PATCH"
            assert request.body == b'{"a":1}'
            assert {k: request.headers[k] for k in HEADERS} == HEADERS

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_redirect_is_returned_not_followed(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                response = await http.send("PUT", f"{wire.url}/redirect", (), HEADERS, b"{}")
            finally:
                await http.aclose()
            assert (response.status, response.headers["location"]) == (302, "/answer/200")
            assert [r.path for r in wire.requests] == ["/redirect"]

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("status", [200, 503])
def test_header_values_that_are_not_ascii_leave_the_answer_readable(kind: HttpClientKind, status: int) -> None:
    """pyreqwest refused to give such a value as text, so the whole answer raised (an accepted record was
    dead-lettered as an internal error); aiohttp kept the bytes as lone surrogates, which a dead letter's headers
    could not be written with; httpx joined a repeated Retry-After into "7, 7", which reads as no Retry-After."""

    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                response = await http.send("PUT", f"{wire.url}/odd-headers/{status}", (), HEADERS, b"{}")
            finally:
                await http.aclose()
            assert (response.status, response.body) == (status, b"{}")
            assert response.headers["retry-after"] == "7"
            assert response.headers["x-request-id"] == "req-7"
            for value in response.headers.values():
                value.encode()  # no lone surrogates: a dead letter's headers are written as UTF-8

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_is_kept_up_to_the_limit_and_the_client_goes_on(kind: HttpClientKind, framing: str) -> None:
    """Delivery keeps only the start of a body (a dead letter's evidence): a 300 MB answer was read whole."""

    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind, max_body_bytes=1000)
            try:
                path = "/big/4000000" + ("/chunked" if framing == "chunked" else "")
                response = await http.send("PUT", f"{wire.url}{path}", (), HEADERS, b"{}")
                assert response.status == 422
                assert response.body == (bytes(range(256)) * 4)[:1000]
                assert (await http.send("PUT", f"{wire.url}/answer/200", (), HEADERS, b"{}")).status == 200
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_compressed_body_is_kept_up_to_the_limit(kind: HttpClientKind) -> None:
    """A small gzip answer inflates to 50 MB in the clients that inflate (aiohttp, httpx); pyreqwest, which asks
    for no encoding, keeps its bytes as they came. Either way no more than the limit is kept."""

    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind, max_body_bytes=1000)
            try:
                response = await http.send("PUT", f"{wire.url}/gzip", (), HEADERS, b"{}")
            finally:
                await http.aclose()
            assert response.status == 422
            assert 0 < len(response.body) <= 1000

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("attempt_timeout_s", [0.3, None])
def test_an_answer_that_trickles_is_cut_as_a_whole(kind: HttpClientKind, attempt_timeout_s: float | None) -> None:
    """A byte every 0.1 s never trips a read timeout of 0.5 s: the attempt timeout, or else the configured
    connect and read timeouts (the backstop, 1 + 2 x 0.5 s here), bound the whole call. httpx ran for ever."""

    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                with pytest.raises(TransportFailure) as caught:
                    async with asyncio.timeout(30):  # a hang guard, far above both bounds
                        await http.send("PUT", f"{wire.url}/trickle", (), HEADERS, b"{}", attempt_timeout_s)
            finally:
                await http.aclose()
            assert caught.value.kind == "timeout"

    run(scenario)


RESERVED_ID = "pipe/../admin?x=1#frag %é&a=b+c;~*'()"


def _segment(value: str) -> str:
    """A path segment encoded as service/apis/json.py `segment` encodes ids: every reserved character escaped."""
    return quote(value, safe="")


@pytest.mark.parametrize("kind", CLIENTS)
def test_path_segment_and_query_values_arrive_as_one_segment_and_the_same_values(kind: HttpClientKind) -> None:
    params = (("inferenceId", RESERVED_ID), ("inferenceId", ""), ("b", "x y+z"))

    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            path = f"/rows/{_segment(RESERVED_ID)}/tail"
            try:
                await http.send("PUT", wire.url + path, params, HEADERS, b"{}")
                await http.send("PUT", wire.url + "/rows/plain", (), HEADERS, b"{}")
            finally:
                await http.aclose()
            with_query, without = wire.requests
            segment = with_query.path.removeprefix("/rows/").removesuffix("/tail")
            assert not set(segment) & set("/?# ")
            assert unquote(segment) == RESERVED_ID
            if kind != "aiohttp":  # aiohttp re-quotes the path (decoding %26, %3D, ...): the same path to a server
                assert with_query.path == path
            assert with_query.query == list(params)  # order, repeats and empty values kept
            assert without.target == "/rows/plain"  # no stray "?"

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("script", ["stall", "stall-body"])
def test_no_answer_within_the_read_timeout_is_a_timeout(kind: HttpClientKind, script: str) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                timed_out = await failure(http, f"{wire.url}/{script}")
            finally:
                await http.aclose()
            assert timed_out.kind == "timeout"
            # The connection was made: the message, which the delivery log prints, must not blame connecting.
            assert "connect" not in str(timed_out).lower(), str(timed_out)

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_refused_connection_is_connect(kind: HttpClientKind) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed

    async def scenario() -> None:
        http = client(kind)
        try:
            assert (await failure(http, f"http://127.0.0.1:{port}/rows")).kind == "connect"
        finally:
            await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_connect_that_hangs_is_a_timeout(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        with socket.socket() as full:
            # A listener that never accepts, its queue (of one) filled: Linux drops further SYNs, so connects hang.
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            filler = socket.create_connection(full.getsockname(), timeout=1)
            http = client(kind, connect_timeout_s=0.3)
            try:
                assert (await failure(http, f"http://127.0.0.1:{full.getsockname()[1]}/rows")).kind == "timeout"
            finally:
                await http.aclose()
                filler.close()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
@pytest.mark.parametrize("script", ["reset", "close", "partial"])
def test_a_connection_lost_before_the_whole_answer_is_reset(kind: HttpClientKind, script: str) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                assert (await failure(http, f"{wire.url}/{script}")).kind == "reset"
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", ["aiohttp", "pyreqwest"])  # httpx calls it "reset" (RemoteProtocolError)
def test_an_answer_that_is_not_http_is_protocol(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind)
            try:
                assert (await failure(http, f"{wire.url}/garbage")).kind == "protocol"
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_connections_are_kept_alive_and_reused(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = client(kind, max_connections=8)
            try:
                for _ in range(10):
                    assert (await http.send("PUT", f"{wire.url}/rows", (), HEADERS, b"{}")).status == 200
                assert wire.connections == 1
                for _ in range(3):
                    calls = [http.send("PUT", f"{wire.url}/rows", (), HEADERS, b"{}") for _ in range(8)]
                    assert {r.status for r in await asyncio.gather(*calls)} == {200}
                assert wire.connections <= 8  # three rounds of 8 concurrent calls, on at most 8 connections
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("kind", CLIENTS)
def test_a_cancelled_send_returns_at_once_leaks_nothing_and_logs_nothing(
    kind: HttpClientKind, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Delivery cuts every attempt with `asyncio.timeout` (service/http/delivery.py), which cancels the send.
    async def scenario() -> None:
        problems: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: problems.append(context))
        async with Wire() as wire:
            http = client(kind, max_connections=4)
            try:
                for script in ("stall", "late"):
                    # The answer never comes ("stall") or comes after the cut ("late"): returning at all shows
                    # the send gave way to the cancellation.
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await http.send("PUT", f"{wire.url}/{script}", (), HEADERS, b"{}")
                # The client is still whole: more calls than its pool holds all get their answer.
                calls = [http.send("PUT", f"{wire.url}/rows", (), HEADERS, b"{}") for _ in range(8)]
                assert {r.status for r in await asyncio.gather(*calls)} == {200}
                # The stalled exchange ends by the read timeout at the latest (aiohttp ends it at once;
                # pyreqwest lets it run on in its runtime, see service/http/reqwest.py).
                await wire.a_connection_closed(within_s=READ_TIMEOUT_S + 1.0)
            finally:
                await http.aclose()
            # pyreqwest closes its pooled connections when the client is collected, not at aclose.
            del http
            gc.collect()
            await wire.every_connection_closed(within_s=5.0)  # nothing of the client is left to leak
        gc.collect()
        await asyncio.sleep(0)
        assert problems == []

    with caplog.at_level("DEBUG"):
        run(scenario, loop)
    assert [r for r in caplog.records if r.levelname in ("WARNING", "ERROR", "CRITICAL")] == []


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return generate_tls(tmp_path_factory.mktemp("tls"))


def server_tls(files: TlsFiles, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.broker_cert, files.broker_keystore)
    context.set_alpn_protocols(alpn)
    return context


@pytest.fixture
def trusted_ca(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.ca_cert))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return tls_files.ca_cert


# aiohttp builds its verifying TLS context once, when imported, so SSL_CERT_FILE cannot be switched for
# it inside this process; it reads the variable the same way at start-up.
@pytest.mark.parametrize("kind", ["httpx", "pyreqwest"])
@pytest.mark.usefixtures("trusted_ca")
def test_tls_trusts_the_ca_bundle_named_by_ssl_cert_file(kind: HttpClientKind, tls_files: TlsFiles) -> None:
    async def scenario() -> None:
        async with Wire(tls=server_tls(tls_files, ["http/1.1"])) as wire:
            http = client(kind)
            try:
                assert (await http.send("PUT", f"{wire.url}/rows", (), HEADERS, b"{}")).status == 200
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_tls_refuses_a_server_signed_by_an_unknown_ca(
    kind: HttpClientKind, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files.other_ca_cert))

    async def scenario() -> None:
        async with Wire(tls=server_tls(tls_files, ["http/1.1"])) as wire:
            http = client(kind)
            try:
                assert (await failure(http, f"{wire.url}/rows")).kind == "connect"
            finally:
                await http.aclose()
            assert wire.requests == []

    run(scenario)


class H2Server:
    """A minimal HTTP/2 server (TLS, ALPN h2 only) answering every stream 200 with headers and a body."""

    def __init__(self, files: TlsFiles) -> None:
        self._tls = server_tls(files, ["h2"])
        self.protocols: list[str | None] = []
        self.requests: list[dict[str, str]] = []
        self.url = ""
        self._open: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> H2Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.url = f"https://localhost:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._open:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        self.protocols.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        writer.write(h2c.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        while data := await reader.read(65536):
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    heads[event.stream_id] = {
                        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                        for k, v in event.headers
                    }
                elif isinstance(event, h2.events.DataReceived):
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests.append(heads.pop(event.stream_id))
                    body = b'{"ok":true}'
                    h2c.send_headers(
                        event.stream_id,
                        [(":status", "429"), ("retry-after", "3"), ("content-length", str(len(body)))],
                    )
                    h2c.send_data(event.stream_id, body, end_stream=True)
            writer.write(h2c.data_to_send())
            await writer.drain()


# aiohttp has no HTTP/2, and HttpxClient does not enable it (it would need the h2 package at run time).
@pytest.mark.usefixtures("trusted_ca")
def test_pyreqwest_speaks_http2_when_the_server_offers_it(tls_files: TlsFiles) -> None:
    async def scenario() -> None:
        async with H2Server(tls_files) as server:
            http = client("pyreqwest")
            url = f"{server.url}/rows/{_segment(RESERVED_ID)}"
            try:
                # The first call learns (by ALPN) that the server speaks HTTP/2; until then concurrent
                # calls may each open a connection.
                first = await http.send("PUT", url, (("id", "a b"),), HEADERS, b"{}")
                responses = await asyncio.gather(
                    *(http.send("PUT", url, (("id", "a b"),), HEADERS, b"{}") for _ in range(5))
                )
            finally:
                await http.aclose()
            assert {(r.status, r.headers["retry-after"], r.body) for r in [first, *responses]} == {
                (429, "3", b'{"ok":true}')
            }
            assert server.protocols == ["h2"]  # then five concurrent calls on the one multiplexed connection
            assert {r[":path"] for r in server.requests} == {f"/rows/{_segment(RESERVED_ID)}?id=a+b"}
            assert {r["authorization"] for r in server.requests} == {HEADERS["authorization"]}

    run(scenario)


@pytest.fixture
def proxy_environment(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], None]:
    def set_proxy(proxy: str, no_proxy: str) -> None:
        for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", no_proxy)

    return set_proxy


@pytest.mark.parametrize("kind", CLIENTS)
def test_the_proxy_named_by_the_environment_is_used_except_for_no_proxy_hosts(
    kind: HttpClientKind, proxy_environment: Callable[[str, str], None]
) -> None:
    async def scenario() -> None:
        async with Wire() as proxy, Wire() as direct:
            # The API's host name is never resolved: only the proxy (on 127.0.0.1) is connected to.
            proxy_environment(proxy.url, f"localhost,{urlsplit(direct.url).hostname}")
            http = client(kind)
            try:
                via = await http.send("PUT", "http://api.example.invalid/v1/rows", (("id", "1"),), HEADERS, b"{}")
                straight = await http.send("PUT", f"{direct.url}/rows", (), HEADERS, b"{}")
            finally:
                await http.aclose()
            assert via.status == straight.status == 200
            assert [r.target for r in proxy.requests] == ["http://api.example.invalid/v1/rows?id=1"]
            assert [r.target for r in direct.requests] == ["/rows"]

    run(scenario)


def test_pyreqwest_keeps_its_runtime_threads_bounded_on_a_cold_burst() -> None:
    # Every new connection resolves its host name on one of the runtime's blocking threads
    # (service/http/reqwest.py): a burst of new connections must not become a burst of threads.
    async def scenario() -> int:
        async with Wire() as wire:
            http = client("pyreqwest", max_connections=64)
            url = wire.url.replace("127.0.0.1", "localhost") + "/rows"
            peak = 0
            try:
                calls = asyncio.gather(*(http.send("PUT", url, (), HEADERS, b"{}") for _ in range(64)))
                while not calls.done():
                    peak = max(peak, _runtime_threads())
                    await asyncio.sleep(0.001)
                assert {r.status for r in calls.result()} == {200}
            finally:
                await http.aclose()
            assert wire.connections > 1
            return peak

    peak = run(scenario)
    # One thread owns the runtime, plus its workers and its blocking pool at most.
    assert 1 <= peak <= 1 + RUNTIME_WORKER_THREADS + RUNTIME_BLOCKING_THREADS


def _runtime_threads() -> int:
    """The process's threads that Tokio started (named "pyreqwest..."); Python's `threading` does not see them."""
    names = (Path(f"/proc/self/task/{tid}/comm").read_text() for tid in os.listdir("/proc/self/task"))
    return sum(1 for name in names if name.startswith("pyreqwest"))


# --- the attempt timeout and the factory -----------------------------------------------------------------------------


def patient(kind: HttpClientKind) -> HttpClient:
    """A client whose configured timeouts (30 s to read, 61 s in all) outlast every guard in these tests."""
    return build_http_client(kind, connect_timeout_s=1.0, read_timeout_s=30.0, max_connections=4)


@pytest.mark.parametrize("kind", CLIENTS)
def test_the_attempt_timeout_cuts_a_call_the_configured_timeouts_would_let_run(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = patient(kind)
            try:
                with pytest.raises(TransportFailure) as caught:
                    # The guard is a sixth of the read timeout: only the attempt timeout can end the call before it.
                    await asyncio.wait_for(http.send("PUT", f"{wire.url}/stall", (), HEADERS, b"{}", 0.2), 5)
                assert caught.value.kind == "timeout"
                assert "connect" not in str(caught.value).lower(), str(caught.value)
            finally:
                await http.aclose()

    run(scenario)


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_call_without_an_attempt_timeout_has_the_configured_ones_again(kind: HttpClientKind) -> None:
    async def scenario() -> None:
        async with Wire() as wire:
            http = patient(kind)
            try:
                with pytest.raises(TransportFailure):
                    await http.send("PUT", f"{wire.url}/late", (), HEADERS, b"{}", 0.1)
                # The same late answer, without an attempt timeout: the 30 s read timeout, not the 0.1 s of before.
                response = await asyncio.wait_for(http.send("PUT", f"{wire.url}/late", (), HEADERS, b"{}"), 5)
                assert response.status == 200
            finally:
                await http.aclose()

    run(scenario)


def test_last_timeout_builds_once_per_new_value_and_gives_the_default_for_none() -> None:
    built: list[float] = []

    def build(seconds: float) -> str:
        built.append(seconds)
        return f"{seconds}s"

    timeouts = LastTimeout(build, "configured")

    assert [timeouts.get(s) for s in (None, 1.5, 1.5, None, 1.5, 2.0, 1.5)] == [
        "configured",
        "1.5s",
        "1.5s",
        "configured",
        "1.5s",
        "2.0s",
        "1.5s",
    ]
    assert built == [1.5, 2.0, 1.5], "one entry: the last value asked"


@pytest.mark.parametrize(
    ("kind", "expected"), [("aiohttp", AiohttpClient), ("httpx", HttpxClient), ("pyreqwest", PyreqwestClient)]
)
def test_the_factory_builds_the_client_named(kind: HttpClientKind, expected: type[Any]) -> None:
    async def scenario() -> None:
        http = patient(kind)
        try:
            assert type(http) is expected
        finally:
            await http.aclose()

    run(scenario)


def test_the_factory_refuses_an_unknown_client() -> None:
    with pytest.raises(ValueError, match="unknown HTTP client 'curl'"):
        build_http_client("curl", connect_timeout_s=1.0, read_timeout_s=1.0, max_connections=1)  # type: ignore[arg-type]
