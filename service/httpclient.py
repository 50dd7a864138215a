"""The HTTP client behind one small interface, so the transport can be chosen by measurement.

Delivery sees only `HttpClient.send` and its two outcomes: an `HttpResponse` (any status) or a
`TransportFailure` (no usable response: connect error, timeout, reset). httpx's exception zoo is
converted here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx


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
    ) -> HttpResponse: ...

    async def aclose(self) -> None: ...


class HttpxClient:
    """One shared `httpx.AsyncClient` with bounded connections and explicit timeouts."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, max_connections: int) -> None:
        self._client = httpx.AsyncClient(
            # No pool timeout: callers are admitted by delivery's per-destination slots.
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None),
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
    ) -> HttpResponse:
        try:
            response = await self._client.request(method, url, params=params, headers=headers, content=body)
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
