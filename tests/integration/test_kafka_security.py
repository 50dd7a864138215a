"""Secure Kafka end to end: the real service against its own local broker with SASL_SSL (SCRAM-SHA-512,
SCRAM-SHA-256, PLAIN), TLS with a CA generated at test time, and mutual TLS. Each positive case produces
Avro records over the secured listener, runs the bridge on that listener only, and checks that the fake
APIs got every record, a rejected one was dead-lettered (the DLQ producer uses the same security) and the
offsets were committed. Negative cases: a wrong SASL password, a client that does not trust the broker's CA
and a client without an acceptable certificate on the mTLS listener all fail at start-up, promptly, with the
cause in the logs; an encrypted client key is refused in one line instead of OpenSSL prompting for a
passphrase. The SASL passwords never reach the service's log output nor `check-config`'s output.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from service.app import run, secrets_of
from service.config.settings import Settings, load_settings
from service.core.errors import BridgeError
from service.ops.logging import JsonFormatter
from service.ops.redaction import Redactor
from tests.integration.cases import CASES, HUMANLOOP_KEY, OPENLAYER_KEY, PARTITIONS, is_marked
from tests.support.avro_io import AvroEncoder
from tests.support.bridge import REPO, Topics, bridge_environment, running_bridge
from tests.support.fake_apis import FakeApiServer, Fault
from tests.support.kafka_broker import LocalKafkaBroker, create_topics
from tests.support.kafka_io import all_committed, committed, eventually, read_all
from tests.support.tls import TlsFiles, generate_tls

pytestmark = pytest.mark.kafka

USER = "alice"
# Distinct, greppable values: a leak of either one in a log line or in check-config output is caught.
SCRAM_PASSWORD = "scram-pw-7Hq2xV9kLm4"
PLAIN_PASSWORD = "plain-pw-3Rt8yN1wQz6"
WRONG_PASSWORD = "wrong-pw-5Jd0cP7uBe2"
SECRETS = (SCRAM_PASSWORD, PLAIN_PASSWORD, WRONG_PASSWORD)
ENCODER = AvroEncoder()
RECORDS = 3
"""Records per topic in a positive run; the inference topic's record 1 is rejected and dead-lettered."""
REJECTED = 1

# Listener name -> index into LocalKafkaBroker.extra_ports ({xport}, {xport2}, {xport3}).
SASL_SSL, MTLS, TLS = 0, 1, 2


def broker_properties(tls: TlsFiles) -> dict[str, str]:
    """PLAINTEXT stays on {port} (readiness, inter-broker, test bookkeeping); three secured listeners."""
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return {
        "listeners": (
            "PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport},"
            "SASL_SSL://127.0.0.1:{xport},MTLS://127.0.0.1:{xport2},TLS://127.0.0.1:{xport3}"
        ),
        "advertised.listeners": (
            "PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{xport},"
            "MTLS://127.0.0.1:{xport2},TLS://127.0.0.1:{xport3}"
        ),
        "listener.security.protocol.map": (
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,MTLS:SSL,TLS:SSL"
        ),
        # Kafka 4.x reads PEM directly: the keystore file is the PKCS#8 key followed by the chain.
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca_cert),
        "ssl.client.auth": "none",
        "listener.name.mtls.ssl.client.auth": "required",
        "sasl.enabled.mechanisms": "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.plain.sasl.jaas.config": (
            f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{USER}="{PLAIN_PASSWORD}";'
        ),
    }


@dataclass(frozen=True, slots=True)
class SecuredBroker:
    broker: LocalKafkaBroker
    tls: TlsFiles

    @property
    def plaintext(self) -> str:
        return self.broker.bootstrap_servers

    def address(self, listener: int) -> str:
        return f"127.0.0.1:{self.broker.extra_ports[listener]}"


@dataclass(frozen=True, slots=True)
class Security:
    """One way of connecting: which listener, and what the bridge and a test client are given."""

    name: str
    listener: int
    protocol: str
    mechanism: str | None = None
    password: str | None = None
    cafile: Callable[[TlsFiles], Path | None] = lambda tls: tls.ca_cert
    client_cert: Callable[[TlsFiles], tuple[Path, Path] | None] = lambda tls: None

    def environment(self, tls: TlsFiles) -> dict[str, str]:
        env = {"BRIDGE_KAFKA__SECURITY_PROTOCOL": self.protocol}
        if self.mechanism is not None and self.password is not None:
            env["BRIDGE_KAFKA__SASL_MECHANISM"] = self.mechanism
            env["BRIDGE_KAFKA__SASL_USERNAME"] = USER
            env["BRIDGE_KAFKA__SASL_PASSWORD"] = self.password
        if (cafile := self.cafile(tls)) is not None:
            env["BRIDGE_KAFKA__SSL_CAFILE"] = str(cafile)
        if (pair := self.client_cert(tls)) is not None:
            env["BRIDGE_KAFKA__SSL_CERTFILE"], env["BRIDGE_KAFKA__SSL_KEYFILE"] = str(pair[0]), str(pair[1])
        return env

    def client_options(self, tls: TlsFiles) -> dict[str, Any]:
        """aiokafka options for the test's own producer, built here and not by `service.kafka.clients`,
        so a mapping bug in the service cannot be hidden by a test client that shares it."""
        cafile = self.cafile(tls)
        context = ssl.create_default_context(cafile=None if cafile is None else str(cafile))
        if (pair := self.client_cert(tls)) is not None:
            context.load_cert_chain(pair[0], pair[1])
        options: dict[str, Any] = {"security_protocol": self.protocol, "ssl_context": context}
        if self.mechanism is not None:
            options.update(sasl_mechanism=self.mechanism, sasl_plain_username=USER, sasl_plain_password=self.password)
        return options


def _client_pair(tls: TlsFiles) -> tuple[Path, Path]:
    return tls.client_cert, tls.client_key


SCRAM_512 = Security("sasl_ssl-scram-sha-512", SASL_SSL, "SASL_SSL", "SCRAM-SHA-512", SCRAM_PASSWORD)
SCRAM_256 = Security("sasl_ssl-scram-sha-256", SASL_SSL, "SASL_SSL", "SCRAM-SHA-256", SCRAM_PASSWORD)
PLAIN = Security("sasl_ssl-plain", SASL_SSL, "SASL_SSL", "PLAIN", PLAIN_PASSWORD)
TLS_CUSTOM_CA = Security("ssl-custom-ca", TLS, "SSL")
MUTUAL_TLS = Security("ssl-mtls", MTLS, "SSL", client_cert=_client_pair)
WORKING = [SCRAM_512, SCRAM_256, PLAIN, TLS_CUSTOM_CA, MUTUAL_TLS]


@pytest.fixture(scope="module")
def secured(kafka_jars_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    # Its own broker: the session broker stays PLAINTEXT-only for every other test.
    tls = generate_tls(tmp_path_factory.mktemp("tls"))
    with LocalKafkaBroker(kafka_jars_dir, broker_properties(tls), scram_users={USER: SCRAM_PASSWORD}) as broker:
        yield SecuredBroker(broker, tls)


@pytest.fixture
async def secured_topics(secured: SecuredBroker, unique_name: Callable[[str], str]) -> Topics:
    names = Topics(unique_name("inferences"), unique_name("row-updates"), unique_name("log-updates"))
    # Created over PLAINTEXT: topic set-up is bookkeeping, not what is under test.
    await create_topics(secured.plaintext, {t: PARTITIONS for t in names.all() + [names.dlq(t) for t in names.all()]})
    return names


def _bridge_env(
    secured: SecuredBroker, security: Security, topics: Topics, fake: FakeApiServer, group: str
) -> dict[str, str]:
    return bridge_environment(
        bootstrap=secured.address(security.listener),
        group=group,
        topics=topics,
        openlayer_url=fake.openlayer_base_url,
        humanloop_url=fake.humanloop_base_url,
        openlayer_key=OPENLAYER_KEY,
        humanloop_key=HUMANLOOP_KEY,
        extra=security.environment(secured.tls),
    )


async def _produce_secured(bootstrap: str, options: dict[str, Any], topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", **options)
    try:
        await producer.start()  # a start that fails still leaves a client to close
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, key=f"k{i}".encode())
    finally:
        await producer.stop()


def _emitted(record: logging.LogRecord) -> bool:
    """Whether the service's logging would write this record at all: `configure_logging` keeps aiokafka at
    WARNING or above whatever the root level. (At DEBUG, aiokafka logs every request it sends, and a SASL
    PLAIN SaslAuthenticateRequest carries the password in clear, so that level must stay off.)"""
    return not record.name.startswith("aiokafka") or record.levelno >= logging.WARNING


def _leaks(records: list[logging.LogRecord], settings: Settings | None = None) -> list[str]:
    """Records that would put a SASL password in the service's log output.

    Two checks: no record the service emits carries a secret in its message, arguments, `extra=` fields
    or exception, even before redaction; and every captured record, DEBUG included, comes out of the
    service's own formatter and redactor without one.
    """
    found = []
    formatter = JsonFormatter(Redactor(secrets_of(settings))) if settings is not None else None
    for record in records:
        text = record.getMessage() + repr(vars(record))
        if record.exc_info and record.exc_info[1] is not None:
            text += repr(record.exc_info[1])
        if _emitted(record):
            found += [f"raw {record.name}: {record.getMessage()}" for secret in SECRETS if secret in text]
        if formatter is not None:
            line = formatter.format(record)
            found += [f"formatted {record.name}: {line}" for secret in SECRETS if secret in line]
    return found


@pytest.mark.parametrize("security", WORKING, ids=[s.name for s in WORKING])
async def test_bridge_delivers_and_commits_over_a_secured_listener(
    security: Security,
    secured: SecuredBroker,
    secured_topics: Topics,
    fake_apis: FakeApiServer,
    unique_name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything any library logs, so a leak anywhere is seen
    bootstrap = secured.address(security.listener)
    fake_apis.reject_when("publish", is_marked, Fault(status=422, body={"code": 422, "error": "rejected row"}))
    for case in CASES:
        rejected = REJECTED if case.kind == "inference" else -1
        values = [ENCODER.plain(case.kind, case.datum(i, i == rejected)) for i in range(RECORDS)]
        await _produce_secured(bootstrap, security.client_options(secured.tls), case.topic_of(secured_topics), values)

    group = unique_name("bridge")
    env = _bridge_env(secured, security, secured_topics, fake_apis, group)
    async with running_bridge(env) as settings:
        assert settings.kafka.bootstrap_servers == bootstrap  # the bridge only knows the secured listener
        for case in CASES:
            topic = case.topic_of(secured_topics)
            done = partial(all_committed, secured.plaintext, group, topic)
            await eventually(done, what=f"{topic} committed")

    for case in CASES:
        topic = case.topic_of(secured_topics)
        delivered = sorted(
            ident
            for r in fake_apis.requests(case.endpoint)
            if r.status == 200
            for ident in case.identities(r.query, r.json)
        )
        expected_ok = [i for i in range(RECORDS) if not (case.kind == "inference" and i == REJECTED)]
        assert delivered == sorted(case.identity(*case.expected(i, False)[2:]) for i in expected_ok)
        assert sum((await committed(secured.plaintext, group, topic)).values()) == RECORDS
        letters = await read_all(secured.plaintext, secured_topics.dlq(topic))
        assert len(letters) == (1 if case.kind == "inference" else 0), (
            "the DLQ producer wrote through the same security"
        )
    assert _leaks(caplog.records, settings) == []


async def test_wrong_scram_password_fails_start_up_and_says_why(
    secured: SecuredBroker,
    secured_topics: Topics,
    fake_apis: FakeApiServer,
    unique_name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = replace(SCRAM_512, password=WRONG_PASSWORD)
    settings = load_settings(_bridge_env(secured, wrong, secured_topics, fake_apis, unique_name("bridge")))
    error = await _start_up_error(settings)  # within its hang guard: it is refused, not retried
    assert secured.address(SASL_SSL).split(":")[1] in str(error)
    # aiokafka's exception only says "Unable to bootstrap from [...]"; the cause is in its ERROR log line.
    causes = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("aiokafka")]
    assert any("Authentication failed" in c and "SCRAM-SHA-512" in c for c in causes), causes
    assert fake_apis.requests() == []
    assert _leaks(caplog.records, settings) == []


async def _start_up_error(settings: Settings) -> BaseException:
    """Run the service and return the error it stops with at start-up (it must neither hang nor start)."""
    try:
        async with asyncio.timeout(60):  # a hang guard: the failure itself takes well under a second
            await run(settings, asyncio.Event())
    except (BridgeError, KafkaError) as exc:
        chain: list[BaseException] = [exc]
        while (cause := chain[-1].__cause__) is not None:
            chain.append(cause)
        assert any(isinstance(e, KafkaConnectionError) for e in chain), chain
        return exc
    raise AssertionError("the service ran until told to stop: it should have refused to start")


def _run_service(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=REPO,
        env={**clean, **env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal, as in a pod: nothing can prompt on /dev/tty
    )


async def test_wrong_scram_password_makes_the_process_exit_non_zero_without_leaking(
    secured: SecuredBroker, secured_topics: Topics, fake_apis: FakeApiServer, unique_name: Callable[[str], str]
) -> None:
    wrong = replace(SCRAM_512, password=WRONG_PASSWORD)
    env = _bridge_env(secured, wrong, secured_topics, fake_apis, unique_name("bridge"))
    done = await asyncio.to_thread(_run_service, env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Authentication failed" in output  # aiokafka's ERROR line, as a JSON log line on stderr
    assert "Traceback" not in output, "a refused login is an operator error, reported in one line"
    for secret in (*SECRETS, OPENLAYER_KEY, HUMANLOOP_KEY):
        assert secret not in output


@pytest.mark.parametrize(
    ("security", "cause"),
    [
        pytest.param(replace(TLS_CUSTOM_CA, cafile=lambda tls: None), "CERTIFICATE_VERIFY_FAILED", id="system-trust"),
        pytest.param(
            replace(TLS_CUSTOM_CA, cafile=lambda tls: tls.other_ca_cert), "CERTIFICATE_VERIFY_FAILED", id="wrong-ca"
        ),
        pytest.param(replace(SCRAM_512, cafile=lambda tls: None), "CERTIFICATE_VERIFY_FAILED", id="sasl-system-trust"),
        pytest.param(replace(MUTUAL_TLS, client_cert=lambda tls: None), "closed", id="mtls-no-client-cert"),
        pytest.param(
            replace(MUTUAL_TLS, client_cert=lambda tls: (tls.rogue_client_cert, tls.rogue_client_key)),
            "closed",
            id="mtls-untrusted-client-cert",
        ),
    ],
)
async def test_tls_trust_failures_stop_start_up(
    security: Security,
    cause: str,
    secured: SecuredBroker,
    secured_topics: Topics,
    fake_apis: FakeApiServer,
    unique_name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    # The test's own client fails the same way: the failure is the TLS layer's, not the service's doing.
    with pytest.raises(KafkaConnectionError):
        async with asyncio.timeout(60):
            await _produce_secured(
                secured.address(security.listener),
                security.client_options(secured.tls),
                secured_topics.inferences,
                [b"x"],
            )
    caplog.clear()
    settings = load_settings(_bridge_env(secured, security, secured_topics, fake_apis, unique_name("bridge")))
    await _start_up_error(settings)
    causes = [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka") and r.levelno >= logging.ERROR]
    assert any(cause in c for c in causes), causes
    assert _leaks(caplog.records, settings) == []
    assert await read_all(secured.plaintext, secured_topics.inferences) == [], "nothing got through"


async def test_encrypted_client_key_is_refused_with_a_clear_message(
    secured: SecuredBroker, secured_topics: Topics, fake_apis: FakeApiServer, unique_name: Callable[[str], str]
) -> None:
    encrypted = replace(MUTUAL_TLS, client_cert=lambda tls: (tls.client_cert, tls.client_key_encrypted))
    env = _bridge_env(secured, encrypted, secured_topics, fake_apis, unique_name("bridge"))
    done = await asyncio.to_thread(_run_service, env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "pass phrase" not in output, "OpenSSL must not be left to prompt for a passphrase"
    assert f"the client key {secured.tls.client_key_encrypted} is encrypted" in done.stderr
    assert "Traceback" not in output


@pytest.mark.parametrize("security", [SCRAM_512, PLAIN], ids=[SCRAM_512.name, PLAIN.name])
def test_check_config_never_prints_the_sasl_password(security: Security, tmp_path: Path) -> None:
    tls = generate_tls(tmp_path)
    env = {
        "BRIDGE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9093",
        "BRIDGE_OPENLAYER__API_KEY": OPENLAYER_KEY,
        "BRIDGE_HUMANLOOP__API_KEY": HUMANLOOP_KEY,
        **security.environment(tls),
    }
    done = _run_service(env, "check-config")
    assert done.returncode == 0, done.stderr
    assert security.password is not None
    assert security.password not in done.stdout + done.stderr
    assert '"sasl_password": "**********"' in done.stdout
    assert f'"sasl_username": "{USER}"' in done.stdout
    assert f'"sasl_mechanism": "{security.mechanism}"' in done.stdout
