"""`make demo`: the service doing its job on a local broker and local fake APIs, start to finish.

It starts a single-node Kafka broker from the cached jars and the fake Openlayer/Humanloop server,
creates the three topics, produces a realistic mix (LLM inferences with and without their own
config, tabular rows, ground-truth updates, log outcomes, plus a few malformed and rejected
records), runs `python -m service` as a real process until the backlog is committed, and prints a
summary read back from Kafka and the fake APIs, not from the service's own say-so.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support import avro_io
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import BridgeProcess, Topics, bridge_environment
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_broker import LocalKafkaBroker, create_topics
from tests.support.kafka_io import committed, end_offsets, produce, read_all

JARS = Path(__file__).resolve().parents[2] / ".cache" / "kafka" / "jars"
PIPELINE_LLM = "182bd5e5-6e1a-4fe4-a799-aa6d9a6ab26e"
PIPELINE_TABULAR = "5f0c7a52-93d1-4c3e-8b1e-2a7f6c9d4e11"
TABULAR_CONFIG = {
    "classNames": ["no", "yes"],
    "featureNames": ["age", "geography"],
    "categoricalFeatureNames": ["geography"],
    "predictionsColumnName": "prediction",
}
PER_TOPIC = 400
PARTITIONS = 3


def _inference(i: int, rng: random.Random) -> dict[str, Any]:
    if i % 4 == 3:  # a tabular-classification pipeline whose config the operator set, not the record
        row = {"age": rng.randint(18, 90), "geography": rng.choice(["FR", "DE", "ES"]), "prediction": rng.randint(0, 1)}
        return avro_io.inference(PIPELINE_TABULAR, row)
    row = {
        "user_query": f"what is {i} + {i}?",
        "output": str(2 * i),
        "tokens": rng.randint(5, 400),
        "cost": round(rng.random() / 100, 6),
        "latency": rng.uniform(80, 2500),
        "timestamp": int(time.time()),
        "context": ["arithmetic", "demo"],
    }
    config = {
        "output_column_name": "output",
        "input_variable_names": ["user_query"],
        "num_of_token_column_name": "tokens",
        "cost_column_name": "cost",
        "latency_column_name": "latency",
        "timestamp_column_name": "timestamp",
        "prompt": [{"role": "user", "content": "{{ user_query }}"}],
        "task_type": "LLM",
    }
    return avro_io.inference(PIPELINE_LLM, row, inference_id=f"demo-{i}", config=config)


def _row_update(i: int, rng: random.Random) -> dict[str, Any]:
    row: dict[str, Any] = {"ground_truth": str(2 * i), "human_feedback": rng.choice(["thumbs_up", "thumbs_down"])}
    if i % 97 == 5:
        row = {f"col_{n}": n for n in range(101)}  # over Update record's 100-column limit
    return avro_io.row_update(PIPELINE_LLM, f"demo-{i}", row, {"ground_truth_column_name": "ground_truth"})


def _log_update(i: int, rng: random.Random) -> dict[str, Any]:
    if i % 10 == 0:
        return avro_io.log_update(f"conv-{i}", error="upstream provider timeout", duration=30.0)
    output = "REJECTED by the fake API" if i % 89 == 7 else f"The answer is {2 * i}."
    return avro_io.log_update(f"conv-{i}", output=output, duration=round(rng.uniform(0.2, 4.0), 3))


async def _fill(bootstrap: str, topics: Topics, rng: random.Random) -> dict[str, int]:
    encoder = AvroEncoder()
    makers = {
        topics.inferences: ("inference", _inference),
        topics.row_updates: ("row_update", _row_update),
        topics.log_updates: ("log_update", _log_update),
    }
    produced = {}
    for topic, (kind, make) in makers.items():
        good = [encoder.plain(kind, make(i, rng)) for i in range(PER_TOPIC)]
        values: list[bytes | None] = [*good, os.urandom(32), good[0][:7], None]  # garbage, truncated, tombstone
        await produce(bootstrap, topic, values, keys=[f"key-{i % 50}".encode() for i in range(len(values))])
        produced[topic] = len(values)
    return produced


async def _progress(bootstrap: str, group: str, topics: Topics) -> tuple[int, int]:
    done = total = 0
    for topic in topics.all():
        ends = await end_offsets(bootstrap, topic)
        total += sum(ends.values())
        done += sum((await committed(bootstrap, group, topic)).values())
    return done, total


async def _summary(bootstrap: str, group: str, topics: Topics, fake: FakeApiServer, produced: dict[str, int]) -> None:
    print("\n== summary ==")
    print(f"{'topic':<24}{'produced':>10}{'committed':>11}{'dead-lettered':>15}")
    reasons: Counter[str] = Counter()
    for topic in topics.all():
        letters = await read_all(bootstrap, topics.dlq(topic))
        for letter in letters:
            headers = {k: v.decode() for k, v in letter.headers}
            reasons[f"{topic}: {headers.get('bridge.reason')} ({headers.get('__connect.errors.stage')})"] += 1
        offsets = await committed(bootstrap, group, topic)
        print(f"{topic:<24}{produced[topic]:>10}{sum(offsets.values()):>11}{len(letters):>15}")
    print("\ncalls per endpoint (status: count)")
    for endpoint in ("publish", "update_row", "update_log"):
        statuses = Counter(r.status for r in fake.requests(endpoint))
        print(f"  {endpoint:<12}" + "  ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    print("\ndead-lettered, by reason")
    for reason, count in sorted(reasons.items()):
        print(f"  {count:>4}  {reason}")
    print("\ncommitted offsets (partition: next offset)")
    for topic in topics.all():
        print(f"  {topic:<24}{dict(sorted((await committed(bootstrap, group, topic)).items()))}")


async def main() -> int:
    rng = random.Random(7)
    topics = Topics("inferences", "inference-row-updates", "log-updates")
    with (
        tempfile.TemporaryDirectory(prefix="bridge-demo-") as work,
        LocalKafkaBroker(JARS) as broker,
        FakeApiServer(openlayer_key="demo-openlayer-key", humanloop_key="demo-humanloop-key") as fake,
    ):
        bootstrap = broker.bootstrap_servers
        print(f"kafka broker on {bootstrap}; fake APIs on {fake.base_url}")
        await create_topics(bootstrap, {t: PARTITIONS for t in topics.all() + [topics.dlq(t) for t in topics.all()]})
        produced = await _fill(bootstrap, topics, rng)
        print(f"produced {sum(produced.values())} records: {produced}")
        # A realistic API: a few transient failures (retried, never dead-lettered), some latency,
        # and a rejection rule for the records marked to be refused.
        fake.set_random_faults(
            None, 0.05, [Fault(503), Fault(429, headers={"Retry-After": "0.2"}), Fault(reset=True)], seed=1
        )
        fake.set_latency(0.005)
        fake.reject_when("update_log", lambda body: "REJECTED" in str(body), Fault(422))
        group = "inference-bridge-demo"
        env = bridge_environment(
            bootstrap=bootstrap,
            group=group,
            topics=topics,
            openlayer_url=fake.openlayer_base_url,
            humanloop_url=fake.humanloop_base_url,
            openlayer_key="demo-openlayer-key",
            humanloop_key="demo-humanloop-key",
            extra={
                "BRIDGE_OPENLAYER__PIPELINE_CONFIGS": json.dumps({PIPELINE_TABULAR: TABULAR_CONFIG}),
                "BRIDGE_OBSERVABILITY__LOG_FORMAT": "text",
                "BRIDGE_OBSERVABILITY__LOG_LEVEL": "WARNING",
            },
        )
        log_path = Path(work) / "service.log"
        service = BridgeProcess(env, log_path)
        service.start()
        print(f"service started (python -m service); its log: {log_path}")
        started = time.monotonic()
        try:
            while True:
                await asyncio.sleep(1.0)
                done, total = await _progress(bootstrap, group, topics)
                print(
                    f"  [{time.monotonic() - started:5.1f}s] committed {done}/{total}  api calls {fake.count()}",
                    flush=True,
                )
                if done == total or service.returncode is not None:
                    break
        finally:
            code = service.terminate() if service.returncode is None else service.returncode
        print(f"service stopped with exit code {code}")
        await _summary(bootstrap, group, topics, fake, produced)
        warnings = [line for line in log_path.read_text().splitlines() if "dead-lettered" in line][:3]
        if warnings:
            print("\nfirst dead-letter log lines:")
            for line in warnings:
                print("  " + line[:300])
        return 0 if code == 0 and done == total else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
