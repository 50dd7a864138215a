"""The HTTP client behind one small interface, so the transport can be chosen by measurement.

Delivery sees only `HttpClient.send` and its two outcomes: an `HttpResponse` (any status) or a
`TransportFailure` (no usable response: connect error, timeout, reset). Each library's exception zoo
is converted here and nowhere else (pyreqwest's in service/http/reqwest.py). Three implementations:
`AiohttpClient` (the default; `make bench` measured it several times faster per core than httpx under
concurrency), `HttpxClient` and `PyreqwestClient`. `build_http_client` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar
from urllib.request import getproxies_environment

import aiohttp
import httpx

T = TypeVar("T")

HttpClientKind = Literal["aiohttp", "httpx", "pyreqwest"]


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
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
        # httpx times each phase, not the whole: the attempt timeout bounds each wait for bytes.
        timeout = self._timeouts.get(timeout_s)
        try:
            response = await self._client.request(
                method, url, params=params, headers=headers, content=body, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            raise TransportFailure("timeout", type(exc).__name__) from exc
        except httpx.ConnectError as exc:
            raise TransportFailure("connect", str(exc) or type(exc).__name__) from exc
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            raise TransportFailure("reset", str(exc) or type(exc).__name__) from exc
        except httpx.HTTPError as exc:
            raise TransportFailure("protocol", str(exc) or type(exc).__name__) from exc
        return HttpResponse(status=response.status_code, headers=response.headers, body=response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


class AiohttpClient:
    """One shared `aiohttp.ClientSession` with bounded connections and explicit timeouts.

    Construct it inside the running event loop (aiohttp binds the session to it).
    """

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int) -> None:
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
            # Like httpx, honour HTTP(S)_PROXY / NO_PROXY. aiohttp re-reads the environment on every
            # request when asked to, which halved calls/s in `make bench`, so ask only if a proxy is set.
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
                content = await response.read()
                return HttpResponse(
                    status=response.status,
                    headers={name.lower(): value for name, value in response.headers.items()},
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


def build_http_client(
    kind: HttpClientKind, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int
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
        connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s, max_connections=max_connections
    )
