"""`python -m tests.soak [--records N]`: a long drain with faults on, and the service's memory over it.

The service runs as a child process (`python -m service`, as `make chaos` and the bench run it) against a local
broker and the fake APIs (`python -m tests.support.fake_apis --no-record`, another child process) that fail a
share of calls at random: 500/502/503, connection resets and slow answers. The records are the bench's
(`bench.data`: the demo's realistic inferences, row and log updates, each update with its own id, hence its own
ordering key), with a little poison (bytes that are not Avro) mixed in, produced by the bench's bulk producer in
chunks while the service runs, so the backlog stays bounded (`--max-backlog`) and the topics' retention
(`--retention-mib` per partition) keeps the broker's disk small over ten million records; a check on every
sample fails the run if retention ever passed a partition's committed offset.

Every `--sample-s` seconds it reads the service's resident set size (VmRSS, /proc/<pid>/status) and the records
done (the group's committed offsets, summed). At the end it prints, on stdout,

    soak: records=200000 produced=200200 poison=200 dead_lettered=200 delivered=200000 calls=... drained=yes ...
    soak: peak_rss_mib=... max_rss_mib=250 ... slope_mib_per_million=... max_slope=1 ... result=pass

The slope is the least-squares fit of RSS (MiB) over records done (millions), on the samples after the warm-up
(`--warmup`, a share of the records, at least 100,000 or half of a shorter run). The run passes when the group
committed every record, exactly the poison was dead-lettered, the service delivered every valid record (at
least once) and exited 0 on SIGTERM, retention never overtook it, its peak RSS (VmHWM) stayed at most 250 MiB
and the slope below 1 MiB per million records.
The samples are kept as CSV next to the service's log (`--log-dir`, default .cache/soak/<time>).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from bench.data import PIPELINE_CONFIGS_ENV, RecordFactory
from bench.kafka import bulk_produce
from bench.procs import ServiceProcess, cpu_seconds
from tests.support.bridge import REPO, Topics, bridge_environment
from tests.support.fake_apis import FakeApiControl, Fault
from tests.support.kafka_broker import LocalKafkaBroker, create_topics, free_port

OPENLAYER_KEY: Final = "soak-openlayer-key"
HUMANLOOP_KEY: Final = "soak-humanloop-key"
KINDS: Final = ("inference", "row_update", "log_update")
MAX_RSS_MIB: Final = 250.0
MAX_SLOPE_MIB_PER_MILLION: Final = 1.0
SOAK_FAULTS: Final = (
    *[Fault(status=s) for s in (500, 502, 503) for _ in range(3)],
    *[Fault(reset=True)] * 2,
    # A slow success and a slow failure: within the read timeout, maybe past an attempt timeout (a duplicate).
    Fault(status=None, delay_s=1.0),
    Fault(status=503, delay_s=1.0),
)
"""Drawn with equal chance for a faulted call. No 429: the service halves a destination's concurrency limit on
any 429 (a token bucket's answer, see service/http/limiter.py), so 429s scattered at random through ten million calls
would make this a run of the rate-limit path, about 5 times slower (0.4% of update calls answered 429 took
60,000 updates from 2,258 to 432 records/s); `make chaos` covers 429s under a token bucket."""


@dataclass(frozen=True, slots=True)
class Options:
    records: int
    mix: tuple[float, float, float]
    fault_rate: float
    poison_every: int
    partitions: int
    chunk: int
    max_backlog: int
    retention_mib: int
    sample_s: float
    warmup: float
    stall_s: float
    seed: int
    jars: Path
    log_dir: Path


@dataclass(frozen=True, slots=True)
class Sample:
    elapsed_s: float
    done: int
    rss_kib: int
    cpu_s: float


@dataclass(slots=True)
class Run:
    """What the run observed; `problems` are the reasons it fails."""

    produced: int = 0
    poison: int = 0
    valid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    produced_all: bool = False
    drained_s: float | None = None


# -- the workload ----------------------------------------------------------------------------------------------


def poison_value(n: int) -> bytes:
    """Bytes that no schema reads: 0x7f is a negative length (-64) for the record's first string."""
    return b"\x7fsoak-poison-" + n.to_bytes(8, "big")


def with_poison(values: Iterable[bytes], every: int, start: int, run: Run) -> Iterator[bytes]:
    """`values` with one poison record after every `every` of them (numbered on from `start`); counts both."""
    for i, value in enumerate(values, start):
        yield value
        if every and (i + 1) % every == 0:
            run.poison += 1
            yield poison_value(run.poison)


def split(count: int, mix: tuple[float, float, float]) -> dict[str, int]:
    """`count` records over the three kinds by `mix` (shares summing to 1), the rounding on the last kind."""
    first = round(count * mix[0])
    second = round(count * mix[1])
    return dict(zip(KINDS, (first, second, count - first - second), strict=True))


# -- figures ---------------------------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than 3 points or no spread in x."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


def warmup_records(records: int, share: float) -> int:
    """Records done before the slope's fit: `share` of them, and at least 100,000 (half of a shorter run), so
    start-up (imports, pools and caches filling, the allocator's first arenas) stays out of it."""
    return max(int(records * share), min(100_000, records // 2))


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB; 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in KiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- processes and Kafka ---------------------------------------------------------------------------------------


class FakeApis:
    """`python -m tests.support.fake_apis --no-record` as a child process (its own interpreter, so its handlers
    never wait for this process's producer), driven through its control API; stopped by its pid."""

    def __init__(self, log_path: Path) -> None:
        self._log = log_path.open("wb")
        argv = [sys.executable, "-m", "tests.support.fake_apis", "--no-record"]
        argv += ["--openlayer-key", OPENLAYER_KEY, "--humanloop-key", HUMANLOOP_KEY]
        self._proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=self._log)
        urls: dict[str, str] = {}
        assert self._proc.stdout is not None
        while len(urls) < 3:
            line = self._proc.stdout.readline().decode()
            if not line:
                self.stop()
                raise RuntimeError(f"the fake APIs did not start; see {log_path}")
            name, _, value = line.strip().partition("=")
            urls[name] = value
        self.openlayer_url, self.humanloop_url = urls["OPENLAYER_BASE_URL"], urls["HUMANLOOP_BASE_URL"]
        self.control = FakeApiControl(urls["FAKE_APIS_URL"])

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


async def make_topics(bootstrap: str, topics: Topics, partitions: int, retention_mib: int) -> None:
    """The three topics and their DLQs, with size-based retention in small segments."""
    retention = retention_mib * 1024 * 1024
    configs = {"retention.bytes": str(retention), "segment.bytes": str(max(1 << 20, retention // 4))}
    names = topics.all() + [topics.dlq(t) for t in topics.all()]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs) for name in names])
    finally:
        await admin.close()
    await create_topics(bootstrap, dict.fromkeys(names, partitions))  # waits for every partition's leader


class Offsets:
    """The group's committed offsets against the topics' log start and end offsets, without joining the group."""

    def __init__(self, bootstrap: str, group: str, topics: list[str], dlqs: list[str], partitions: int) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._group = group
        self.tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        self.dlq_tps = [TopicPartition(t, p) for t in dlqs for p in range(partitions)]

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def close(self) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def committed(self) -> dict[TopicPartition, int]:
        found: Mapping[TopicPartition, Any] = await self._admin.list_consumer_group_offsets(self._group)
        return {tp: max(0, found[tp].offset) if tp in found else 0 for tp in self.tps}

    async def done(self) -> int:
        return sum((await self.committed()).values())

    async def ends(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        found: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
        return found

    async def overtaken(self, committed: Mapping[TopicPartition, int]) -> list[str]:
        """Partitions whose log start passed the committed offset: retention deleted records not yet done."""
        starts: dict[TopicPartition, int] = await self._consumer.beginning_offsets(self.tps)
        return [f"{tp.topic}/{tp.partition}" for tp in self.tps if starts[tp] > committed[tp]]


async def scrape(port: int) -> dict[str, float]:
    """The service's delivered and dead-lettered counters, summed over their labels."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("bridge_records_delivered_total", "bridge_records_dead_lettered_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


# -- the run ---------------------------------------------------------------------------------------------------


async def produce(o: Options, bootstrap: str, topics: Topics, offsets: Offsets, run: Run) -> None:
    """Produce `o.records` valid records (plus poison) in chunks, keeping the backlog under `o.max_backlog`."""
    factory = RecordFactory(seed=o.seed)
    names = dict(zip(KINDS, topics.all(), strict=True))
    next_id = dict.fromkeys(KINDS, 0)
    while (left := o.records - sum(run.valid.values())) > 0:
        if run.produced - await offsets.done() >= o.max_backlog:
            await asyncio.sleep(0.5)
            continue
        for kind, count in split(min(o.chunk, left), o.mix).items():
            if count <= 0:
                continue
            values = with_poison(factory.values(kind, count, "s-", next_id[kind]), o.poison_every, next_id[kind], run)
            run.produced += await bulk_produce(bootstrap, names[kind], o.partitions, values)
            run.valid[kind] += count
            next_id[kind] += count
    run.produced_all = True


async def watch(
    o: Options, service: ServiceProcess, offsets: Offsets, run: Run, producer: asyncio.Task[None], started: float
) -> None:
    """Sample RSS and progress until every record is produced and committed; fail on a stall or a death."""
    last_done, last_move = -1, time.monotonic()
    while True:
        if producer.done() and not producer.cancelled() and (error := producer.exception()) is not None:
            run.problems.append(f"the producer failed: {error!r}")
            return
        committed = await offsets.committed()
        done = sum(committed.values())
        run.samples.append(Sample(time.monotonic() - started, done, rss_kib(service.pid), cpu_seconds(service.pid)))
        if lost := await offsets.overtaken(committed):
            run.problems.append(f"retention deleted records not yet committed on {', '.join(lost[:5])}")
            return
        if service.returncode is not None:
            run.problems.append(f"the service exited with {service.returncode}:\n{service.tail()}")
            return
        if done != last_done:
            last_done, last_move = done, time.monotonic()
        elif time.monotonic() - last_move > o.stall_s:
            run.problems.append(f"no progress for {o.stall_s:.0f}s at {done} records done")
            return
        if run.produced_all and done >= run.produced:
            ends = await offsets.ends(offsets.tps)
            if all(committed[tp] >= ends[tp] for tp in offsets.tps):
                run.drained_s = time.monotonic() - started
                return
        await asyncio.sleep(o.sample_s)


async def soak(o: Options) -> int:
    o.log_dir.mkdir(parents=True, exist_ok=True)
    tag = time.strftime("%H%M%S")
    topics = Topics(f"soak-{tag}-inferences", f"soak-{tag}-row-updates", f"soak-{tag}-log-updates")
    group = f"soak-{tag}"
    run = Run()
    # Size-based retention is applied on this broker-wide interval (default 5 minutes).
    extra = {"log.retention.check.interval.ms": "10000", "log.segment.delete.delay.ms": "1000"}
    with LocalKafkaBroker(o.jars, extra) as broker:
        bootstrap = broker.bootstrap_servers
        await make_topics(bootstrap, topics, o.partitions, o.retention_mib)
        fake = FakeApis(o.log_dir / "fake-apis.log")
        service: ServiceProcess | None = None
        offsets = Offsets(bootstrap, group, topics.all(), [topics.dlq(t) for t in topics.all()], o.partitions)
        await offsets.start()
        try:
            fake.control.apply(
                {
                    "action": "random",
                    "rate": o.fault_rate,
                    "choices": [f.to_json() for f in SOAK_FAULTS],
                    "seed": o.seed,
                }
            )
            metrics_port = free_port()
            env = bridge_environment(
                bootstrap=bootstrap,
                group=group,
                topics=topics,
                openlayer_url=fake.openlayer_url,
                humanloop_url=fake.humanloop_url,
                openlayer_key=OPENLAYER_KEY,
                humanloop_key=HUMANLOOP_KEY,
                extra={
                    "BRIDGE_OPENLAYER__PIPELINE_CONFIGS": PIPELINE_CONFIGS_ENV,
                    "BRIDGE_OBSERVABILITY__LOG_LEVEL": "WARNING",
                    "BRIDGE_OBSERVABILITY__HTTP_HOST": "127.0.0.1",
                    "BRIDGE_OBSERVABILITY__HTTP_PORT": str(metrics_port),
                    # The production defaults, as the bench sets them: a busy loop is not a dead member.
                    "BRIDGE_KAFKA__COMMIT_INTERVAL_S": "1.0",
                    "BRIDGE_KAFKA__SESSION_TIMEOUT_MS": "45000",
                    "BRIDGE_KAFKA__HEARTBEAT_INTERVAL_MS": "3000",
                },
            )
            service = ServiceProcess(env, REPO, None, o.log_dir / "service.log")
            started = time.monotonic()
            producer = asyncio.create_task(produce(o, bootstrap, topics, offsets, run))
            await watch(o, service, offsets, run, producer, started)
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
            return await report(o, run, service, fake, offsets, metrics_port)
        finally:
            if service is not None and service.returncode is None:
                service.stop()
            await offsets.close()
            fake.stop()


async def report(
    o: Options, run: Run, service: ServiceProcess, fake: FakeApis, offsets: Offsets, metrics_port: int
) -> int:
    peak_mib = peak_rss_kib(service.pid) / 1024
    counters: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, OSError):
        counters = await scrape(metrics_port)
    dead_lettered = sum((await offsets.ends(offsets.dlq_tps)).values())
    calls = await asyncio.to_thread(fake.control.counts)
    code = service.stop()
    if code != 0:
        run.problems.append(f"the service exited with {code} on SIGTERM")
    delivered = int(counters.get("bridge_records_delivered_total", 0))
    if run.drained_s is None and not run.problems:
        run.problems.append("not drained")
    if dead_lettered != run.poison:
        run.problems.append(f"{dead_lettered} dead letters for {run.poison} poison records")
    if run.drained_s is not None and delivered < o.records:
        run.problems.append(f"the service counts {delivered} deliveries for {o.records} valid records")

    warmup = warmup_records(o.records, o.warmup)
    after = [(s.done / 1e6, s.rss_kib / 1024) for s in run.samples if s.done >= warmup and s.rss_kib]
    fitted = slope(after)
    max_sampled = max((s.rss_kib for s in run.samples), default=0) / 1024
    if peak_mib > MAX_RSS_MIB:
        run.problems.append(f"peak RSS {peak_mib:.0f} MiB over {MAX_RSS_MIB:.0f}")
    if fitted is None:
        run.problems.append(f"too few samples after the warm-up ({len(after)}) to fit a slope")
    elif fitted >= MAX_SLOPE_MIB_PER_MILLION:
        run.problems.append(f"RSS grows {fitted:.2f} MiB per million records after the warm-up")

    seconds = run.drained_s if run.drained_s is not None else (run.samples[-1].elapsed_s if run.samples else 0.0)
    done = run.samples[-1].done if run.samples else 0
    rate = done / seconds if seconds else 0.0
    cpu = run.samples[-1].cpu_s if run.samples else 0.0
    _write_samples(o.log_dir / "samples.csv", run.samples)
    print(
        f"soak: records={o.records} produced={run.produced} poison={run.poison} dead_lettered={dead_lettered} "
        f"delivered={delivered} calls={sum(calls.values())} drained={'yes' if run.drained_s is not None else 'no'} "
        f"seconds={seconds:.0f} records_per_s={rate:.0f} service_cpu_s={cpu:.0f} "
        f"projected_10m_min={1e7 / rate / 60 if rate else float('nan'):.0f}",
        flush=True,
    )
    shown = "n/a" if fitted is None else f"{fitted:.2f}"
    first = next((s.rss_kib / 1024 for s in run.samples if s.done >= warmup and s.rss_kib), 0.0)
    last = next((s.rss_kib / 1024 for s in reversed(run.samples) if s.rss_kib), 0.0)
    print(
        f"soak: peak_rss_mib={peak_mib:.1f} max_rss_mib={MAX_RSS_MIB:.0f} sampled_max_mib={max_sampled:.1f} "
        f"rss_after_warmup_mib={first:.1f} rss_at_end_mib={last:.1f} slope_mib_per_million={shown} "
        f"max_slope={MAX_SLOPE_MIB_PER_MILLION:g} warmup_records={warmup} samples={len(after)} "
        f"result={'fail' if run.problems else 'pass'}",
        flush=True,
    )
    for problem in run.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"logs and samples: {o.log_dir}", file=sys.stderr)
    return 1 if run.problems else 0


def _write_samples(path: Path, samples: list[Sample]) -> None:
    lines = ["elapsed_s,records_done,rss_kib,service_cpu_s"]
    lines += [f"{s.elapsed_s:.1f},{s.done},{s.rss_kib},{s.cpu_s:.2f}" for s in samples]
    path.write_text("\n".join(lines) + "\n")


def _mix(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or any(p < 0 for p in parts) or not sum(parts):
        raise argparse.ArgumentTypeError("three non-negative shares: inference,row_update,log_update")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def _parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000, help="valid records to drain (default 10M)")
    parser.add_argument("--mix", type=_mix, default=(0.5, 0.25, 0.25), help="inference,row_update,log_update shares")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of API calls that fail (random)")
    parser.add_argument("--poison-every", type=int, default=1000, help="one poison record after every N (0: none)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--chunk", type=int, default=20_000, help="records produced at a time")
    parser.add_argument("--max-backlog", type=int, default=60_000, help="produce only while fewer are not done")
    parser.add_argument("--retention-mib", type=int, default=32, help="retention.bytes per partition, in MiB")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the records before the slope's fit")
    parser.add_argument("--stall-s", type=float, default=300.0, help="fail after this long without progress")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jars", type=Path, default=REPO / ".cache" / "kafka" / "jars", help="the Kafka jars")
    parser.add_argument("--log-dir", type=Path, default=None, help="default .cache/soak/<date-time>")
    args = parser.parse_args(argv)
    log_dir = args.log_dir or REPO / ".cache" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    return Options(
        records=args.records,
        mix=args.mix,
        fault_rate=args.fault_rate,
        poison_every=args.poison_every,
        partitions=args.partitions,
        chunk=args.chunk,
        max_backlog=args.max_backlog,
        retention_mib=args.retention_mib,
        sample_s=args.sample_s,
        warmup=args.warmup,
        stall_s=args.stall_s,
        seed=args.seed,
        jars=args.jars,
        log_dir=log_dir,
    )


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
