"""A real single-node Kafka broker (KRaft, combined broker+controller) for tests and `make demo`,
run straight from the Maven-resolved jars because these machines have Java but no Docker engine.
`kafka_endpoint` picks, in order: `KAFKA_BOOTSTRAP_SERVERS`, testcontainers when a Docker
engine answers, then `LocalKafkaBroker`. Everything is started by pid and stopped by pid, never by name.

The jars decide the version (`make kafka-jars`: the 4.x the suite runs on; `make compat`: 3.7 and later). What
differs between versions is handled here, from the jars: Kafka 3.x logs through Log4j 1 (reload4j) and 4.x
through Log4j 2, each with its own config file and system property; the single-node quorum is dynamic
(`controller.quorum.bootstrap.servers` and `format --standalone`, KIP-853) from 3.9, static
(`controller.quorum.voters`, formatted without a flag) before; the share-group settings exist from 4.0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

# Without a config Log4j 2 logs ERROR only; keep WARN plus the "Kafka Server started" line for debugging.
_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = STDOUT
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
"""
# The same for Kafka 3.x, whose backend is Log4j 1 (reload4j): without a config it logs nothing at all.
_LOG4J1 = """log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""
# One node on loopback, internal topics shrunk to 1 partition so the first group/transaction is quick.
_SERVER_PROPERTIES = """process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
default.replication.factor=1
min.insync.replicas=1
num.partitions=1
auto.create.topics.enable=true
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
# the cleaner allocates this on the heap at start-up; the 128 MiB default would be a quarter of it
log.cleaner.dedupe.buffer.size=16777216
"""
# The quorum of one: dynamic (KIP-853, formatted with --standalone) where the version has it, else static.
_DYNAMIC_QUORUM = {"controller.quorum.bootstrap.servers": "127.0.0.1:{cport}"}
_STATIC_QUORUM = {"controller.quorum.voters": "1@127.0.0.1:{cport}"}
_SHARE_GROUP_KEYS = ("share.coordinator.",)
"""Settings a broker before 4.0 does not know (it would warn about each one)."""
# Small and quick to warm up: C1 only, serial GC (2-core CI boxes), die rather than limp on OOM.
_JVM_FLAGS = ("-Xms384m", "-Xmx512m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-XX:+ExitOnOutOfMemoryError")
_PROBE_GROUP = b"inference-bridge-readiness-probe"
_MISSING_JARS = "Kafka jars not found in {}: run `make kafka-jars` first (needs Java 17+ and Maven)."


def kafka_version(jars_dir: Path) -> tuple[int, ...]:
    """The broker version of a jars directory, from its kafka_2.13-<version>.jar: (3, 9, 2)."""
    for jar in jars_dir.glob("kafka_2.13-*.jar"):
        if found := re.fullmatch(r"kafka_2\.13-(\d+(?:\.\d+)*)\.jar", jar.name):
            return tuple(int(part) for part in found.group(1).split("."))
    raise FileNotFoundError(_MISSING_JARS.format(jars_dir))


def supports_dynamic_quorum(version: tuple[int, ...]) -> bool:
    """`kafka-storage format --standalone` and `controller.quorum.bootstrap.servers` (KIP-853): 3.9 on."""
    return version >= (3, 9)


def supports_scram_at_format(version: tuple[int, ...]) -> bool:
    """`kafka-storage format --add-scram` (KIP-900), which the SCRAM users of a KRaft node need: 3.5 on."""
    return version >= (3, 5)


def server_properties(
    version: tuple[int, ...], data: Path, ports: Mapping[str, int], extra: Mapping[str, str]
) -> dict[str, str]:
    """The node's server.properties for a Kafka version: the defaults, the quorum of one the version supports
    (dynamic from 3.9, static before), no share-group keys before 4.0, then `extra` (`{port}` etc. filled in)."""
    text = _SERVER_PROPERTIES.format(data=data, **ports)
    props = dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    quorum = _DYNAMIC_QUORUM if supports_dynamic_quorum(version) else _STATIC_QUORUM
    props.update({key: value.format(**ports) for key, value in quorum.items()})
    if version < (4,):
        props = {key: value for key, value in props.items() if not key.startswith(_SHARE_GROUP_KEYS)}
    props.update({key: value.format(**ports) for key, value in extra.items()})
    return props


def free_port() -> int:
    """A port that was free a moment ago; callers must tolerate losing the race (see start())."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster_id() -> str:
    # Kafka's own Uuid format; an id starting with "-" would be parsed as an option by argparse4j.
    cid = "-"
    while cid.startswith("-"):
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    return cid


def _find_class(jars_dir: Path, *candidates: str) -> str:
    # The StorageTool has lived in kafka_2.13 as kafka.tools.StorageTool since 3.x, but a move to the
    # tools module has been proposed more than once; look it up instead of trusting the name.
    jars = sorted(jars_dir.glob("*.jar"), key=lambda jar: not jar.name.startswith("kafka"))
    for name in candidates:
        for jar in jars:
            with zipfile.ZipFile(jar) as archive:
                if name.replace(".", "/") + ".class" in archive.NameToInfo:
                    return name
    raise RuntimeError(f"none of {candidates} found in {jars_dir}; re-run `make kafka-jars`")


def _base_dir() -> str | None:
    # tmpfs makes KRaft's fsyncs cheap; it must allow exec because zstd/snappy unpack native libs there.
    shm = "/dev/shm"
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    roomy = stat.f_bavail * stat.f_frsize > 1 << 30
    return shm if os.access(shm, os.W_OK) and roomy and not stat.f_flag & os.ST_NOEXEC else None


def _call(port: int, api_key: int, version: int, body: bytes = b"") -> bytes:
    """One request over a fresh socket (non-flexible versions only); returns the reply after its header."""
    request = struct.pack(">hhih", api_key, version, 7, 5) + b"probe" + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        reply = b""
        while len(reply) < 4 or len(reply) < 4 + int.from_bytes(reply[:4], "big"):
            if not (chunk := sock.recv(65536)):
                raise ConnectionError("broker closed the connection")
            reply += chunk
    return reply[8:]  # skip the size and the correlation id


def _ready(port: int) -> bool:
    # ApiVersions: the PLAINTEXT socket opens only once the broker is unfenced, and it speaks Kafka.
    if _call(port, 18, 0)[:2] != b"\0\0":
        return False
    group = struct.pack(">h", len(_PROBE_GROUP)) + _PROBE_GROUP
    # FindCoordinator v1 creates __consumer_offsets on a fresh node (error code after throttle time).
    if _call(port, 10, 1, group + b"\0")[4:6] != b"\0\0":
        return False
    # OffsetFetch v2 (all topics) answers COORDINATOR_LOAD_IN_PROGRESS until the offsets are loaded after a
    # (re)start. aiokafka ignores that top-level error and reports "no committed offset", so wait it out.
    return _call(port, 9, 2, group + struct.pack(">i", -1)) == b"\0" * 6


class LocalKafkaBroker:
    """One KRaft node on free 127.0.0.1 ports; `restart()` keeps its data dir, ports and cluster id.

    `extra_properties` override the defaults (e.g. SASL/SSL listeners); their values may use `{port}`
    (PLAINTEXT), `{cport}` (CONTROLLER) and `{xport}`, a spare free port kept in `extra_port`, plus
    `{xport2}` and `{xport3}` (`extra_ports` holds all three). Keep a PLAINTEXT listener on `{port}`:
    readiness is probed there. `scram_users` (name -> password) are written into the metadata at format
    time (`--add-scram`) with both SCRAM-SHA-256 and SCRAM-SHA-512 credentials.
    """

    def __init__(
        self,
        jars_dir: Path,
        extra_properties: Mapping[str, str] | None = None,
        *,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        if not any(jars_dir.glob("kafka_2.13-*.jar")):
            raise FileNotFoundError(_MISSING_JARS.format(jars_dir))
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home, "bin", "java")) if java_home else shutil.which("java")
        if java is None:
            raise FileNotFoundError("no `java` on PATH and JAVA_HOME unset: Kafka needs Java 17+")
        self._java = java
        self._jars_dir = jars_dir.resolve()
        self.version = kafka_version(self._jars_dir)
        # Log4j 2 (log4j-core) from 4.0; Log4j 1 (reload4j) before: pick the backend the jars hold.
        self._log4j2 = any(self._jars_dir.glob("log4j-core-*.jar"))
        if scram_users and not supports_scram_at_format(self.version):
            raise ValueError(f"Kafka {self.version_text} cannot create SCRAM users at format time (3.5+ can)")
        self._extra = dict(extra_properties or {})
        self._scram_users = dict(scram_users or {})
        self._work: Path | None = None
        self.port = 0
        self.controller_port = 0
        self.extra_port = 0
        self.extra_ports: tuple[int, int, int] = (0, 0, 0)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def log_path(self) -> Path:
        if self._work is None:
            raise RuntimeError("broker not started")
        return self._work / "kafka.out"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        if self._work is not None:  # formatted before: bring the same node back
            self._launch(timeout)
            return
        for attempt in range(3):
            try:
                self._format()
                self._launch(timeout)
                return
            except BaseException as exc:
                self.stop()  # the error carries the log tail; leave no half-made temp dir behind
                # Another process took a port between free_port() and bind; the controller endpoint is
                # baked into the formatted checkpoint, so retry with new ports and a fresh directory.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise

    def stop(self, keep_data: bool = False) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)  # Kafka's shutdown hook does a clean shutdown
                try:
                    self._proc.wait(20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if not keep_data and self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def restart(self, timeout: float = 90.0) -> None:
        self.stop(keep_data=True)
        self.start(timeout)

    def __enter__(self) -> LocalKafkaBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _java_cmd(self, jvm_flags: tuple[str, ...], *args: str) -> list[str]:
        assert self._work is not None
        logging = (
            f"log4j2.configurationFile={self._work}/log4j2.properties"
            if self._log4j2
            else f"log4j.configuration=file:{self._work}/log4j.properties"
        )
        props = (logging, f"java.io.tmpdir={self._work}/tmp")
        # "-cp dir/*" is expanded by the JVM itself, so no shell is involved anywhere
        return [self._java, *jvm_flags, *(f"-D{p}" for p in props), "-cp", f"{self._jars_dir}/*", *args]

    def _format(self) -> None:
        self._work = Path(tempfile.mkdtemp(prefix="ib-kafka-", dir=_base_dir()))
        (self._work / "tmp").mkdir()
        if self._log4j2:
            (self._work / "log4j2.properties").write_text(_LOG4J2)
        else:
            (self._work / "log4j.properties").write_text(_LOG4J1)
        self.port, self.controller_port, self.extra_port = free_port(), free_port(), free_port()
        self.extra_ports = (self.extra_port, free_port(), free_port())
        ports = {"port": self.port, "cport": self.controller_port, "xport": self.extra_port}
        ports.update(xport2=self.extra_ports[1], xport3=self.extra_ports[2])
        props = server_properties(self.version, self._work / "data", ports, self._extra)
        config = self._work / "server.properties"
        config.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        tool = _find_class(self._jars_dir, "kafka.tools.StorageTool", "org.apache.kafka.tools.StorageTool")
        standalone = ["--standalone"] if supports_dynamic_quorum(self.version) else []
        args = [tool, "format", *standalone, "-t", _cluster_id(), "-c", str(config)]
        for name, password in self._scram_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                # argparse4j takes this as one argument; no shell is involved, so no quoting is needed
                args += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        cmd = self._java_cmd(("-Xmx256m", "-XX:TieredStopAtLevel=1"), *args)
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kafka storage format failed:\n{(done.stdout + done.stderr).decode()}")

    def _launch(self, timeout: float) -> None:
        assert self._work is not None
        main = _find_class(self._jars_dir, "kafka.Kafka")
        self._log = self.log_path.open("ab")
        cmd = self._java_cmd(_JVM_FLAGS, main, str(self._work / "server.properties"))
        # own session: a Ctrl-C aimed at pytest must not kill the broker before teardown stops it
        self._proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        # Poll readiness against the process's exit, so a broker that dies fails fast with its log.
        while time.monotonic() < deadline and self._proc.poll() is None:
            with contextlib.suppress(OSError):
                if _ready(self.port):
                    return
            time.sleep(0.1)
        exited = self._proc.poll()
        self.stop(keep_data=True)
        tail = self.log_path.read_text(errors="replace")[-6000:]
        reason = f"exited with {exited}" if exited is not None else f"not ready after {timeout:.0f}s"
        raise RuntimeError(f"Kafka broker {reason}; tail of {self.log_path}:\n{tail}")


@dataclass(frozen=True, slots=True)
class KafkaEndpoint:
    """Where the tests' broker listens, and the local broker object when this process owns one."""

    bootstrap_servers: str
    local: LocalKafkaBroker | None


def _docker_answers() -> bool:
    # No socket file, no daemon: ask nothing. The docker SDK leaves its socket open when a connect to a missing
    # unix socket fails (its UnixHTTPConnection.connect), and that unclosed socket is an error under the
    # `filterwarnings = ["error"]` of pyproject.toml.
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host.removeprefix("unix://")).exists():
        return False
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    try:  # a short timeout: a dead DOCKER_HOST must cost seconds, never hang the session
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (OSError, docker.errors.DockerException):
        return False


@contextlib.contextmanager
def kafka_endpoint(jars_dir: Path) -> Iterator[KafkaEndpoint]:
    """Env var first, then testcontainers if Docker answers, then a local broker from the jars.

    `KAFKA_BROKER=local` skips the first two: `make compat` tests the version of its jars, never another broker.
    """
    if os.environ.get("KAFKA_BROKER") == "local":
        with LocalKafkaBroker(jars_dir) as broker:
            yield KafkaEndpoint(broker.bootstrap_servers, broker)
    elif external := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield KafkaEndpoint(external, None)
    elif _docker_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield KafkaEndpoint(str(container.get_bootstrap_server()), None)
    else:
        with LocalKafkaBroker(jars_dir) as broker:
            yield KafkaEndpoint(broker.bootstrap_servers, broker)


async def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create topics (replication 1), tolerate existing ones, return once every partition has a leader."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        async with asyncio.timeout(60):  # a guard against hanging the session, not an assertion
            response = await admin.create_topics(
                [NewTopic(name, num_partitions=count, replication_factor=1) for name, count in topics.items()]
            )
            for topic, code, *_message in response.topic_errors:
                error: type[Exception] = for_code(code)
                if code and error is not TopicAlreadyExistsError:
                    raise error(f"creating topic {topic}")
            while True:
                described: list[dict[str, Any]] = await admin.describe_topics(list(topics))
                if all(
                    t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
                    for t in described
                ):
                    return
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Kafka broker until SIGTERM/SIGINT.")
    parser.add_argument("--jars", type=Path, default=Path(".cache/kafka/jars"))
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stopping.set())
    with LocalKafkaBroker(args.jars) as broker:
        print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}", flush=True)
        print(f"broker log: {broker.log_path}", file=sys.stderr, flush=True)
        while not stopping.wait(1.0):
            if not broker.running:
                tail = broker.log_path.read_text(errors="replace")[-6000:]
                print(f"Kafka broker exited unexpectedly:\n{tail}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
