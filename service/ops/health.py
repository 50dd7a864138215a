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

from service.ops.metrics import Metrics

# The logger keeps its name from before the package split: log queries and alerts filter on it.
log = logging.getLogger("service.health")


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
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info("operations port open", extra={"host": self._host, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed for three GET routes
            status, content_type, body = self._route(request_line)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, request_line: bytes) -> tuple[str, str, bytes]:
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
