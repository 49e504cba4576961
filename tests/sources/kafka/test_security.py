"""Kafka security settings: what `bridge validate` says about the TLS files and SASL keys, how bridge.yaml maps to
aiokafka's arguments (SASL is verified this way only: no SASL broker is installable here), which client options
each client gets, and what the connection probe names when a connection fails."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from bridge.config import check_config, load_config
from bridge.errors import DeadLetterError
from bridge.sources.kafka._conn import (
    SHARED_CLIENT_OPTIONS,
    KafkaSecurityError,
    connection_options,
    consumer_options,
    shared_options,
    ssl_context,
)
from bridge.sources.kafka._deadletter import KafkaDeadLetter
from bridge.sources.kafka._probe import bootstrap_hosts, explain_connection_failure
from bridge.sources.kafka.spec import KafkaSecurity, KafkaSourceConfig
from tests.support.tlsfront import KEY_PASSWORD, Certs, TlsKafka

Check = Callable[..., list[str]]

SOURCE = """\
version: 1
sources:
  s:
    kafka:
      bootstrap_servers: k:9093
      topics: [t]
      security: {security}
"""


@pytest.fixture
def check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Check:
    """Every problem of a one-source bridge.yaml (in the cwd, a fresh directory) whose security block is given."""
    monkeypatch.chdir(tmp_path)

    def run(security: str, env: dict[str, str] | None = None) -> list[str]:
        Path("bridge.yaml").write_text(SOURCE.format(security=security))
        _, problems = check_config(Path("bridge.yaml"), env=env or {})
        return [p.format_text() for p in problems]

    return run


def kafka_of(path: Path, env: dict[str, str] | None = None) -> KafkaSourceConfig:
    kc = load_config(path, env=env or {}).sources[0].kind_config
    assert isinstance(kc, KafkaSourceConfig)
    return kc


# --- bridge validate ---------------------------------------------------------------------------------------


def test_sasl_keys_need_a_sasl_protocol_and_a_sasl_protocol_needs_them_all(check: Check) -> None:
    assert check("{protocol: SASL_SSL}") == [
        "bridge.yaml:7:7: error[missing-key] sources.s.kafka.security: protocol SASL_SSL needs sasl_mechanism; "
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, as the cluster's SASL listener expects",
        "bridge.yaml:7:7: error[missing-key] sources.s.kafka.security: protocol SASL_SSL needs username",
        "bridge.yaml:7:7: error[missing-key] sources.s.kafka.security: protocol SASL_SSL needs password",
    ]
    assert check("{protocol: SSL, sasl_mechanism: PLAIN, password: p4ss}") == [
        "bridge.yaml:7:33: error[value] sources.s.kafka.security.sasl_mechanism: only used with protocol "
        "SASL_PLAINTEXT or SASL_SSL; protocol is SSL",
        "bridge.yaml:7:56: error[value] sources.s.kafka.security.password: only used with protocol "
        "SASL_PLAINTEXT or SASL_SSL; protocol is SSL",
    ]
    assert check("{protocol: SASL_SSL, sasl_mechanism: OAUTHBEARER, username: u, password: p}") == [
        "bridge.yaml:7:54: error[value] sources.s.kafka.security.sasl_mechanism: 'OAUTHBEARER' is not one of: "
        "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, null",
    ]


def test_ssl_without_a_ca_file_uses_the_system_trust_store_and_empty_paths_are_unset(
    check: Check, tmp_path: Path
) -> None:
    assert check("{protocol: SSL}") == []
    # An unset ${VAR:} is no file: the example configs name their files this way.
    security = "{protocol: SSL, ca_file: '${CA:}', cert_file: '${CERT:}', key_file: '${KEY:}', key_password: '${P:}'}"
    assert check(security) == []
    kc = kafka_of(tmp_path / "bridge.yaml")
    assert kc.security == KafkaSecurity(protocol="SSL")
    context = connection_options(kc)["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_tls_files_must_be_readable_pem_of_the_right_kind(check: Check, tls_certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "cert.der").write_bytes(b"\x30\x82\x01\x00" + bytes(16))
    os.mkfifo(tmp_path / "fifo")  # must not block the check
    assert check(f"{{protocol: SSL, ca_file: cert.der, cert_file: fifo, key_file: {tls_certs.ca}}}") == [
        f"bridge.yaml:7:42: error[value] sources.s.kafka.security.ca_file: {tmp_path / 'cert.der'} holds no PEM "
        "certificate (no -----BEGIN CERTIFICATE----- line); it looks like DER: convert it with openssl x509 -in FILE "
        "-inform der -out FILE.pem",
        f"bridge.yaml:7:63: error[file-missing] sources.s.kafka.security.cert_file: {tmp_path / 'fifo'} is not a "
        "regular file",
        f"bridge.yaml:7:79: error[value] sources.s.kafka.security.key_file: {tls_certs.ca} holds no PEM private key "
        "(no -----BEGIN PRIVATE KEY----- line)",
    ]


def test_a_client_key_must_belong_to_the_certificate_and_open_with_its_password(
    check: Check, tls_certs: Certs
) -> None:
    c = tls_certs
    good = f"{{protocol: SSL, ca_file: {c.ca}, cert_file: {c.client_cert}, key_file: {c.client_key}}}"
    assert check(good) == []
    encrypted = f"{{protocol: SSL, cert_file: {c.client_cert}, key_file: {c.client_key_encrypted}"
    assert check(encrypted + ", key_password: '${KP}'}", {"KP": KEY_PASSWORD}) == []
    [no_password] = check(encrypted + "}")
    assert no_password.endswith("error[value] sources.s.kafka.security.key_file: the private key is encrypted: set "
                                "security.key_password")
    [wrong] = check(encrypted + ", key_password: '${KP}'}", {"KP": "not-it"})
    assert wrong.endswith(f"error[value] sources.s.kafka.security.key_password: cannot decrypt "
                          f"{c.client_key_encrypted} with key_password: is it the right one?")
    assert "not-it" not in wrong
    [mismatch] = check(f"{{protocol: SSL, cert_file: {c.client_cert}, key_file: {c.server_key}}}")
    assert mismatch.endswith(f"error[value] sources.s.kafka.security.key_file: {c.server_key} is not the private "
                             f"key of {c.client_cert}")
    assert check("{protocol: SSL, key_password: x}") == [
        "bridge.yaml:7:33: error[value] sources.s.kafka.security.key_password: only used with key_file (an "
        "encrypted private key)",
    ]


# --- the mapping to aiokafka -------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_sasl_settings_map_to_aiokafka_arguments(mechanism: str, protocol: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bridge.yaml").write_text(textwrap.dedent(SOURCE.format(
        security=f"{{protocol: {protocol}, sasl_mechanism: {mechanism}, username: svc, password: '${{PW}}'}}")))
    with caplog.at_level(logging.DEBUG):
        kc = kafka_of(tmp_path / "bridge.yaml", {"PW": "pa55-w0rd-do-not-log"})
        options = connection_options(kc)
    assert {k: v for k, v in options.items() if k != "ssl_context"} == {
        "bootstrap_servers": "k:9093", "security_protocol": protocol, "sasl_mechanism": mechanism,
        "sasl_plain_username": "svc", "sasl_plain_password": "pa55-w0rd-do-not-log",
    }
    assert ("ssl_context" in options) == (protocol == "SASL_SSL")
    # aiokafka takes them as they are (its constructors check the mechanism and the protocol).
    consumer = AIOKafkaConsumer(**consumer_options(kc))
    producer = AIOKafkaProducer(**shared_options(kc))
    await producer.stop()
    await consumer.stop()
    assert not any("pa55-w0rd-do-not-log" in r.getMessage() for r in caplog.records)


async def test_each_client_gets_its_share_of_client_options() -> None:
    every_shared = {"client_id": "shop-bridge", "request_timeout_ms": 7000, "retry_backoff_ms": 50,
                    "metadata_max_age_ms": 1000, "connections_max_idle_ms": 60000}
    assert set(every_shared) == SHARED_CLIENT_OPTIONS
    kc = KafkaSourceConfig(bootstrap_servers="k:1", client_options={**every_shared, "fetch_max_bytes": 1024,
                                                                    "session_timeout_ms": 3000})
    # The consumer gets everything; the dead-letter producer and the dry run's admin client the shared part.
    assert consumer_options(kc).items() >= {**every_shared, "fetch_max_bytes": 1024}.items()
    assert shared_options(kc) == {**every_shared, "bootstrap_servers": "k:1", "security_protocol": "PLAINTEXT"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of them is deprecated
        admin = AIOKafkaAdminClient(**shared_options(kc))
        producer = AIOKafkaProducer(**shared_options(kc))
    await producer.stop()
    await admin.close()


def test_the_tls_context_never_prompts_for_a_key_password(tls_certs: Certs) -> None:
    c = tls_certs
    base = KafkaSecurity(protocol="SSL", ca_file=c.ca, cert_file=c.client_cert, key_file=c.client_key_encrypted)
    with pytest.raises(KafkaSecurityError, match=r"the private key is encrypted: set security\.key_password"):
        ssl_context(base)
    with pytest.raises(KafkaSecurityError, match=r"cannot decrypt it with security\.key_password"):
        ssl_context(KafkaSecurity(**{**base.__dict__, "key_password": "not-it"}))
    context = ssl_context(KafkaSecurity(**{**base.__dict__, "key_password": KEY_PASSWORD}))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 1  # only the configured CA is trusted


# --- the connection probe ----------------------------------------------------------------------------------


def test_bootstrap_hosts() -> None:
    assert bootstrap_hosts(" a:1, sasl_ssl://b:2,[::1]:3,c ,,d:x,sasl_ssl://u:p#1@e:4") == [
        ("a", 1), ("b", 2), ("::1", 3), ("c", 9092), ("e", 4)]


async def test_the_probe_names_a_protocol_mismatch_both_ways(kafka_tls: TlsKafka, kafka_broker: str) -> None:
    plain_to_tls = await explain_connection_failure(KafkaSourceConfig(bootstrap_servers=kafka_tls.bootstrap))
    assert plain_to_tls == f"{kafka_tls.bootstrap}: the listener speaks TLS: set security.protocol to SSL (or " \
                           f"SASL_SSL) and security.ca_file"
    tls_to_plain = await explain_connection_failure(KafkaSourceConfig(
        bootstrap_servers=kafka_broker, security=KafkaSecurity(protocol="SSL")), timeout_s=1.0)
    assert tls_to_plain is not None and "is this a PLAINTEXT listener?" in tls_to_plain
    assert await explain_connection_failure(KafkaSourceConfig(
        bootstrap_servers=kafka_tls.bootstrap, security=KafkaSecurity(protocol="SSL", ca_file=kafka_tls.certs.ca))
    ) is None


async def test_the_dead_letter_producer_names_a_missing_client_certificate(kafka_mtls: TlsKafka) -> None:
    kc = KafkaSourceConfig(bootstrap_servers=kafka_mtls.bootstrap,
                           security=KafkaSecurity(protocol="SSL", ca_file=kafka_mtls.certs.ca),
                           client_options={"request_timeout_ms": 3000})
    sink = KafkaDeadLetter(kc, "dlq")
    try:
        with pytest.raises(DeadLetterError) as caught:
            await sink.write({"source": "s", "event": {"id": "e-1"}, "error": {"code": "x"}})
    finally:
        await sink.close()
    assert str(caught.value) == (
        f"cannot write a dead letter to Kafka topic dlq: cannot connect to Kafka: {kafka_mtls.bootstrap}: the broker "
        "requires a client certificate (TLS alert \"certificate required\"): set security.cert_file and key_file")


def test_dead_letter_options_are_made_when_first_needed(tmp_path: Path) -> None:
    """A TLS file that cannot be loaded does not fail the bridge's start: the write is refused (and retried)."""
    kc = KafkaSourceConfig(bootstrap_servers="k:1", security=KafkaSecurity(protocol="SSL", ca_file=tmp_path / "gone"))
    sink = KafkaDeadLetter(kc, "dlq")

    async def write() -> None:
        await sink.write({"source": "s", "event": {"id": "e-1"}})

    with pytest.raises(DeadLetterError, match=r"cannot load security\.ca_file"):
        asyncio.run(write())
