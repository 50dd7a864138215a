"""What tracing costs the service per record: the pipeline in-process, tracing off against on at 100% sampling.

    python -m tests.support.tracing_cost [--records 20000] [--rounds 3] [--kind row_update]

No Kafka: records are built as the consumer would hand them over (each with a producer's `traceparent`), and
go through the service's own codec, router, pipeline, delivery and HTTP client, 256 at a time, on uvloop with the
service's garbage-collector settings, to the bench's
HTTP sink (`python -m bench.sink`). With tracing on, spans go through the SDK's BatchSpanProcessor and OTLP/HTTP
exporter to a real receiver (`tests.support.otlp_receiver`). The sink and the receiver are child processes on
the last core, this process on the first, so what is measured is this process's CPU time per record (every
thread: the exporter's included, and the final flush). Rounds alternate off and on, as this machine's speed
drifts. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from bench.data import RecordFactory
from service.app import build_guards
from service.avro.codec import AvroCodec
from service.config.settings import load_settings
from service.core.records import SourceRecord
from service.http.batching import Batcher
from service.http.client import HttpClientKind, build_http_client
from service.http.delivery import Delivery
from service.kafka.deadletter import DeadLetterWriter
from service.ops.metrics import Metrics
from service.ops.redaction import Redactor
from service.ops.runtime import event_loop_factory, tune_garbage_collector
from service.ops.tracing import Tracing, build_tracing
from service.pipeline import Pipeline, publish_batch, publish_linked_batch
from service.streams import Router, by_topic, schema_set
from tests.support.kafka_broker import free_port

CONCURRENCY = 256
TOPICS = {"inference": "inferences", "row_update": "inference-row-updates", "log_update": "log-updates"}


class _Lender:
    def park(self, offset: int) -> None:
        pass

    async def resume(self, offset: int) -> None:
        pass


class _NoDeadLetters:
    async def send(self, letter: object) -> None:
        raise AssertionError("every record of the measurement is delivered")

    async def partition_count(self, topic: str) -> int:
        return 1


@contextmanager
def _child(argv: list[str], cpu: int | None, ready: str) -> Iterator[str]:
    """A child process on `cpu`; yields the first line it printed that starts with `ready`."""
    prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
    proc = subprocess.Popen([*prefix, sys.executable, *argv], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith(ready):
            raise RuntimeError(f"{argv} did not start: {line!r}")
        yield line
    finally:
        proc.terminate()
        proc.wait(10)


def _records(factory: RecordFactory, kind: str, count: int, prefix: str) -> list[SourceRecord]:
    rng = random.Random(5)
    topic = TOPICS[kind]
    records = []
    for n, value in enumerate(factory.values(kind, count, prefix)):
        traceparent = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01".encode()
        records.append(SourceRecord(topic, n % 6, n // 6, None, value, (("traceparent", traceparent),), 0))
    return records


async def _round(
    sink_url: str, endpoint: str | None, records: list[SourceRecord], client: HttpClientKind | None = None
) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, spans made) for `records` with tracing off (`endpoint` None) or on."""
    env = {
        "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "unused:9092",
        "BRIDGE_OPENLAYER__BASE_URL": sink_url + "/v1",
        "BRIDGE_OPENLAYER__API_KEY": "bench-openlayer-key",
        "BRIDGE_HUMANLOOP__BASE_URL": sink_url + "/v4",
        "BRIDGE_HUMANLOOP__API_KEY": "bench-humanloop-key",
        "BRIDGE_DELIVERY__MAX_CONNECTIONS": str(CONCURRENCY),
    }
    settings = load_settings(env)
    d = settings.delivery
    metrics = Metrics()
    rng = random.Random(1)
    redact = Redactor([])
    tracing: Tracing = (
        Tracing()
        if endpoint is None
        else build_tracing(
            group_id="bench", max_batch_rows=settings.batch.max_rows, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        )
    )
    http = build_http_client(
        client or d.http_client,
        connect_timeout_s=d.connect_timeout_s,
        read_timeout_s=d.read_timeout_s,
        max_connections=CONCURRENCY,
    )
    delivery = Delivery(
        http, d, build_guards(settings, metrics, redact, rng), rng=rng, instrumentation=metrics, tracing=tracing
    )
    from tests.support.demo import PIPELINE_TABULAR, TABULAR_CONFIG

    router = Router(
        openlayer_base_url=settings.openlayer.base_url,
        humanloop_base_url=settings.humanloop.base_url,
        pipeline_configs={PIPELINE_TABULAR: TABULAR_CONFIG},
        default_config=None,
        inference_id_column="inference_id",
    )
    b = settings.batch
    batcher = Batcher(
        lambda key, rows: publish_batch(router, delivery, key, rows),
        max_rows=b.max_rows,
        max_bytes=b.max_bytes,
        linger_s=b.linger_ms / 1000,
        linked_flush=(
            (lambda key, rows, traces: publish_linked_batch(router, delivery, tracing, key, rows, traces))
            if tracing.enabled
            else None
        ),
    )
    dead_letters = DeadLetterWriter(
        _NoDeadLetters(), topic_for=lambda t: t + ".dlq", group_id="bench", redact=redact, attempts=1
    )
    codec = AvroCodec(schema_set(settings.schemas_dir), None, "plain")
    pipeline = Pipeline(
        codec,
        router,
        delivery,
        dead_letters,
        batcher,
        by_topic(settings.topics),
        rng=rng,
        initial_backoff_s=d.initial_backoff_s,
        max_backoff_s=d.max_backoff_s,
        instrumentation=metrics,
        tracing=tracing,
    )
    lender = _Lender()
    queue = iter(records)

    async def worker() -> None:
        for record in queue:
            work = await pipeline.prepare(record)
            await work.start(lender)

    # Warm up the connections and caches outside the measurement.
    for record in records[:CONCURRENCY]:
        await (await pipeline.prepare(record)).start(lender)
    queue = iter(records[CONCURRENCY:])
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await tracing.aclose()  # the last spans' export counts too
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await batcher.aclose()
    await http.aclose()
    return cpu, wall, len(records) - CONCURRENCY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of rounds, off then on")
    parser.add_argument("--kind", choices=sorted(TOPICS), default="row_update")
    parser.add_argument("--http-client", choices=("aiohttp", "pyreqwest", "httpx"), help="default: the service's")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pin_self, pin_children = (cpus[0], cpus[-1]) if len(cpus) > 1 else (None, None)
    if pin_self is not None:
        os.sched_setaffinity(0, {pin_self})
    client = cast(HttpClientKind | None, args.http_client)
    factory = RecordFactory()
    tune_garbage_collector()  # as the service runs
    port = free_port()
    repo = Path(__file__).resolve().parents[2]
    os.chdir(repo)
    results: dict[str, list[float]] = {"off": [], "on": []}
    with (
        _child(["-m", "bench.sink", "--port", "0"], pin_children, "LISTENING") as sink,
        _child(["-m", "tests.support.otlp_receiver", "--port", str(port)], pin_children, "receiving"),
    ):
        sink_url = f"http://127.0.0.1:{sink.split()[1]}"
        for r in range(args.rounds):
            for mode in ("off", "on"):
                records = _records(factory, args.kind, args.records, f"r{r}{mode}-")
                endpoint = None if mode == "off" else f"http://127.0.0.1:{port}"
                with asyncio.Runner(loop_factory=event_loop_factory("uvloop")) as runner:  # the service's loop
                    cpu, wall, count = runner.run(_round(sink_url, endpoint, records, client))
                per_record_us = cpu / count * 1e6
                results[mode].append(per_record_us)
                print(
                    f"round {r + 1} tracing {mode:3}: {count} {args.kind} in {wall:.2f}s, {count / wall:,.0f}/s,"
                    f" {per_record_us:.1f} us CPU per record",
                    flush=True,
                )
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    share = (on - off) / off
    print(f"median CPU per record: off {off:.1f} us, on {on:.1f} us: tracing costs {share:.1%}")
    print(json.dumps({"kind": args.kind, "off_us": results["off"], "on_us": results["on"], "share": round(share, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
