"""The operations port: `/metrics` for Prometheus, `/livez` and `/readyz` for Kubernetes probes.

`/livez` answers 200 while the consumer loop keeps turning (its heartbeat is fresh) and no fatal
error has stopped it; a failing liveness probe restarts the pod. `/readyz` answers 200 once the
member has joined its consumer group (it may own no partition, with more replicas than
partitions) and until it starts to stop. Settings are validated before the port opens, so a pod
with bad settings never becomes ready: it exits with the list of problems instead.

A plain asyncio server: three GET routes do not justify a web framework in the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

from service.ops.metrics import Metrics

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.health")

MAX_LINE_BYTES: Final = 64 * 1024
"""The longest request or header line read (the stream's limit, asyncio's default); a probe's are tens of bytes."""
MAX_HEADER_LINES: Final = 100
"""Header lines read per request (http.client's cap too): a probe sends a handful, and a client that sends lines
without end must not keep a handler reading them."""
READ_TIMEOUT_S: Final = 5.0
"""How long one line of a request may take to arrive."""
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1024 * 1024
"""After refusing a request it did not read whole, how long and how much of the rest the port reads and drops."""

Answer = tuple[str, str, bytes]
"""(status line, content type, body)."""
URI_TOO_LONG: Final[Answer] = ("414 URI Too Long", "text/plain", b"request line too long\n")
HEADERS_TOO_LARGE: Final[Answer] = ("431 Request Header Fields Too Large", "text/plain", b"headers too large\n")


class _LineTooLong(Exception):
    """A line of the request is longer than MAX_LINE_BYTES."""


class HealthState:
    """What the probes report; changed only through its methods, by the consumer loop and the app."""

    def __init__(self, stale_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._beat = clock()
        self._joined = False
        self._stopping = False
        self._fatal: str | None = None

    @property
    def joined(self) -> bool:
        return self._joined

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def fatal(self) -> str | None:
        return self._fatal

    def heartbeat(self) -> None:
        """The consumer loop turned: it is not stuck."""
        self._beat = self._clock()

    def mark_joined(self) -> None:
        """The member joined its consumer group (it may own no partition)."""
        self._joined = True

    def mark_stopping(self) -> None:
        """The loop is stopping: not ready any more, still live while it drains."""
        self._stopping = True

    def mark_fatal(self, reason: str) -> None:
        """The service cannot keep its delivery promise: not live, so the pod is restarted."""
        self._fatal = reason

    def live(self) -> tuple[bool, str]:
        if self._fatal is not None:
            return False, f"fatal: {self._fatal}"
        age = self._clock() - self._beat
        if age > self._stale_after_s:
            return False, f"consumer loop silent for {age:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "stopping"
        if not self._joined:
            return False, "not yet joined the consumer group"
        return self.live()


class OpsServer:
    def __init__(self, state: HealthState, metrics: Metrics, host: str, port: int) -> None:
        self._state = state
        self._metrics = metrics
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the operations port is not open yet: start() it first")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port, limit=MAX_LINE_BYTES)
        log.info("operations port open", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Every way a client can fail is handled here: an exception escaping this callback is logged by asyncio at
        # ERROR ("Unhandled exception in client_connected_cb") and the client gets no answer at all.
        try:
            (status, content_type, body), whole = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            if not whole:
                await _discard_rest(reader, writer)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Answer, bool]:
        """The answer to the request on `reader`, and whether the request was read whole."""
        try:
            request_line = await _read_line(reader)
        except _LineTooLong:
            # A scanner or a misconfigured probe, not a problem of the service: no warning for it.
            log.debug("operations port: request line over %d bytes refused", MAX_LINE_BYTES)
            return URI_TOO_LONG, False
        for _ in range(MAX_HEADER_LINES + 1):  # the header lines, then the blank line that ends them
            try:
                line = await _read_line(reader)
            except _LineTooLong:
                log.debug("operations port: header line over %d bytes refused", MAX_LINE_BYTES)
                return HEADERS_TOO_LARGE, False
            if line in (b"\r\n", b"\n", b""):
                return self._route(request_line), True  # headers are not needed for three GET routes
        log.debug("operations port: request with over %d header lines refused", MAX_HEADER_LINES)
        return HEADERS_TOO_LARGE, False

    def _route(self, request_line: bytes) -> Answer:
        parts = request_line.decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", self._metrics.render()
        if path in ("/livez", "/readyz"):
            ok, why = self._state.live() if path == "/livez" else self._state.ready()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (why + "\n").encode()
        return "404 Not Found", "text/plain", b"not found\n"


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.readline(), timeout=READ_TIMEOUT_S)
    except ValueError:
        # readline's only ValueError: the line is over the stream's limit (its LimitOverrunError, converted).
        raise _LineTooLong from None


async def _discard_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After the answer to a request not read whole: say we are done, then read and drop what the client still sends.

    Closing a socket with unread input sends a reset instead of a FIN, and a reset can make the client's system
    drop the answer before the client reads it. Bounded in time and bytes: the client may never stop sending.
    """
    writer.write_eof()
    dropped = 0
    async with asyncio.timeout(LINGER_S):
        while dropped < LINGER_BYTES:
            chunk = await reader.read(MAX_LINE_BYTES)
            if not chunk:
                return
            dropped += len(chunk)
