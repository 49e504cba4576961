"""The ``kafka`` kind: its config, checks, event fields, docs prose and figures. No client library here: the
consumer (:mod:`bridge.sources.kafka.source`) and the dead-letter producer load aiokafka when they are opened."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bridge._redact import redact
from bridge.sources import Figure, KindChecker, KindSpec, Source, is_set
from bridge.sources._prose import names

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig
    from bridge.config.diagnostics import Problem
    from bridge.config.yamlpos import KeyPath
    from bridge.deadletter import DeadLetterSink


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: str | None = None  # of an encrypted key_file


TLS_PROTOCOLS = ("SSL", "SASL_SSL")
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True)
class KafkaSourceConfig:
    bootstrap_servers: str
    topics: tuple[str, ...] = ()
    topic_pattern: str | None = None
    group_id: str | None = None  # None → "iii-bridge.<trigger type id>" (resolved by the loader)
    start_from: Literal["earliest", "latest"] = "earliest"
    key_format: Literal["text", "json", "bytes"] = "text"
    value_format: Literal["text", "json", "bytes"] = "json"
    ordering: Literal["partition", "key", "none"] = "partition"
    commit_interval_ms: int = 1000
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    client_options: dict[str, Any] = field(default_factory=dict)


# AIOKafkaConsumer arguments whose default the bridge changes (client_options may still set them). The client's
# own fetch sizes (50 MiB per fetch, 1 MiB per partition) make a large backlog cost memory in proportion to it; with
# these the peak is the same for 100,000 and 1,000,000 waiting records, at the same rate (README, Benchmarks).
CLIENT_OPTION_DEFAULTS: dict[str, Any] = {
    "fetch_max_bytes": 1024 * 1024,
    "max_partition_fetch_bytes": 256 * 1024,
}

# AIOKafkaConsumer arguments that client_options may not hold (the bridge sets them, or YAML cannot express
# them), each with where to go instead. Every other argument is in schemas/source-kafka.json.
MANAGED_CLIENT_OPTIONS = {
    "bootstrap_servers": "set kafka.bootstrap_servers instead",
    "group_id": "set kafka.group_id instead",
    "auto_offset_reset": "set kafka.start_from instead",
    "enable_auto_commit": "the bridge commits offsets itself (kafka.commit_interval_ms)",
    "auto_commit_interval_ms": "the bridge commits offsets itself (kafka.commit_interval_ms)",
    "key_deserializer": "set kafka.key_format instead",
    "value_deserializer": "set kafka.value_format instead",
    "security_protocol": "set kafka.security.protocol instead",
    "sasl_mechanism": "set kafka.security.sasl_mechanism instead",
    "sasl_plain_username": "set kafka.security.username instead",
    "sasl_plain_password": "set kafka.security.password instead",
    "sasl_kerberos_service_name": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "sasl_kerberos_domain_name": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "sasl_oauth_token_provider": "SASL mechanisms are PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (kafka.security)",
    "ssl_context": "set kafka.security.ca_file, cert_file and key_file instead",
    "partition_assignment_strategy": "not settable from YAML (it takes Python classes)",
    "loop": "the bridge runs the consumer on its own loop",
}

_FILES = ("ca_file", "cert_file", "key_file")
_SASL_KEYS = ("sasl_mechanism", "username", "password")


def kafka_config(source: SourceConfig) -> KafkaSourceConfig:
    """``source.kind_config`` of a kafka source."""
    kc = source.kind_config
    assert isinstance(kc, KafkaSourceConfig), f"{source.id} is a {source.kind} source"
    return kc


class KafkaSpec(KindSpec):
    name = "kafka"
    config_type = KafkaSourceConfig
    event_fields = (
        ("id", "string", "`kafka:<topic>:<partition>:<offset>`; stable, use it to de-duplicate"),
        ("source", "string", "the trigger type id"),
        ("topic", "string", "the record's topic"),
        ("partition", "integer", "the record's partition"),
        ("offset", "integer", "the record's offset"),
        ("key", "per key_format", "the record key: text, parsed JSON, or base64 of the bytes"),
        ("value", "per value_format", "the record value: text, parsed JSON, or base64 of the bytes"),
        ("headers", "object", "header name → text"),
        ("timestamp", "integer or null", "the record timestamp, epoch milliseconds"),
        ("timestamp_iso", "string or null", "the record timestamp, ISO-8601 UTC"),
    )
    sample_event: dict[str, Any] = {  # noqa: RUF012 (read-only by convention, like every spec attribute)
        "topic": "orders", "partition": 0, "offset": 42, "key": "order-42",
        "value": {"id": 42, "total": 99.5}, "headers": {"origin": "shop"},
        "timestamp": 1767225600000, "timestamp_iso": "2026-01-01T00:00:00.000Z",
    }
    figures = (
        Figure("bridge_kafka_lag", "Records between the lowest offset not done and the partition's high watermark.",
               "gauge", ("topic", "partition")),
    )
    dead_letter_key = "kafka_topic"
    reserved_options: Mapping[str, Mapping[str, str]] = {"client_options": MANAGED_CLIENT_OPTIONS}

    # -- config

    def schema(self) -> dict[str, Any]:
        from bridge.config.schemas import kind_schema

        return kind_schema(self.name)

    def build(self, source_id: str, block: dict[str, Any], resolve: Callable[[str], Path]) -> KafkaSourceConfig:
        security = dict(block.get("security") or {})
        for name in (*_FILES, "key_password"):  # "" (an unset ${VAR:}) is no file
            if security.get(name) == "":
                security[name] = None
        for name in _FILES:
            if security.get(name):
                security[name] = resolve(security[name])
        return KafkaSourceConfig(**{
            **block,
            "topics": tuple(block.get("topics") or ()),
            "group_id": block.get("group_id") or f"iii-bridge.{source_id}",
            "security": KafkaSecurity(**security),
            "client_options": dict(block.get("client_options") or {}),
        })

    def check(self, checker: KindChecker, here: KeyPath, block: dict[str, Any]) -> None:
        topics, pattern = is_set(block.get("topics")), is_set(block.get("topic_pattern"))
        if topics and pattern:
            checker.add("value", (*here, "topic_pattern"), "set either topics or topic_pattern, not both", key=True)
        elif not topics and not pattern:
            checker.require(here, ("topics", "topic_pattern"), "missing topics (or topic_pattern)",
                            "name the topics to consume: topics: [orders]")
        if pattern and isinstance(block["topic_pattern"], str):
            try:
                re.compile(block["topic_pattern"])
            except (re.error, OverflowError, RecursionError) as exc:  # a{99999999999}; ((((...)))) nested deep
                checker.add("value", (*here, "topic_pattern"), f"not a valid regular expression: {exc}")
        security = block.get("security")
        if isinstance(security, dict):
            _check_security(checker, (*here, "security"), security)

    def check_dead_letter(self, checker: KindChecker, path: KeyPath, value: Any) -> None:
        del checker, path, value  # the schema says all there is about a topic name

    def online_problems(self, config: BridgeConfig, display: str) -> list[Problem]:
        del config, display  # nothing to ask the brokers before starting
        return []

    def exclusive(self, source: SourceConfig) -> bool:
        return False  # replicas share the partitions through the consumer group

    def render_id(self, fields: dict[str, Any]) -> str | None:
        if not all(name in fields for name in ("topic", "partition", "offset")):
            return None
        return f"kafka:{fields['topic']}:{fields['partition']}:{fields['offset']}"

    def ddl(self, source: SourceConfig) -> str | None:
        return None

    # -- docs prose

    def summary(self, source: SourceConfig, base: Path) -> str:
        kc = kafka_config(source)
        topics = f"topics matching `{kc.topic_pattern}`" if kc.topic_pattern else f"topics {names(kc.topics)}"
        return (
            f"Kafka {topics}, consumer group `{redact(kc.group_id)}` (starts from {kc.start_from} when the group "
            f"has no committed offset); key as {kc.key_format}, value as {kc.value_format}"
        )

    def guarantee(self, source: SourceConfig) -> str:
        return (
            "at-least-once. A partition's offset is committed only up to the lowest event that is not done, every "
            f"{kafka_config(source).commit_interval_ms} ms, on partition revoke and on shutdown; after a crash, the "
            "events done within the last commit interval and those in flight are delivered again. `event.id` "
            "(`kafka:<topic>:<partition>:<offset>`) identifies a record for de-duplication."
        )

    def ordering(self, source: SourceConfig) -> str:
        kc = kafka_config(source)
        if kc.ordering == "partition":
            return (
                "per partition (`ordering: partition`): one event in flight per partition, so the events of a "
                "partition reach the functions one at a time, in offset order; partitions run in parallel."
            )
        if kc.ordering == "key":
            return (
                "per message key (`ordering: key`): one event in flight per key, so events with the same key "
                "arrive one at a time, in offset order; different keys run in parallel."
            )
        return f"none (`ordering: none`): up to {source.max_in_flight} events in parallel, finishing in any order."

    def back_pressure(self, source: SourceConfig) -> str:
        return "the partitions are paused, so memory stays bounded whatever the backlog."

    def unbound(self, source: SourceConfig) -> str:
        return "nothing is consumed and nothing is committed until a function binds."

    def outage_wait(self, source: SourceConfig) -> str:
        return (
            "events wait in their partitions (paused once the in-flight window is full; nothing is committed beyond "
            "what was delivered)"
        )

    def replicas(self, source: SourceConfig) -> tuple[str, str]:
        return (
            f"They share the partitions through consumer group `{redact(kafka_config(source).group_id)}`",
            "Its partitions move to the others at the group's rebalance and resume from their committed offsets, "
            "so what it had not committed is delivered again.",
        )

    def dead_letter_place(self, dead: DeadLetterConfig) -> str:
        return f"the Kafka topic `{redact(dead.kafka_topic)}` on the source's cluster"

    # -- running

    def open_source(self, source: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
        from bridge.sources.kafka.source import KafkaSource

        return KafkaSource(source, state_dir, dry_run=dry_run)

    def open_dead_letter(self, dead: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
        from bridge.sources.kafka._deadletter import kafka_dead_letter

        return kafka_dead_letter(dead, source)

    def connection(self, source: SourceConfig) -> str:
        return kafka_config(source).bootstrap_servers


def _check_security(checker: KindChecker, here: KeyPath, sec: dict[str, Any]) -> None:
    protocol = sec.get("protocol", KafkaSecurity.protocol)
    if not isinstance(protocol, str):
        return
    if protocol in SASL_PROTOCOLS:
        for name in _SASL_KEYS:
            if not is_set(sec.get(name)):
                hint = "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, as the cluster's SASL listener expects" if (
                    name == "sasl_mechanism") else None
                checker.require(here, (name,), f"protocol {protocol} needs {name}", hint)
    else:
        for name in _SASL_KEYS:
            if is_set(sec.get(name)):
                checker.add("value", (*here, name), "only used with protocol SASL_PLAINTEXT or SASL_SSL",
                            f"protocol is {protocol}", key=True)
    tls = protocol in TLS_PROTOCOLS
    usable: dict[str, Path] = {}
    for name in _FILES:
        value = sec.get(name)
        if not isinstance(value, str) or not value:
            continue
        if not tls:
            checker.add("value", (*here, name), "only used with protocol SSL or SASL_SSL",
                        f"protocol is {protocol}", key=True)
            continue
        path = checker.readable_file((*here, name), value)
        if path is not None and _pem_problem(checker, (*here, name), path, name) is None:
            usable[name] = path
    if is_set(sec.get("cert_file")) != is_set(sec.get("key_file")):
        name = "key_file" if is_set(sec.get("cert_file")) else "cert_file"
        checker.require(here, (name,), f"cert_file and key_file go together; {name} is missing")
    if is_set(sec.get("key_password")) and not is_set(sec.get("key_file")):
        checker.add("value", (*here, "key_password"), "only used with key_file (an encrypted private key)", key=True)
    if "cert_file" in usable and "key_file" in usable:
        password = sec.get("key_password")
        problem = client_cert_problem(usable["cert_file"], usable["key_file"],
                                      password if isinstance(password, str) and password else None)
        if problem is not None:
            where = "key_password" if "key_password" in problem and is_set(sec.get("key_password")) else "key_file"
            checker.add("value", (*here, where), problem)


_PEM_KINDS = {
    "ca_file": ("CERTIFICATE",),
    "cert_file": ("CERTIFICATE",),
    "key_file": ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "DSA PRIVATE KEY"),
}


def _pem_problem(checker: KindChecker, path: KeyPath, file: Path, name: str) -> str | None:
    """A problem with the content of a PEM file (reported at ``path``), or None."""
    try:
        with file.open("rb") as f:
            head = f.read(1 << 20)
    except OSError as exc:  # checked readable a moment ago; gone or changed since
        problem = f"cannot read {file}: {exc.strerror or exc}"
    else:
        found = re.findall(rb"-----BEGIN ([A-Z ]+)-----", head)
        kinds = _PEM_KINDS[name]
        if not any(kind.decode("ascii") in kinds for kind in found):
            what = "certificate" if name != "key_file" else "private key"
            problem = f"{file} holds no PEM {what} (no -----BEGIN {kinds[0]}----- line)"
            if head[:1] == b"\x30":
                problem += "; it looks like DER: convert it with openssl x509 -in FILE -inform der -out FILE.pem"
        else:
            return None
    checker.add("value", path, problem)
    return problem


def client_cert_problem(cert_file: Path, key_file: Path, password: str | None) -> str | None:
    """Why the client certificate and its key cannot be loaded together (wrong password, a key that does not
    belong to the certificate), or None. The standard library's ssl only: no client library."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(cert_file, key_file, password=key_password_callback(password))
    except KeyPasswordMissing as exc:
        return str(exc)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"{key_file} is not the private key of {cert_file}"
        if password is not None and key_is_encrypted(key_file):
            return f"cannot decrypt {key_file} with key_password: is it the right one?"
        return f"cannot load {cert_file} with {key_file}: {exc}"
    except OSError as exc:
        return f"cannot load {cert_file} with {key_file}: {exc.strerror or exc}"
    return None


def key_is_encrypted(key_file: Path) -> bool:
    """Whether a PEM private key is encrypted (PKCS#8 ``ENCRYPTED PRIVATE KEY`` or a legacy ``Proc-Type``)."""
    try:
        with key_file.open("rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in head or b"Proc-Type: 4,ENCRYPTED" in head


class KeyPasswordMissing(ValueError):
    """An encrypted private key and no ``key_password``."""


def key_password_callback(password: str | None) -> Callable[[], str]:
    """The ``password`` argument of ``SSLContext.load_cert_chain``: always a callable, so that OpenSSL never
    prompts on a terminal for the password of an encrypted key."""

    def give() -> str:
        if password is None:
            raise KeyPasswordMissing("the private key is encrypted: set security.key_password")
        return password

    return give


SPEC = KafkaSpec()
