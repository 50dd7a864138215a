"""Reference loops: what this machine's core can do with the service's own building blocks, no Kafka.

They run in the bench process, pinned to the service's core, on the service's event loop, against the
same sink, in the same run, so the service's figures can be read as ratios: `decode_only_per_s` is
fastavro decoding the very records the inference phase publishes, `raw_http_per_s` is aiohttp's
`ClientSession` sending the update calls at the service's concurrency, `raw_pyreqwest_per_s` and
`raw_httpx_per_s` the same with a pyreqwest `Client` and a plain httpx `AsyncClient`. The bridge's own
`HttpClient` implementations are measured the same way, through the interface delivery uses, which
is how the client is chosen.

`python -m bench.clients` runs the HTTP loops alone, a few seconds each, for comparing clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from typing import Any

import aiohttp
import httpx
import orjson
from fastavro import schemaless_reader
from pyreqwest.client import ClientBuilder

from service.http.client import AiohttpClient, HttpClient, HttpxClient
from service.http.reqwest import PyreqwestClient, configure_runtime

_HEADERS = {"content-type": "application/json", "accept": "application/json", "authorization": "Bearer bench-key"}

Send = Callable[[int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Rate:
    per_s: float
    """Units per wall-clock second."""
    cpu_util: float
    """This process's CPU seconds per wall second meanwhile; below 1 when something else took the core."""

    @property
    def per_cpu_s(self) -> float:
        return self.per_s / self.cpu_util if self.cpu_util > 0 else 0.0


class _Clock:
    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def rate(self, done: int) -> Rate:
        wall = time.perf_counter() - self._wall
        return Rate(done / wall, (time.process_time() - self._cpu) / wall)


def decode_only(values: Sequence[bytes], schema: Any, min_seconds: float = 3.0) -> Rate:
    """Records/s of fastavro `schemaless_reader` over `values`, repeated until `min_seconds` passed."""
    done = 0
    clock = _Clock()
    deadline = time.perf_counter() + min_seconds
    while True:
        for value in values:
            schemaless_reader(BytesIO(value), schema, None)
        done += len(values)
        if time.perf_counter() >= deadline:
            return clock.rate(done)


def update_call(base_url: str, i: int) -> tuple[str, tuple[tuple[str, str], ...], bytes]:
    """An Update-record call like the bench's row-update records make: URL, query, JSON body."""
    body = orjson.dumps(
        {"row": {"ground_truth": str(i), "human_feedback": "thumbs_up"}, "config": {"groundTruthColumnName": "gt"}}
    )
    url = f"{base_url}/inference-pipelines/182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e/rows"
    return url, (("inferenceId", f"ref-{i}"),), body


async def _drive(send: Send, concurrency: int, count: int, max_seconds: float) -> Rate:
    """Calls/s of `concurrency` workers sharing `count` calls, stopping early after `max_seconds`."""
    next_index = 0
    deadline = time.perf_counter() + max_seconds
    finished = 0

    async def worker() -> None:
        nonlocal next_index, finished
        while next_index < count and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            await send(i)
            finished += 1

    await send(-1)  # connect and warm up outside the clock
    clock = _Clock()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return clock.rate(finished)


async def raw_aiohttp(base_url: str, concurrency: int, count: int, max_seconds: float) -> Rate:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(i: int) -> None:
            url, params, body = update_call(base_url, i)
            async with session.put(url, params=params, data=body, headers=_HEADERS) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"sink answered {response.status}")

        return await _drive(send, concurrency, count, max_seconds)


async def raw_pyreqwest(base_url: str, concurrency: int, count: int, max_seconds: float) -> Rate:
    # On the runtime PyreqwestClient uses (one Tokio worker thread), so this is the limit of the
    # service's client as it runs; the library's default single-threaded runtime measured the same.
    configure_runtime()
    async with ClientBuilder().runtime_multithreaded(True).follow_redirects(False).build() as client:

        async def send(i: int) -> None:
            url, params, body = update_call(base_url, i)
            response = await client.put(url).query(params).headers(_HEADERS).body_bytes(body).build().send()
            if response.status != 200:
                raise RuntimeError(f"sink answered {response.status}")

        return await _drive(send, concurrency, count, max_seconds)


async def raw_httpx(base_url: str, concurrency: int, count: int, max_seconds: float) -> Rate:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0, pool=None)) as client:
        return await _drive_httpx(client, base_url, concurrency, count, max_seconds)


async def httpx_over_aiohttp(base_url: str, concurrency: int, count: int, max_seconds: float) -> Rate | None:
    """httpx's API over `httpx-aiohttp`'s transport, or None when that package is not installed."""
    try:
        from httpx_aiohttp import AiohttpTransport  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    transport = AiohttpTransport(
        client=lambda: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
    )
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30.0, pool=None)) as client:
        return await _drive_httpx(client, base_url, concurrency, count, max_seconds)


async def _drive_httpx(
    client: httpx.AsyncClient, base_url: str, concurrency: int, count: int, max_seconds: float
) -> Rate:
    async def send(i: int) -> None:
        url, params, body = update_call(base_url, i)
        response = await client.put(url, params=params, content=body, headers=_HEADERS)
        if response.status_code != 200:
            raise RuntimeError(f"sink answered {response.status_code}")

    return await _drive(send, concurrency, count, max_seconds)


async def bridge_client(
    build: Callable[[], HttpClient], base_url: str, concurrency: int, count: int, max_seconds: float
) -> Rate:
    """Calls/s through the bridge's `HttpClient` interface, as delivery uses it."""
    client = build()
    try:

        async def send(i: int) -> None:
            url, params, body = update_call(base_url, i)
            response = await client.send("PUT", url, params, _HEADERS, body)
            if response.status != 200:
                raise RuntimeError(f"sink answered {response.status}")

        return await _drive(send, concurrency, count, max_seconds)
    finally:
        await client.aclose()


REFERENCE_KEYS = (
    "decode_only_per_s",
    "raw_http_per_s",
    "raw_pyreqwest_per_s",
    "raw_httpx_per_s",
    "httpx_over_aiohttp_per_s",
    "bridge_aiohttp_client_per_s",
    "bridge_pyreqwest_client_per_s",
    "bridge_httpx_client_per_s",
)
RAW_CLIENT_KEYS = {"aiohttp": "raw_http_per_s", "pyreqwest": "raw_pyreqwest_per_s", "httpx": "raw_httpx_per_s"}
"""The raw loop of each library the service can be configured with (`BRIDGE_DELIVERY__HTTP_CLIENT`)."""


def raw_loop(client: str) -> Callable[[str, int, int, float], Awaitable[Rate]]:
    """The raw loop of one library, by its name in `RAW_CLIENT_KEYS`."""
    return {"aiohttp": raw_aiohttp, "pyreqwest": raw_pyreqwest, "httpx": raw_httpx}[client]


RAW_CALLS = {"aiohttp": 60_000, "pyreqwest": 200_000, "httpx": 6_000}
"""Calls per raw loop: enough for its time cap (`RAW_SECONDS`) at this machine's rates."""
RAW_SECONDS = 10.0


def _set_affinity(cpus: set[int]) -> None:
    # Every thread, not just the caller's: pyreqwest's Tokio runtime has threads of its own, and a
    # thread keeps the affinity it was created with, so pinning only this one would let them run
    # on the other core and flatter its loop.
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """This process on `core` (the service's) meanwhile, so references and service share a core."""
    previous = os.sched_getaffinity(0)
    if core is not None:
        _set_affinity({core})
    try:
        yield
    finally:
        _set_affinity(previous)


def mean(samples: Sequence[Rate]) -> Rate:
    """One figure from samples taken at different times of the run (the machine's speed drifts)."""
    return Rate(
        sum(r.per_s for r in samples) / len(samples),
        sum(r.cpu_util for r in samples) / len(samples),
    )


async def run_all(
    base_url: str, values: Sequence[bytes], schema: Any, concurrency: int, core: int | None
) -> dict[str, Rate | None]:
    """Every reference, pinned to `core` (the service's) meanwhile; keys are `REFERENCE_KEYS`."""

    def bridge(cls: type[AiohttpClient | PyreqwestClient | HttpxClient]) -> Callable[[], HttpClient]:
        return partial(cls, connect_timeout_s=5.0, read_timeout_s=30.0, max_connections=concurrency)

    with pinned(core):
        return {
            "decode_only_per_s": decode_only(values, schema),
            "raw_http_per_s": await raw_aiohttp(base_url, concurrency, RAW_CALLS["aiohttp"], RAW_SECONDS),
            "raw_pyreqwest_per_s": await raw_pyreqwest(base_url, concurrency, RAW_CALLS["pyreqwest"], RAW_SECONDS),
            "raw_httpx_per_s": await raw_httpx(base_url, concurrency, RAW_CALLS["httpx"], 8.0),
            "httpx_over_aiohttp_per_s": await httpx_over_aiohttp(base_url, concurrency, 30_000, 8.0),
            "bridge_aiohttp_client_per_s": await bridge_client(
                bridge(AiohttpClient), base_url, concurrency, RAW_CALLS["aiohttp"], RAW_SECONDS
            ),
            "bridge_pyreqwest_client_per_s": await bridge_client(
                bridge(PyreqwestClient), base_url, concurrency, RAW_CALLS["pyreqwest"], RAW_SECONDS
            ),
            "bridge_httpx_client_per_s": await bridge_client(
                bridge(HttpxClient), base_url, concurrency, RAW_CALLS["httpx"], 8.0
            ),
        }
