"""The HTTP client behind one small interface, so the transport can be chosen by measurement.

Delivery sees only `HttpClient.send` and its two outcomes: an `HttpResponse` (any status) or a
`TransportFailure` (no usable response: connect error, timeout, reset). Each library's exception zoo
is converted here and nowhere else (pyreqwest's in service/http/reqwest.py). Three implementations:
`PyreqwestClient` (the default, the fastest per core in `make bench`), `AiohttpClient` and `HttpxClient`.
`build_http_client` picks one by name.

Each keeps at most `max_body_bytes` of a response body (delivery keeps only the start of one, as a dead letter's
evidence); the rest is not read and its connection is closed. A 300 MB answer, or a small gzip one that inflates to
it, was read whole: hundreds of MB for one call, with up to a thousand calls in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, Literal, Protocol, TypeVar
from urllib.request import getproxies_environment

import aiohttp
import httpx

T = TypeVar("T")

HttpClientKind = Literal["aiohttp", "httpx", "pyreqwest"]

DEFAULT_MAX_BODY_BYTES: Final = 128 * 1024
"""More than delivery ever keeps of a body (`evidence_body_bytes`, at most 64 KiB, and the redaction margin of
service/core/errors.py); the service passes what it keeps."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    """Header names in lower case."""
    body: bytes


class TransportFailure(Exception):
    """No response arrived. `kind` is connect, timeout, reset or protocol."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class HttpClient(Protocol):
    async def send(
        self,
        method: str,
        url: str,
        params: tuple[tuple[str, str], ...],
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float | None = None,
    ) -> HttpResponse:
        """One attempt; `timeout_s` bounds it whole (delivery's attempt timeout), else the configured timeouts do.

        The client enforces it rather than the caller cancelling the call: a cancelled pyreqwest
        exchange would go on in its runtime (service/http/reqwest.py), and this costs no timer task.
        """
        ...

    async def aclose(self) -> None: ...


class LastTimeout(Generic[T]):
    """The client's timeout object for an attempt timeout, kept for the last value asked.

    Delivery's attempt timeout changes only every few dozen calls (service/http/timeouts.py), so one
    entry saves building an object per call without a cache that grows with every value seen.
    """

    def __init__(self, build: Callable[[float], T], default: T) -> None:
        self._build = build
        self._default = default
        self._seconds: float | None = None
        self._value = default

    def get(self, seconds: float | None) -> T:
        if seconds is None:
            return self._default
        if seconds != self._seconds:
            self._seconds, self._value = seconds, self._build(seconds)
        return self._value


class HttpxClient:
    """One shared `httpx.AsyncClient` with bounded connections and explicit timeouts.

    `transport` replaces the connection pool (tests use httpx's MockTransport as the wire).
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        # httpx times each wait for bytes, not the whole call: a server that trickles a byte now and then would
        # hold a call for ever. The whole attempt is bounded as AiohttpClient's `total` bounds it.
        self._whole_s = connect_timeout_s + 2 * read_timeout_s
        # No pool timeout: callers are admitted by delivery's per-destination limit.
        default = httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None)
        self._timeouts = LastTimeout(lambda s: httpx.Timeout(s, connect=min(s, connect_timeout_s), pool=None), default)
        self._client = httpx.AsyncClient(
            timeout=default,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # A redirect to another host would carry our API key along; the documented endpoints
            # never redirect, so treat one as an answer to classify, not a hop to follow.
            follow_redirects=False,
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
        # httpx times each phase, not the whole: the attempt timeout bounds each wait for bytes, and the whole.
        timeout = self._timeouts.get(timeout_s)
        try:
            async with asyncio.timeout(timeout_s if timeout_s is not None else self._whole_s):
                request = self._client.build_request(
                    method, url, params=params, headers=headers, content=body, timeout=timeout
                )
                response = await self._client.send(request, stream=True)
                try:
                    content = await _capped(response.aiter_bytes(), self._max_body_bytes)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise TransportFailure("timeout", "no answer within the attempt") from exc
        except httpx.TimeoutException as exc:
            raise TransportFailure("timeout", type(exc).__name__) from exc
        except httpx.ConnectError as exc:
            raise TransportFailure("connect", str(exc) or type(exc).__name__) from exc
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            raise TransportFailure("reset", str(exc) or type(exc).__name__) from exc
        except httpx.HTTPError as exc:
            raise TransportFailure("protocol", str(exc) or type(exc).__name__) from exc
        # httpx joins a repeated header with ", " ("7, 7" for a Retry-After sent twice); the last one wins, as in
        # the other clients.
        return HttpResponse(status=response.status_code, headers=dict(response.headers.multi_items()), body=content)

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpClient:
    """One shared `aiohttp.ClientSession` with bounded connections and explicit timeouts.

    Construct it inside the running event loop (aiohttp binds the session to it).
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        # `connect` would include waiting for a pooled connection; callers are admitted by
        # delivery's per-destination slots, so only the socket connect itself is timed. aiohttp
        # has no write timeout: `total` is the backstop against a peer that stops reading.
        configured = aiohttp.ClientTimeout(
            total=connect_timeout_s + 2 * read_timeout_s,
            connect=None,
            sock_connect=connect_timeout_s,
            sock_read=read_timeout_s,
        )
        # The default is the configured object itself: aiohttp reads `timeout=None` as "no timeout".
        self._timeouts = LastTimeout(
            lambda s: aiohttp.ClientTimeout(total=s, connect=None, sock_connect=min(s, connect_timeout_s)), configured
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0),
            timeout=configured,
            # Like httpx, honour HTTP(S)_PROXY / NO_PROXY (not ALL_PROXY, which aiohttp does not read: the other
            # two clients do). aiohttp re-reads the environment on every request when asked to, which halved
            # calls/s in `make bench`, so ask only if a proxy is set.
            trust_env=bool(getproxies_environment()),
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
        timeout = self._timeouts.get(timeout_s)
        try:
            # A redirect to another host would carry our API key along (see HttpxClient).
            async with self._session.request(
                method, url, params=params, headers=headers, data=body, allow_redirects=False, timeout=timeout
            ) as response:
                content = await _capped_reads(response.content.read, self._max_body_bytes)
                return HttpResponse(
                    status=response.status,
                    headers={name.lower(): _text(value) for name, value in response.headers.items()},
                    body=content,
                )
        except TimeoutError as exc:  # aiohttp's ServerTimeoutError and asyncio's timeout both are
            raise TransportFailure("timeout", type(exc).__name__) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportFailure("connect", str(exc) or type(exc).__name__) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            raise TransportFailure("reset", str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise TransportFailure("protocol", str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self._session.close()


async def _capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The first `limit` bytes of a body; what comes after is not read."""
    kept: list[bytes] = []
    size = 0
    async for chunk in chunks:
        kept.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(kept)[:limit]


async def _capped_reads(read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    """The first `limit` bytes of a body, from `read(n)` (up to n bytes; empty at its end)."""
    kept: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await read(limit - size)
        if not chunk:
            break
        kept.append(chunk)
        size += len(chunk)
    return b"".join(kept)


def _text(value: str) -> str:
    """A header value as text that can be written anywhere. aiohttp keeps bytes that are not UTF-8 as lone
    surrogates, which no encoder takes: a dead letter's headers could not be written, and the service stopped."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def build_http_client(
    kind: HttpClientKind,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_connections: int,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> HttpClient:
    """The configured client; call it inside the running event loop."""
    # Imported here: http_reqwest imports this module's types.
    from service.http.reqwest import PyreqwestClient

    clients: dict[str, type[AiohttpClient | HttpxClient | PyreqwestClient]] = {
        "aiohttp": AiohttpClient,
        "httpx": HttpxClient,
        "pyreqwest": PyreqwestClient,
    }
    if kind not in clients:
        raise ValueError(f"unknown HTTP client {kind!r}")
    return clients[kind](
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        max_connections=max_connections,
        max_body_bytes=max_body_bytes,
    )
