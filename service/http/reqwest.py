"""`PyreqwestClient`: the `HttpClient` interface over pyreqwest (Rust: reqwest, hyper and rustls on Tokio).

Chosen with `BRIDGE_DELIVERY__HTTP_CLIENT=pyreqwest`. It behaves as `AiohttpClient` does (the tests in
tests/unit/http/test_client.py run the same cases over all three clients), with these differences:

- TLS uses rustls with the system's CA store, read when the client is built. `SSL_CERT_FILE` /
  `SSL_CERT_DIR` replace that store, as they do for httpx (aiohttp's OpenSSL still adds the system
  directory): a private CA goes in a bundle together with the public ones.
- HTTP/2 is offered by ALPN on TLS connections; plain `http://` stays HTTP/1.1, as with aiohttp.
- The path is sent exactly as given (service/apis/json.py `segment` has already percent-encoded it); aiohttp re-quotes
  it and decodes `%26`, `%3D` and the like, which servers read the same way.
- A send cancelled by the caller returns at once, but the exchange goes on in the Rust runtime
  until the answer arrives or its timeout passes: pyreqwest detaches the request rather than
  aborting it. So delivery's attempt timeout is passed in (`timeout_s`) and enforced by reqwest
  itself; only a stop or a revoke cancels a send, and then the connection is pooled again or
  closed, not leaked, and nothing is logged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Final

import pyreqwest.runtime
from pyreqwest.client import ClientBuilder
from pyreqwest.exceptions import (
    BodyDecodeError,
    ConnectError,
    NetworkError,
    PyreqwestError,
    RequestTimeoutError,
)
from pyreqwest.http import HeaderMap
from pyreqwest.response import ResponseBodyReader

from service.http.client import DEFAULT_MAX_BODY_BYTES, HttpResponse, LastTimeout, TransportFailure

RUNTIME_WORKER_THREADS: Final = 1
RUNTIME_BLOCKING_THREADS: Final = 4
"""Tokio's threads in this process: one worker, and at most four threads for blocking calls (DNS lookups).

pyreqwest's default runtime is single-threaded, but its blocking pool is Tokio's default of up to
512 threads, and reqwest resolves host names with a blocking `getaddrinfo` per new connection: 256
calls starting together on a cold pool made 42 threads, where aiohttp caches lookups and uses at
most its executor's few. Measured pinned to one core, the calls per CPU-second of one worker equal
the single-threaded runtime's, and more workers only add switching on a one-CPU pod.
"""

IDLE_CONNECTION_S: Final = 15.0
"""How long an idle pooled connection is kept: aiohttp's keep-alive, not reqwest's 90 s, which is longer than
many servers and load balancers keep one open, so a reused connection would more often be a closed one."""

_CONNECT_PHASE = "client error (Connect)"
"""hyper's message for a failure of its connector (TCP, DNS, proxy, TLS handshake): pyreqwest reports those and a
connection closed before the answer with the same `ConnectError`, which only this cause tells apart."""


def configure_runtime() -> None:
    """Bound the process's Tokio runtime (see `RUNTIME_WORKER_THREADS`); before the first client, and again is fine."""
    pyreqwest.runtime.runtime_worker_threads(RUNTIME_WORKER_THREADS)
    pyreqwest.runtime.runtime_max_blocking_threads(RUNTIME_BLOCKING_THREADS)


class PyreqwestClient:
    """One shared pyreqwest `Client`: pooled keep-alive connections, explicit timeouts, no redirects."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        configure_runtime()
        self._max_body_bytes = max_body_bytes
        self._timeouts = LastTimeout(lambda s: timedelta(seconds=s), timedelta(seconds=read_timeout_s))
        self._read_timeout_s = read_timeout_s
        self._client = (
            ClientBuilder()
            .runtime_multithreaded(True)
            .connect_timeout(timedelta(seconds=connect_timeout_s))
            .read_timeout(timedelta(seconds=read_timeout_s))
            # As AiohttpClient's `total`: the backstop against a peer that stops reading.
            .timeout(timedelta(seconds=connect_timeout_s + 2 * read_timeout_s))
            # No in-flight limit here: delivery's per-destination slots admit callers, and pyreqwest's
            # limit would count detached (cancelled) requests, stalling new ones behind them.
            .pool_max_idle_per_host(max_connections)
            .pool_idle_timeout(timedelta(seconds=IDLE_CONNECTION_S))
            # A redirect to another host would carry our API key along (see HttpxClient).
            .follow_redirects(False)
            .http2(True)
            # Our header names are already lower case; title-casing them is work for nothing.
            .http1_lower_case_headers()
            # Proxies come from HTTP(S)_PROXY / ALL_PROXY / NO_PROXY: reqwest reads them when built.
            .build()
        )

    async def send(
        self,
        method: str,
        url: str,
        params: tuple[tuple[str, str], ...],
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float | None = None,
    ) -> HttpResponse:
        try:
            request = self._client.request(method, url).headers(headers).body_bytes(body)
            if params:
                request = request.query(params)
            if timeout_s is not None:
                # Enforced in the runtime, so a timed-out exchange ends there too (see the module doc).
                request = request.timeout(self._timeouts.get(timeout_s))
            # Streamed, not consumed: a consumed request reads the whole body, whatever its size (its read
            # buffer limit is for streams only). About 1 us more per call, measured in the bench's raw loop.
            async with request.build_streamed() as response:
                status = response.status
                answer_headers = _headers(response.headers)
                content = await _capped(response.body_reader, self._max_body_bytes)
        except RequestTimeoutError as exc:  # connect, read and total timeouts alike
            raise TransportFailure("timeout", _no_answer(timeout_s, self._read_timeout_s)) from exc
        except ConnectError as exc:
            kind = "connect" if _in_connect_phase(exc) else "reset"
            raise TransportFailure(kind, _message(exc)) from exc
        except (NetworkError, BodyDecodeError) as exc:  # a body cut short is aiohttp's ClientPayloadError
            raise TransportFailure("reset", _message(exc)) from exc
        except PyreqwestError as exc:
            raise TransportFailure("protocol", _message(exc)) from exc
        return HttpResponse(status=status, headers=answer_headers, body=content)

    async def aclose(self) -> None:
        await self._client.close()


def _headers(headers: HeaderMap) -> dict[str, str]:
    """The answer's headers. reqwest's names are lower case; for a repeated name the last value wins, as in
    AiohttpClient. pyreqwest refuses to give a value that is not visible ASCII as text (ValueError: failed to
    convert header to a str), so one such header (a CDN's `X-Served-By: café`) made the whole answer unreadable, and
    the record was dead-lettered as an internal error: such values are left out, none of them is one delivery
    reads."""
    try:
        return dict(headers.items())
    except ValueError:
        readable = {}
        for name in headers:
            with contextlib.suppress(ValueError):
                readable[name] = headers.getall(name)[-1]
        return readable


async def _capped(reader: ResponseBodyReader, limit: int) -> bytes:
    """The first `limit` bytes of the body; what comes after is not read (the connection is closed)."""
    kept: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await reader.read(limit - size)
        if chunk is None:
            break
        kept.append(bytes(chunk))
        size += len(chunk)
    return b"".join(kept)


def _no_answer(timeout_s: float | None, read_timeout_s: float) -> str:
    """What a timeout says in logs. pyreqwest names every timeout `ConnectTimeoutError` ("connection timeout"),
    a response that never came included, which would send an operator looking at the network for a slow API."""
    if timeout_s is None:
        return f"no answer within the configured timeouts (read: {read_timeout_s:g} s)"
    return f"no answer within the attempt timeout ({timeout_s:g} s)"


def _in_connect_phase(exc: ConnectError) -> bool:
    return any(cause["message"] == _CONNECT_PHASE for cause in exc.details.get("causes") or ())


def _message(exc: PyreqwestError) -> str:
    """The innermost cause says what happened ("Connection refused (os error 111)"); the outer ones say where."""
    details = getattr(exc, "details", None) or {}
    causes = details.get("causes") or ()
    return str(causes[-1]["message"]) if causes else exc.message
