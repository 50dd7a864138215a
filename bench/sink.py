"""A minimal, fast HTTP/1.1 sink for the bench: answers every call 200 and counts what it received.

It is a bare `asyncio.Protocol`, not a framework, so one core serves far more calls than the service
can send from its own core: the bench measures the service, not the sink. It understands only what
the bridge and the reference clients send (keep-alive, `Content-Length` bodies, no pipelining
required). Per endpoint it counts calls, rows (Publish records bodies are parsed for their row
count) and the wall-clock time of the first and last call, which is what throughput is measured
from. With `track` on it keeps `(id, receive time)` for every update call, the id taken from the
query string, so the bench can compute produce-to-API latency. An added latency delays every answer
without blocking others. Control calls live under `/__bench/`:

    GET  /__bench/stats                         counters per endpoint, and this process's CPU seconds
    POST /__bench/reset?latency_ms=50&track=1   clear counters, set the added latency and id tracking
    GET  /__bench/ids                           [[id, receive time], ...] since the last reset

`python -m bench.sink --port 0` prints `LISTENING <port>` once it accepts connections, and runs until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

_OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{"success":true}'
_ID_PARAMS = (b"inferenceId=", b"reference_id=")


@dataclass(slots=True)
class EndpointStats:
    calls: int = 0
    rows: int = 0
    first: float = 0.0
    last: float = 0.0
    bytes_in: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"calls": self.calls, "rows": self.rows, "first": self.first, "last": self.last, "bytes": self.bytes_in}


@dataclass(slots=True)
class SinkState:
    latency_s: float = 0.0
    track: bool = False
    stats: dict[str, EndpointStats] = field(default_factory=dict)
    ids: list[tuple[str, float]] = field(default_factory=list)
    connections: int = 0

    def reset(self, latency_s: float, track: bool) -> None:
        self.latency_s = latency_s
        self.track = track
        self.stats = {}
        self.ids = []


def _endpoint(path: bytes) -> str:
    if path.endswith(b"/data-stream"):
        return "publish"
    if path.endswith(b"/rows"):
        return "update_row"
    if path.endswith(b"/logs"):
        return "update_log"
    return "other"


def _tracked_id(query: bytes) -> str | None:
    for part in query.split(b"&"):
        for prefix in _ID_PARAMS:
            if part.startswith(prefix):
                return unquote(part[len(prefix) :].decode())
    return None


def _reply(status: str, payload: Any) -> bytes:
    body = orjson.dumps(payload)
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class SinkProtocol(asyncio.Protocol):
    """One connection: split the byte stream into requests, answer each in order."""

    def __init__(self, state: SinkState) -> None:
        self._state = state
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._state.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections -= 1
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            head_end = buffer.find(b"\r\n\r\n", start)
            if head_end < 0:
                break
            head = buffer[start:head_end]
            length = 0
            marker = head.lower().find(b"\r\ncontent-length:")
            if marker >= 0:
                value_end = head.find(b"\r\n", marker + 2)
                length = int(head[marker + 17 : value_end if value_end >= 0 else len(head)])
            body_end = head_end + 4 + length
            if len(buffer) < body_end:
                break
            self._request(head, buffer[head_end + 4 : body_end])
            start = body_end
        self._buffer = buffer[start:]

    def _request(self, head: bytes, body: bytes) -> None:
        now = time.time()
        line_end = head.find(b"\r\n")
        method, target, _version = (head if line_end < 0 else head[:line_end]).split(b" ", 2)
        path, _, query = target.partition(b"?")
        if path.startswith(b"/__bench/"):
            self._send(self._control(method, path, query))
            return
        state = self._state
        kind = _endpoint(path)
        stats = state.stats.get(kind)
        if stats is None:
            stats = state.stats[kind] = EndpointStats(first=now)
        stats.calls += 1
        stats.last = now
        stats.bytes_in += len(body)
        if kind == "publish":
            rows = orjson.loads(body).get("rows")
            stats.rows += len(rows) if isinstance(rows, list) else 0
        else:
            stats.rows += 1
            if state.track:
                tracked = _tracked_id(query)
                if tracked is not None:
                    state.ids.append((tracked, now))
        if state.latency_s > 0:
            self._loop.call_later(state.latency_s, self._send, _OK)
        else:
            self._send(_OK)

    def _send(self, response: bytes) -> None:
        # Answers delayed by the same latency leave in arrival order, so per-connection order holds.
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(response)

    def _control(self, method: bytes, path: bytes, query: bytes) -> bytes:
        state = self._state
        if path == b"/__bench/stats":
            stats = {kind: s.to_json() for kind, s in state.stats.items()}
            payload = {"endpoints": stats, "cpu_s": _cpu_seconds(), "connections": state.connections}
            return _reply("200 OK", payload)
        if path == b"/__bench/ids":
            return _reply("200 OK", state.ids)
        if path == b"/__bench/reset" and method == b"POST":
            params = dict(parse_qsl(query.decode()))
            state.reset(float(params.get("latency_ms", "0")) / 1000, params.get("track", "0") == "1")
            return _reply("200 OK", {"latency_ms": state.latency_s * 1000, "track": state.track})
        return _reply("404 Not Found", {"error": f"no control endpoint {path.decode()}"})


async def serve(host: str, port: int, latency_s: float) -> None:
    loop = asyncio.get_running_loop()
    state = SinkState(latency_s=latency_s)
    server = await loop.create_server(lambda: SinkProtocol(state), host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"LISTENING {bound}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Minimal fast HTTP sink for `make bench`.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added delay before every answer")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
