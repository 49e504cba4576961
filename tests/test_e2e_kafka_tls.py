"""End to end over TLS: `bridge up` as a process against a Tansu broker behind a socat TLS front (one front per mode
for the session, see tests/support/tlsfront.py), the real iii-sdk consumer through the test engine. TLS with a CA
file delivers and commits (and a dry run reads over it); mTLS with an encrypted client key delivers and its
dead letters reach a Kafka topic over the same mTLS connection settings; without a client certificate, or with
the wrong CA, the log says what the TLS layer refused and what to set."""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import wait_for
from tests.support.process import BridgeProcess
from tests.support.services import create_topics
from tests.support.tlsfront import KEY_PASSWORD, Certs, TlsKafka

PARTITIONS = 4
JOIN_S = 30.0

CONFIG = """\
version: 1
engine:
  url: ${III_URL}
  reconcile_interval_ms: 500
state_dir: state
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 1}
    dead_letter: <dead_letter>
sources:
  orders:
    kafka:
      bootstrap_servers: <bootstrap>
      topics: [<topic>]
      group_id: <group>
      commit_interval_ms: 300
      security:
<security>
      client_options: {session_timeout_ms: 3000, heartbeat_interval_ms: 500, rebalance_timeout_ms: 3000,
                       request_timeout_ms: 5000, metadata_max_age_ms: 1000}
    payload:
      id: "{{ event.id }}"
      n: "{{ event.value.n }}"
"""


def client_context(certs: Certs, *, client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if client_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


class TlsTopic:
    """A fresh topic (4 partitions) and group on a TLS broker, with the test's own TLS clients."""

    def __init__(self, kafka: TlsKafka) -> None:
        suffix = uuid.uuid4().hex[:12]
        self.kafka = kafka
        self.name, self.group = f"orders-{suffix}", f"bridge-{suffix}"
        self.options: dict[str, Any] = {
            "bootstrap_servers": kafka.bootstrap, "security_protocol": "SSL",
            "ssl_context": client_context(kafka.certs, client_cert=kafka.mode == "mtls"),
        }
        self.create(self.name)

    def create(self, name: str) -> None:
        asyncio.run(create_topics([name], PARTITIONS, **self.options))

    def produce(self, numbers: range) -> dict[int, tuple[int, int]]:
        async def run() -> list[tuple[int, int]]:
            producer = AIOKafkaProducer(**self.options, acks="all")
            await producer.start()
            try:
                futures = [await producer.send(self.name, json.dumps({"n": n}).encode(), key=f"k{n}".encode())
                           for n in numbers]
                return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
            finally:
                await producer.stop()

        return dict(zip(numbers, asyncio.run(run()), strict=True))

    def committed(self) -> dict[int, int | None]:
        async def run() -> dict[int, int | None]:
            consumer = AIOKafkaConsumer(**self.options, group_id=self.group, enable_auto_commit=False)
            await consumer.start()
            try:
                return {p: await consumer.committed(TopicPartition(self.name, p)) for p in range(PARTITIONS)}
            finally:
                await consumer.stop()

        return asyncio.run(run())

    def read(self, topic: str, count: int, timeout_s: float = JOIN_S) -> list[Any]:
        async def run() -> list[Any]:
            consumer = AIOKafkaConsumer(topic, **self.options, auto_offset_reset="earliest")
            await consumer.start()
            records: list[Any] = []
            try:
                async with asyncio.timeout(timeout_s):
                    while len(records) < count:
                        for batch in (await consumer.getmany(timeout_ms=200)).values():
                            records.extend(batch)
            except TimeoutError:
                pass
            finally:
                await consumer.stop()
            return records

        return asyncio.run(run())


def write_config(workdir: Path, bootstrap: str, topic: TlsTopic, security: dict[str, Any],
                 dead_letter: str = "{file: dead-letters.jsonl}") -> Path:
    lines = "\n".join(f"        {key}: {json.dumps(value)}" for key, value in security.items())
    text = CONFIG
    for name, value in {"bootstrap": bootstrap, "topic": topic.name, "group": topic.group, "security": lines,
                        "dead_letter": dead_letter}.items():
        text = text.replace(f"<{name}>", value)
    path = workdir / "bridge.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def bridges(tmp_path: Path, iii_engine: TestEngine) -> Iterator[Callable[..., BridgeProcess]]:
    """Factory: a started `bridge up` on ``tmp_path/bridge.yaml``; every one is killed after."""
    started: list[BridgeProcess] = []

    def start(*, dry_run: bool = False, env: dict[str, str] | None = None) -> BridgeProcess:
        proc = BridgeProcess(tmp_path / "bridge.yaml", iii_engine.url, env=env,
                             extra_args=("--dry-run",) if dry_run else ())
        started.append(proc)
        proc.start()
        if not dry_run:
            proc.wait_for_log(r"connected to the iii engine")
        return proc

    yield start
    for proc in started:
        proc.kill()


# --- delivering --------------------------------------------------------------------------------------------


def test_tls_with_a_ca_file_delivers_and_commits_and_a_dry_run_reads_over_it(
    tmp_path: Path, kafka_tls: TlsKafka, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    topic = TlsTopic(kafka_tls)
    write_config(tmp_path, kafka_tls.bootstrap, topic, {"protocol": "SSL", "ca_file": str(kafka_tls.certs.ca)})
    placed = topic.produce(range(20))
    # The dry run's own topic lookup (an admin client) and reads go over TLS too; it commits nothing.
    dry = bridges(dry_run=True)
    wait_for(lambda: len(dry.stdout().splitlines()) >= 20, JOIN_S, "the dry run printing 20 payloads")
    assert dry.stop() == 0
    assert sorted(json.loads(line)["payload"]["n"] for line in dry.stdout().splitlines()) == list(range(20))

    bridge = bridges()
    consumer.function("shop::on-order")
    consumer.bind("orders", "shop::on-order")
    wait_for(lambda: len(consumer.records("shop::on-order")) >= 20, JOIN_S, "20 calls over TLS")
    assert sorted(c["n"] for c in consumer.calls("shop::on-order")) == list(range(20))
    assert bridge.stop() == 0
    assert topic.committed() == dict(Counter(p for p, _ in placed.values()))
    assert "CERTIFICATE_VERIFY_FAILED" not in bridge.log() + dry.log()


def test_mtls_with_an_encrypted_key_delivers_and_dead_letters_to_a_kafka_topic_over_mtls(
    tmp_path: Path, kafka_mtls: TlsKafka, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    certs = kafka_mtls.certs
    topic = TlsTopic(kafka_mtls)
    dlq = f"{topic.name}-dlq"
    topic.create(dlq)
    write_config(tmp_path, kafka_mtls.bootstrap, topic, {
        "protocol": "SSL", "ca_file": str(certs.ca), "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key_encrypted), "key_password": "${KAFKA_KEY_PASSWORD}",
    }, dead_letter=f"{{kafka_topic: {dlq}}}")

    def odd_fails(payload: Any) -> Any:
        if payload["n"] % 2:
            raise RuntimeError("odd orders are refused")
        return {"ok": True}

    bridge = bridges(env={"KAFKA_KEY_PASSWORD": KEY_PASSWORD})
    consumer.function("shop::even", odd_fails)
    consumer.bind("orders", "shop::even")
    placed = topic.produce(range(20))
    wait_for(lambda: len(consumer.records("shop::even")) >= 20, JOIN_S, "20 calls over mTLS")
    letters = topic.read(dlq, 10)
    assert sorted(json.loads(m.value)["event"]["value"]["n"] for m in letters) == list(range(1, 20, 2))
    assert bridge.stop() == 0
    assert topic.committed() == dict(Counter(p for p, _ in placed.values()))
    assert KEY_PASSWORD not in bridge.log()


# --- failing clearly ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls_version", ["1.3", "1.2"])
def test_mtls_without_a_client_certificate_names_the_tls_refusal(
    tls_version: str, tmp_path: Path, kafka_mtls: TlsKafka, bridges: Callable[..., BridgeProcess],
    consumer: Consumer
) -> None:
    topic = TlsTopic(kafka_mtls)
    bootstrap = kafka_mtls.bootstrap if tls_version == "1.3" else kafka_mtls.tls12_bootstrap
    write_config(tmp_path, bootstrap, topic, {"protocol": "SSL", "ca_file": str(kafka_mtls.certs.ca)})
    bridge = bridges()
    consumer.function("shop::on-order")
    consumer.bind("orders", "shop::on-order")
    alert = 'TLS alert "certificate required"' if tls_version == "1.3" else 'TLS alert "handshake failure"'
    log = bridge.wait_for_log(r"source orders failed: .*cannot connect to Kafka", timeout=JOIN_S)
    line = next(line for line in log.splitlines() if "kafka source orders: cannot connect to Kafka" in line)
    assert f"{bootstrap}: the broker " in line and alert in line, line
    assert "set security.cert_file and key_file" in line, line


def test_a_wrong_ca_fails_with_a_certificate_verification_message(
    tmp_path: Path, kafka_tls: TlsKafka, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    topic = TlsTopic(kafka_tls)
    write_config(tmp_path, kafka_tls.bootstrap, topic, {"protocol": "SSL", "ca_file": str(kafka_tls.certs.other_ca)})
    bridge = bridges()
    consumer.function("shop::on-order")
    consumer.bind("orders", "shop::on-order")
    log = bridge.wait_for_log(r"source orders failed: .*cannot connect to Kafka", timeout=JOIN_S)
    line = next(line for line in log.splitlines() if "kafka source orders: cannot connect to Kafka" in line)
    assert "CERTIFICATE_VERIFY_FAILED" in line and "security.ca_file" in line, line
