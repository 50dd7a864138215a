"""`python -m bench.clients`: the HTTP clients' loops alone, a few seconds each, pinned as `make bench` pins.

The service's call pattern without Kafka: many small PUTs (`bench.refs.update_call`) with 256 in
flight, against the bench's sink on the other core, this process (every thread of it) on the
service's core, on the service's event loop. For each library it runs the raw loop and the bridge's
`HttpClient` over it, alternating libraries round by round because this machine's speed drifts, and
prints calls/s, this process's CPU share, calls per CPU-second and its thread count. The last line
is one JSON object with every sample. It needs no broker, and takes about `seconds` x 6 x `rounds`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from service.http.client import AiohttpClient, HttpClient, HttpxClient
from service.http.reqwest import PyreqwestClient
from service.ops.runtime import event_loop_factory

from .harness import OTHER_CPU, SERVICE_CPU
from .procs import Sink
from .refs import RAW_CALLS, Rate, bridge_client, pinned, raw_loop

BRIDGE: dict[str, type[AiohttpClient | PyreqwestClient | HttpxClient]] = {
    "aiohttp": AiohttpClient,
    "pyreqwest": PyreqwestClient,
    "httpx": HttpxClient,
}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def compare(
    sink_url: str, clients: list[str], concurrency: int, seconds: float, rounds: int, core: int | None
) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {}
    for n in range(1, rounds + 1):
        for client in clients:
            loops: list[tuple[str, Callable[[], Awaitable[Rate]]]] = [
                (f"raw {client}", partial(raw_loop(client), sink_url, concurrency, RAW_CALLS[client], seconds)),
                (f"{BRIDGE[client].__name__}", partial(_bridge, client, sink_url, concurrency, seconds)),
            ]
            for name, measure in loops:
                with pinned(core):
                    rate = await measure()
                    threads = _threads()
                samples.setdefault(name, []).append(
                    {
                        "per_s": round(rate.per_s, 1),
                        "cpu_util": round(rate.cpu_util, 3),
                        "per_cpu_s": round(rate.per_cpu_s, 1),
                    }
                )
                print(
                    f"round {n}  {name:<22}{rate.per_s:>10,.0f} calls/s  CPU {100 * rate.cpu_util:>3.0f}%"
                    f"{rate.per_cpu_s:>10,.0f} per CPU-s  {threads:>3} threads  load {_load()}",
                    flush=True,
                )
    return samples


async def _bridge(client: str, sink_url: str, concurrency: int, seconds: float) -> Rate:
    def build() -> HttpClient:
        return BRIDGE[client](connect_timeout_s=5.0, read_timeout_s=30.0, max_connections=concurrency)

    return await bridge_client(build, sink_url, concurrency, RAW_CALLS[client], seconds)


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="aiohttp,pyreqwest,httpx", help="comma-separated, in running order")
    parser.add_argument("--seconds", type=float, default=4.0, help="per loop")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    if unknown := set(clients) - set(BRIDGE):
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    pinning = len(os.sched_getaffinity(0)) >= 2
    if pinning:
        os.sched_setaffinity(0, {int(OTHER_CPU)})
    else:
        print("fewer than 2 CPUs available: running unpinned, figures are not comparable", file=sys.stderr)
    sink = Sink(OTHER_CPU if pinning else None, Path(os.devnull))
    core = int(SERVICE_CPU) if pinning else None

    async def go() -> dict[str, list[dict[str, float]]]:
        try:
            return await compare(
                f"{sink.base_url}/openlayer/v1", clients, args.concurrency, args.seconds, args.rounds, core
            )
        finally:
            await sink.aclose()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            samples = runner.run(go())
    finally:
        sink.stop()
    print("\nmeans (calls/s, per CPU-s):")
    for name, rates in samples.items():
        per_s = sum(r["per_s"] for r in rates) / len(rates)
        per_cpu_s = sum(r["per_cpu_s"] for r in rates) / len(rates)
        print(f"  {name:<22}{per_s:>10,.0f}{per_cpu_s:>12,.0f}")
    print(json.dumps({"event_loop": args.event_loop, "concurrency": args.concurrency, "samples": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
