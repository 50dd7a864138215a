"""The bench's phases: each runs the real service against the real broker and the sink, and measures it.

Layout on a 2-core machine: the service is one process pinned to core 0 (`taskset`), as a pod with
one CPU; the sink, the Kafka broker (when the bench starts it) and the bench itself sit on core 1.

Phases, each with fresh topics (6 partitions) and a fresh consumer group, topics filled before the
service starts:
  inferences    the inference backlog (1,000,000 records by default) through Publish records;
                gives `inferences_per_s` and `peak_rss_mib` (VmHWM while draining that backlog)
  row_updates   Update record calls, sink latency 0
  row_updates_traced  the same with tracing on at 100% sampling (OTEL_TRACES_SAMPLER=always_on), spans exported
                over OTLP/HTTP to a real receiver (`tests.support.otlp_receiver`) in its own process on the other
                core; its rate over row_updates' is the tracing cost, and the receiver's span count is checked
  log_updates   Update By Reference calls, sink latency 0
  row_updates_50ms  the same row updates with 50 ms added sink latency
  latency       row updates produced at half of `row_updates_per_s` while the service runs;
                latency = sink receive time - record CreateTime, p50/p99
Throughput is measured at the sink, from its first to its last request of the phase (so service
start-up and group join are excluded); the wall time from the service's start until the group's
committed offsets reach the topic's end is reported next to it. CPU seconds of the service over the
same window are read from /proc, so `per CPU-s` figures stay comparable when other work shares the
machine.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.bridge import Topics, bridge_environment

from . import kafka
from .data import PIPELINE_CONFIGS_ENV, RecordFactory
from .procs import Profiler, ServiceProcess, Sink, cpu_seconds, inherited_environment, thread_count
from .profile import render, summarise

SERVICE_CPU, OTHER_CPU = "0", "1"
PHASES = ("inferences", "row_updates", "row_updates_traced", "log_updates", "row_updates_50ms", "latency")
_ENDPOINTS = {"inference": "publish", "row_update": "update_row", "log_update": "update_log"}
"""The sink's name for the endpoint each kind of record is delivered to."""
OPENLAYER_KEY, HUMANLOOP_KEY = "bench-openlayer-key", "bench-humanloop-key"


@dataclass(frozen=True, slots=True)
class Options:
    inference_records: int
    update_records: int
    rounds: int
    partitions: int
    concurrency: int
    latency_seconds: float
    latency_warmup_s: float
    phase_timeout_s: float
    inference_timeout_s: float
    http_client: str | None
    service_dir: Path
    profile_dir: Path | None
    profile_native: bool
    overrides: dict[str, str]
    work_dir: Path
    skip: frozenset[str]


@dataclass(slots=True)
class PhaseResult:
    name: str
    unit: str
    expected: int
    done: int = 0
    calls: int = 0
    window_s: float = 0.0
    rate: float = 0.0
    drain_s: float | None = None
    drained: bool = False
    service_cpu_util: float = 0.0
    sink_cpu_util: float = 0.0
    peak_rss_mib: float = 0.0
    capped: bool = False
    exit_code: int | None = None
    log_problems: int = 0
    """Warning and error lines in the service's log (retries, rebalances, dead letters): should be 0."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_cpu_s(self) -> float:
        return self.rate / self.service_cpu_util if self.service_cpu_util > 0 else 0.0


def merge_rounds(rounds: list[PhaseResult]) -> PhaseResult:
    """One phase's figure from its rounds: mean rate and utilisation (the machine drifts between
    rounds), totals of what was done, the worst of memory and of log problems."""
    first = rounds[0]
    n = len(rounds)
    return PhaseResult(
        name=first.name,
        unit=first.unit,
        expected=sum(r.expected for r in rounds),
        done=sum(r.done for r in rounds),
        calls=sum(r.calls for r in rounds),
        window_s=sum(r.window_s for r in rounds),
        rate=sum(r.rate for r in rounds) / n,
        drain_s=max((r.drain_s for r in rounds if r.drain_s is not None), default=None),
        drained=all(r.drained for r in rounds),
        service_cpu_util=sum(r.service_cpu_util for r in rounds) / n,
        sink_cpu_util=sum(r.sink_cpu_util for r in rounds) / n,
        peak_rss_mib=max(r.peak_rss_mib for r in rounds),
        capped=any(r.capped for r in rounds),
        exit_code=next((r.exit_code for r in rounds if r.exit_code), first.exit_code),
        log_problems=sum(r.log_problems for r in rounds),
        extra={
            **first.extra,
            "round_rates": [round(r.rate, 1) for r in rounds],
            "round_service_cpu_util": [round(r.service_cpu_util, 3) for r in rounds],
            "peak_threads": max(r.extra.get("peak_threads", 0) for r in rounds),
            **(
                {"spans_received": sum(r.extra["spans_received"] for r in rounds)}
                if all("spans_received" in r.extra for r in rounds)
                else {}
            ),
        },
    )


@dataclass(slots=True)
class _Sample:
    wall: float
    service_cpu: float
    sink_cpu: float


class Bench:
    def __init__(self, options: Options, bootstrap: str, sink: Sink, pinning: bool) -> None:
        self.o = options
        self.bootstrap = bootstrap
        self.sink = sink
        self.pinning = pinning
        self.factory = RecordFactory()
        self.run_id = time.strftime("%H%M%S")
        self.results: dict[str, PhaseResult] = {}

    @property
    def service_cpus(self) -> str | None:
        return SERVICE_CPU if self.pinning else None

    @property
    def other_cpus(self) -> str | None:
        return OTHER_CPU if self.pinning else None

    def _topics(self, phase: str) -> Topics:
        prefix = f"bench-{self.run_id}-{phase}"
        return Topics(f"{prefix}-inferences", f"{prefix}-row-updates", f"{prefix}-log-updates")

    def _environment(self, topics: Topics, group: str, phase_env: Mapping[str, str] | None = None) -> dict[str, str]:
        extra = {
            "BRIDGE_OPENLAYER__PIPELINE_CONFIGS": PIPELINE_CONFIGS_ENV,
            "BRIDGE_OBSERVABILITY__LOG_LEVEL": "WARNING",
            # Production defaults, not the tests' quick-failover ones: a loaded loop must not
            # look like a dead member and turn a throughput figure into a rebalance figure.
            "BRIDGE_KAFKA__COMMIT_INTERVAL_S": "1.0",
            "BRIDGE_KAFKA__SESSION_TIMEOUT_MS": "45000",
            "BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS": "3000",
            # No BRIDGE_DELIVERY__*: the service's concurrency is its own adaptive limit, as users run it.
        }
        if self.o.http_client is not None:
            extra["BRIDGE_DELIVERY__HTTP_CLIENT"] = self.o.http_client
        extra.update(self.o.overrides)
        extra.update(phase_env or {})  # what the phase is about (tracing on) wins over --set
        return bridge_environment(
            bootstrap=self.bootstrap,
            group=group,
            topics=topics,
            openlayer_url=f"{self.sink.base_url}/openlayer/v1",
            humanloop_url=f"{self.sink.base_url}/humanloop/v4",
            openlayer_key=OPENLAYER_KEY,
            humanloop_key=HUMANLOOP_KEY,
            extra=extra,
        )

    def delivery_settings(self) -> dict[str, Any]:
        """The delivery settings the service will run with (its HTTP client, its event loop), from its own
        `check-config` output."""
        env = inherited_environment()
        env.update(self._environment(self._topics("check"), "check"))
        done = subprocess.run(
            [sys.executable, "-m", "service", "check-config"],
            cwd=self.o.service_dir,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the service refused the bench's settings:\n{done.stderr.decode()}")
        return dict(json.loads(done.stdout)["delivery"])

    async def _prepare_topics(self, topics: Topics) -> None:
        names = topics.all() + [topics.dlq(t) for t in topics.all()]
        await kafka.make_topics(self.bootstrap, names, self.o.partitions)

    def _start_service(
        self, phase: str, topics: Topics, phase_env: Mapping[str, str] | None = None
    ) -> tuple[ServiceProcess, Profiler | None]:
        env = self._environment(topics, f"bench-{self.run_id}-{phase}", phase_env)
        service = ServiceProcess(env, self.o.service_dir, self.service_cpus, self.o.work_dir / f"service-{phase}.log")
        profiler = None
        if self.o.profile_dir is not None:
            out = self.o.profile_dir / f"{phase}.txt"
            profiler = Profiler(service.pid, out, self.other_cpus, native=self.o.profile_native)
        return service, profiler

    async def _finish(
        self, phase: str, service: ServiceProcess, profiler: Profiler | None, result: PhaseResult
    ) -> None:
        result.exit_code = service.stop()
        result.log_problems = service.problems()
        if profiler is not None and profiler.wait():
            print(render(f"profile of {phase} ({profiler.out})", summarise(profiler.out)), flush=True)

    async def backlog(
        self, phase: str, kind: str, count: int, latency_ms: float = 0.0, phase_env: Mapping[str, str] | None = None
    ) -> PhaseResult:
        """Fill one topic with `count` records, then time the service draining it (with `phase_env` added to its
        environment)."""
        topics = self._topics(phase)
        topic = {"inference": topics.inferences, "row_update": topics.row_updates, "log_update": topics.log_updates}
        topic_name, endpoint = topic[kind], _ENDPOINTS[kind]
        result = PhaseResult(phase, "rows/s" if kind == "inference" else "calls/s", count)
        await self._prepare_topics(topics)
        filled_at = time.monotonic()
        values = self.factory.values(kind, count, phase[:3] + "-")
        await kafka.bulk_produce(self.bootstrap, topic_name, self.o.partitions, values)
        print(f"  [{phase}] produced {count:,} records in {time.monotonic() - filled_at:.1f}s", flush=True)
        await self.sink.reset(latency_ms)
        service, profiler = self._start_service(phase, topics, phase_env)
        started = time.time()
        samples: list[_Sample] = []
        stats: dict[str, Any] = {}
        try:
            timeout_s = self.o.inference_timeout_s if kind == "inference" else self.o.phase_timeout_s
            deadline = time.monotonic() + timeout_s
            while True:
                await asyncio.sleep(0.25)
                stats = (await self.sink.stats())["endpoints"].get(endpoint, {})
                if service.returncode is not None:
                    raise RuntimeError(f"the service exited with {service.returncode}:\n{service.tail()}")
                samples.append(_Sample(time.time(), service.cpu_seconds(), cpu_seconds(self.sink.pid)))
                result.peak_rss_mib = service.peak_rss_mib()
                result.extra["peak_threads"] = max(result.extra.get("peak_threads", 0), thread_count(service.pid))
                done = stats.get("rows", 0)
                if done >= count:
                    break
                if time.monotonic() > deadline:
                    result.capped = True
                    break
            group = f"bench-{self.run_id}-{phase}"
            result.drained, result.drain_s = await self._drained(group, topic_name, started)
            result.peak_rss_mib = service.peak_rss_mib()
        finally:
            await self._finish(phase, service, profiler, result)
        result.done = stats.get("rows", 0)
        result.calls = stats.get("calls", 0)
        first, last = stats.get("first", 0.0), stats.get("last", 0.0)
        result.window_s = max(last - first, 1e-9)
        result.rate = result.done / result.window_s if result.calls > 1 else 0.0
        result.service_cpu_util, result.sink_cpu_util = _utilisation(samples, first, last)
        if result.calls:
            result.extra["rows_per_call"] = round(result.done / result.calls, 1)
        await kafka.delete_topics(self.bootstrap, topics.all() + [topics.dlq(t) for t in topics.all()])
        self.results[phase] = result
        return result

    async def _drained(self, group: str, topic: str, started: float) -> tuple[bool, float | None]:
        """Wait (bounded) until the group committed the whole topic; the wall time from service start."""
        async with kafka.Progress(self.bootstrap, group, topic, self.o.partitions) as progress:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if await progress.remaining() == 0:
                    return True, time.time() - started
                await asyncio.sleep(0.2)
        return False, None

    async def latency(self, rate: float) -> PhaseResult:
        """Row updates produced at `rate` while the service runs; produce-to-API latency per record.

        The producer runs `latency_warmup_s` before the measured `latency_seconds`, at the same rate:
        a fresh process needs a few seconds to reach its steady state (see `by_second`), and the
        target is about the steady state.
        """
        phase = "latency"
        topics = self._topics(phase)
        seconds, warmup = self.o.latency_seconds, self.o.latency_warmup_s
        result = PhaseResult(phase, "calls/s", int(rate * seconds))
        await self._prepare_topics(topics)
        await self.sink.reset()
        service, profiler = self._start_service(phase, topics)
        try:
            warm = 500  # the group joins and connections open before the clock starts
            await kafka.bulk_produce(
                self.bootstrap, topics.row_updates, self.o.partitions, self.factory.values("row_update", warm, "wrm-")
            )
            deadline = time.monotonic() + 90
            while (await self.sink.stats())["endpoints"].get("update_row", {}).get("calls", 0) < warm:
                if service.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not warm up (exit {service.returncode}):\n{service.tail()}")
                await asyncio.sleep(0.2)
            await self.sink.reset(track=True)
            prefix = "lat-"
            count = int(rate * (seconds + warmup)) + 1
            pairs = zip(
                (self.factory.record_id(prefix, n) for n in range(count)),
                self.factory.values("row_update", count, prefix),
                strict=True,
            )
            cpu0, wall0 = service.cpu_seconds(), time.time()
            stamps = await kafka.paced_produce(self.bootstrap, topics.row_updates, pairs, rate, warmup + seconds)
            deadline = time.monotonic() + 60
            while (await self.sink.stats())["endpoints"].get("update_row", {}).get("calls", 0) < len(stamps):
                if time.monotonic() > deadline:
                    result.capped = True
                    break
                await asyncio.sleep(0.1)
            result.service_cpu_util = (service.cpu_seconds() - cpu0) / (time.time() - wall0)
            received = await self.sink.ids()
            result.peak_rss_mib = service.peak_rss_mib()
        finally:
            await self._finish(phase, service, profiler, result)
        pairs_ms = [(stamps[i], (at - stamps[i]) * 1000) for i, at in received if i in stamps]
        measured_from = min(stamps.values(), default=0.0) + warmup
        latencies = sorted(ms for produced, ms in pairs_ms if produced >= measured_from)
        result.expected = sum(1 for produced in stamps.values() if produced >= measured_from)
        result.done = result.calls = len(latencies)
        result.window_s = seconds
        result.rate = result.expected / seconds
        if latencies:
            result.extra = {
                "p50_ms": _percentile(latencies, 50),
                "p99_ms": _percentile(latencies, 99),
                "max_ms": latencies[-1],
                "mean_ms": statistics.fmean(latencies),
                "warmup_s": warmup,
                "by_second": _by_second(pairs_ms),
            }
        await kafka.delete_topics(self.bootstrap, topics.all() + [topics.dlq(t) for t in topics.all()])
        self.results[phase] = result
        return result


def _by_second(pairs_ms: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """(p50, max) latency in ms of the records produced in each second: a stall shows as a spike, a
    service that cannot keep up as a ramp."""
    if not pairs_ms:
        return []
    start = min(produced for produced, _ in pairs_ms)
    seconds: dict[int, list[float]] = {}
    for produced, ms in pairs_ms:
        seconds.setdefault(int(produced - start), []).append(ms)
    out = []
    for second in sorted(seconds):
        values = sorted(seconds[second])
        out.append((round(_percentile(values, 50)), round(values[-1])))
    return out


def _percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def _utilisation(samples: list[_Sample], first: float, last: float) -> tuple[float, float]:
    """Service and sink CPU per wall second over the samples inside [first, last]."""
    inside = [s for s in samples if first <= s.wall <= last] or samples[-2:]
    if len(inside) < 2:
        return 0.0, 0.0
    wall = inside[-1].wall - inside[0].wall
    if wall <= 0:
        return 0.0, 0.0
    return (inside[-1].service_cpu - inside[0].service_cpu) / wall, (inside[-1].sink_cpu - inside[0].sink_cpu) / wall
