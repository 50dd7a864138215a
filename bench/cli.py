"""`make bench` (`python -m bench`): the service's throughput, latency hiding, latency and memory,
measured against the limits of its own stack on the same machine in the same run.

It starts a local Kafka broker (or uses `KAFKA_BOOTSTRAP_SERVERS`) and the sink, runs the reference
loops (`bench.refs`) pinned to the service's core and on the service's event loop, then the phases
(`bench.harness`), and prints a table and, as its last line, one JSON object with every figure
(`bench.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from fastavro import parse_schema

from service.ops.runtime import event_loop_factory

from . import kafka
from .harness import OTHER_CPU, PHASES, SERVICE_CPU, Bench, Options, PhaseResult, merge_rounds
from .procs import Receiver, Sink
from .refs import (
    RAW_CALLS,
    RAW_CLIENT_KEYS,
    RAW_SECONDS,
    REFERENCE_KEYS,
    Rate,
    decode_only,
    mean,
    pinned,
    raw_loop,
    run_all,
)
from .report import num, rounded, summary, table, tracing_line

REPO = Path(__file__).resolve().parent.parent
JARS = REPO / ".cache" / "kafka" / "jars"


Samples = dict[str, list[Rate]]


def traced_environment(receiver: Receiver) -> dict[str, str]:
    """Tracing on at 100% sampling, exporting to `receiver` (the standard variables, as an operator sets them)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "always_on"}


async def run_phases(
    bench: Bench, http_client: str, receiver: Receiver | None
) -> tuple[dict[str, Rate | None], Samples]:
    """The references and the phases; the ratio references are sampled again right after the phase
    they are the denominator of, and averaged, because this machine's speed drifts. The traced phase
    runs next to its untraced twin in every round, so their ratio is taken on the same machine state."""
    o = bench.o
    references: dict[str, Rate | None] = dict.fromkeys(REFERENCE_KEYS)
    samples: Samples = {}
    values = list(bench.factory.values("inference", 20_000, "dec-"))
    schema = parse_schema(bench.factory.encoder.raw["inference"])
    core = int(SERVICE_CPU) if bench.pinning else None
    base_url = f"{bench.sink.base_url}/openlayer/v1"
    # The update phases are divided by raw aiohttp, raw pyreqwest and the raw loop of the service's own
    # client (one of those two unless it is httpx).
    raw_keys = list(dict.fromkeys(("raw_http_per_s", "raw_pyreqwest_per_s", RAW_CLIENT_KEYS.get(http_client, ""))))
    again = {"inferences": ["decode_only_per_s"], "row_updates": [key for key in raw_keys if key]}
    if "references" not in o.skip:
        print("reference loops ...", flush=True)
        references = await run_all(base_url, values, schema, o.concurrency, core)
        print("  " + ", ".join(f"{k} {num(v.per_s if v else None)}" for k, v in references.items()), flush=True)
        samples = {key: [first] for keys in again.values() for key in keys if (first := references[key])}
    client_of = {key: client for client, key in RAW_CLIENT_KEYS.items()}

    async def measure_again(key: str) -> Rate:
        if key == "decode_only_per_s":
            return decode_only(values, schema)
        client = client_of[key]
        return await raw_loop(client)(base_url, o.concurrency, RAW_CALLS[client], RAW_SECONDS)

    plan = (
        ("inferences", "inference", o.inference_records, 0.0),
        ("row_updates", "row_update", o.update_records, 0.0),
        ("row_updates_traced", "row_update", o.update_records, 0.0),
        ("log_updates", "log_update", o.update_records, 0.0),
        ("row_updates_50ms", "row_update", o.update_records, 50.0),
    )

    async def backlog(phase: str, kind: str, count: int, latency_ms: float, name: str) -> PhaseResult:
        if phase != "row_updates_traced":
            return await bench.backlog(name, kind, count, latency_ms)
        assert receiver is not None
        before = await receiver.spans()
        res = await bench.backlog(name, kind, count, latency_ms, traced_environment(receiver))
        # Counted once the service stopped, which exports what it still holds (service/ops/tracing/api.py).
        res.extra["spans_received"] = await receiver.spans() - before
        return res

    for phase, kind, count, latency_ms in plan:
        if phase in o.skip:
            continue
        print(f"phase {phase}: {count:,} {kind} records, sink latency {latency_ms:.0f} ms ...", flush=True)
        res = await backlog(phase, kind, count, latency_ms, phase)
        print(
            f"  [{phase}] {res.rate:,.0f} {res.unit} over {res.window_s:.1f}s, service CPU "
            f"{100 * res.service_cpu_util:.0f}%, peak RSS {res.peak_rss_mib:.0f} MiB, "
            f"{res.extra.get('peak_threads', 0)} threads at most, drained {res.drained}"
            + (f", {res.extra['spans_received']:,} spans received" if "spans_received" in res.extra else ""),
            flush=True,
        )
        for key in again.get(phase, []):
            if key not in samples:
                continue
            with pinned(core):
                samples[key].append(await measure_again(key))
            references[key] = mean(samples[key])
            print(f"  {key} again: " + ", ".join(num(r.per_s) for r in samples[key]), flush=True)
    # The update phases again, in the same order, as often as asked: their ratio to each other (latency
    # hiding) and to raw aiohttp is then a mean over rounds, not one draw of this machine's drift.
    update_phases = [step for step in plan[1:] if step[0] not in o.skip]
    rounds: dict[str, list[PhaseResult]] = {phase: [bench.results[phase]] for phase, *_ in update_phases}
    for n in range(2, o.rounds + 1):
        for phase, kind, count, latency_ms in update_phases:
            print(f"phase {phase}, round {n} ...", flush=True)
            res = await backlog(phase, kind, count, latency_ms, f"{phase}-r{n}")
            del bench.results[f"{phase}-r{n}"]
            rounds[phase].append(res)
            print(
                f"  [{phase}] round {n}: {res.rate:,.0f} {res.unit}, service CPU {100 * res.service_cpu_util:.0f}%, "
                f"{res.per_cpu_s:,.0f} per CPU-s"
                + (f", {res.extra['spans_received']:,} spans received" if "spans_received" in res.extra else ""),
                flush=True,
            )
    for phase, results in rounds.items():
        if len(results) > 1:
            bench.results[phase] = merge_rounds(results)
    if "row_updates_traced" in bench.results:
        print(tracing_line(bench), flush=True)
    if "latency" not in o.skip:
        measured = bench.results.get("row_updates")
        if measured is None or measured.rate <= 0:
            print("phase latency skipped: it needs the row_updates rate", flush=True)
        else:
            rate = measured.rate / 2
            print(f"phase latency: row updates at {rate:,.0f}/s for {o.latency_seconds:.0f}s ...", flush=True)
            res = await bench.latency(rate)
            x = res.extra
            if x:
                print(
                    f"  [latency] p50 {x['p50_ms']:.1f} ms, p99 {x['p99_ms']:.1f} ms, max {x['max_ms']:.1f} ms, "
                    f"service CPU {100 * res.service_cpu_util:.0f}%; "
                    f"p50/max ms by second of production (the first {x['warmup_s']:.0f} are warm-up): "
                    + " ".join(f"{p}/{m}" for p, m in x["by_second"]),
                    flush=True,
                )
    return references, samples


def _machine(pinning: bool, external: bool) -> dict[str, Any]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pinned": pinning,
        "external_broker": external,
        "load_start": _load(),
        "load_end": None,
    }


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: checks the harness, not the service")
    parser.add_argument("--inferences", type=int, help="inference backlog (default 1,000,000; quick 100,000)")
    parser.add_argument("--updates", type=int, help="records per update phase (default 40,000; quick 5,000)")
    parser.add_argument("--rounds", type=int, help="runs of each update phase, averaged (default 2; quick 1)")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--concurrency", type=int, default=256, help="workers of the reference loops (the service adapts its own)"
    )
    parser.add_argument("--latency-seconds", type=float, help="paced-producer duration (default 20; quick 5)")
    parser.add_argument("--latency-warmup", type=float, help="paced seconds before measuring (default 10; quick 3)")
    parser.add_argument("--phase-timeout", type=float, default=150.0, help="cap per update phase, seconds")
    parser.add_argument("--inference-timeout", type=float, default=360.0, help="cap on the inference phase, seconds")
    parser.add_argument("--http-client", choices=tuple(RAW_CLIENT_KEYS), help="sets BRIDGE_DELIVERY__HTTP_CLIENT")
    parser.add_argument("--service-dir", type=Path, default=REPO, help="where `python -m service` runs from")
    parser.add_argument("--profile", type=Path, nargs="?", const=Path(), help="py-spy every service run into DIR")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames, the GC)")
    parser.add_argument("--set", action="append", default=[], metavar="BRIDGE_X=V", help="extra service setting")
    parser.add_argument(
        "--skip", action="append", default=[], choices=(*PHASES, "references"), help="leave a phase out"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # Producing right after topic creation meets a leader election or two; aiokafka retries them.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    started = time.monotonic()
    work_dir = REPO / ".cache" / "bench" / time.strftime("%Y%m%d-%H%M%S")
    work_dir.mkdir(parents=True, exist_ok=True)
    profile_dir = None if args.profile is None else (args.profile if str(args.profile) != "." else work_dir)
    options = Options(
        inference_records=args.inferences or (100_000 if args.quick else 1_000_000),
        update_records=args.updates or (5_000 if args.quick else 40_000),
        rounds=max(1, args.rounds or (1 if args.quick else 2)),
        partitions=args.partitions,
        concurrency=args.concurrency,
        latency_seconds=args.latency_seconds or (5.0 if args.quick else 20.0),
        latency_warmup_s=args.latency_warmup if args.latency_warmup is not None else (3.0 if args.quick else 10.0),
        phase_timeout_s=args.phase_timeout,
        inference_timeout_s=args.inference_timeout,
        http_client=args.http_client,
        service_dir=args.service_dir.resolve(),
        profile_dir=profile_dir,
        profile_native=args.profile_native,
        overrides=dict(item.split("=", 1) for item in args.set),
        work_dir=work_dir,
        skip=frozenset(args.skip),
    )
    pinning = len(os.sched_getaffinity(0)) >= 2
    if not pinning:
        print("fewer than 2 CPUs available: running unpinned, figures are not comparable", file=sys.stderr)
    else:
        os.sched_setaffinity(0, {int(OTHER_CPU)})
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    machine = _machine(pinning, external is not None)
    print(f"bench work dir (service logs, profiles): {work_dir}", flush=True)
    references: dict[str, Rate | None] = {}
    samples: Samples = {}
    bench: Bench | None = None
    with contextlib.ExitStack() as stack:
        if external:
            bootstrap = external
        else:
            print("starting a local Kafka broker ...", flush=True)
            bootstrap = stack.enter_context(
                kafka.pinned_broker(JARS, OTHER_CPU if pinning else "0-1", work_dir / "broker.log")
            )
        sink = Sink(OTHER_CPU if pinning else None, work_dir / "sink.log")
        stack.callback(sink.stop)
        receiver = None
        if "row_updates_traced" not in options.skip:
            receiver = Receiver(OTHER_CPU if pinning else None, work_dir / "otlp-receiver.log")
            stack.callback(receiver.stop)
        bench = Bench(options, bootstrap, sink, pinning)
        delivery = bench.delivery_settings()
        http_client = str(delivery.get("http_client", "httpx (this service has no http_client setting)"))
        # A service without the setting ran on asyncio's loop.
        event_loop = str(delivery.get("event_loop", "asyncio"))
        print(f"service http client: {http_client}; event loop (service and reference loops): {event_loop}", flush=True)

        async def go() -> tuple[dict[str, Rate | None], Samples]:
            try:
                return await run_phases(bench, http_client, receiver)
            finally:
                await sink.aclose()

        # The reference loops run on the loop the service runs on, because a client's rate depends on the
        # loop (pyreqwest's raw loop sent about 1.3x the calls per CPU-second on uvloop than on asyncio,
        # `python -m bench.clients --event-loop`): references on another loop skew the ratios.
        with asyncio.Runner(loop_factory=event_loop_factory(event_loop)) as runner:
            references, samples = runner.run(go())
    machine["load_end"] = _load()
    figures = summary(bench, references, http_client)
    figures["reference_samples_per_s"] = {key: [round(r.per_s, 1) for r in rates] for key, rates in samples.items()}
    figures["bench_seconds"] = round(time.monotonic() - started, 1)
    figures["http_client"] = http_client
    figures["event_loop"] = event_loop
    figures["service_settings"] = {
        "reference_concurrency": str(options.concurrency),
        "partitions": str(options.partitions),
        **options.overrides,
    }
    figures["machine"] = machine
    print(table(bench, figures, machine))
    print(f"\nbench took {figures['bench_seconds']:.0f}s; service logs in {work_dir}")
    print(json.dumps(rounded(figures), sort_keys=False))
    return 0
