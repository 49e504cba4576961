"""`bridge docs`: Worker Docs generated from the example configs, kept in sync with examples/, free of secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import BridgeConfig, load_config
from bridge.docs import example_bind_config, render_docs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_DIRS = sorted(p.parent for p in EXAMPLES.glob("*/bridge.yaml"))


def _load(path: Path) -> BridgeConfig:
    # An empty environment: every ${VAR:default} takes its default, as in the committed docs.
    return load_config(path, env={})


def _section(text: str, source_id: str) -> str:
    start = text.index(f"\n## `{source_id}`\n")
    end = text.find("\n## `", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_example_is_documented() -> None:
    assert [p.name for p in EXAMPLE_DIRS] == [
        "file-inbox", "kafka-orders", "kafka-tls", "postgres-outbox", "postgres-signups"]


@pytest.mark.parametrize("example", EXAMPLE_DIRS, ids=lambda p: p.name)
def test_committed_worker_docs_are_current(example: Path) -> None:
    expected = render_docs(_load(example / "bridge.yaml"))
    committed = example / "WORKER_DOCS.md"
    regenerate = (
        f"regenerate with: python -m bridge docs -c examples/{example.name}/bridge.yaml "
        f"-o examples/{example.name}/WORKER_DOCS.md"
    )
    assert committed.exists(), f"examples/{example.name}/WORKER_DOCS.md is missing; {regenerate}"
    stale = f"examples/{example.name}/WORKER_DOCS.md is stale; {regenerate}"
    assert committed.read_text(encoding="utf-8") == expected, stale


@pytest.mark.parametrize("example", EXAMPLE_DIRS, ids=lambda p: p.name)
def test_every_source_has_every_section(example: Path) -> None:
    config = _load(example / "bridge.yaml")
    text = render_docs(config)
    assert render_docs(_load(example / "bridge.yaml")) == text  # deterministic
    assert str(EXAMPLES.parent) not in text  # no machine path
    for source in config.sources:
        section = _section(text, source.id)
        assert f"| trigger type id | `{source.id}` |" in section
        assert f"| kind | {source.kind} |" in section
        assert source.description in section
        for heading in ("### Bind config", "### Payload", "### Example bind", "### Delivery"):
            assert heading in section, heading
        assert "| property | type | default | required | description |" in section
        assert "| `condition_function_id` | string | - | no |" in section
        for name, sub in ((source.bind_schema or {}).get("properties") or {}).items():
            assert re.search(rf"^\| `{re.escape(name)}` \| .* \| (yes|no) \| {re.escape(sub['description'])} \|$",
                             section, re.MULTILINE), name
        assert f'"type": "{source.id}"' in section  # Python
        assert f'type: "{source.id}"' in section  # TypeScript
        assert "iii.register_trigger({" in section and "iii.registerTrigger({" in section
        # both ways to bind: an observer of the source's observable function (iii 0.25+), args as the config
        assert f"| observable function (iii 0.25+) | `bridge::{source.id}` |" in section
        assert f'{{"function_id": "bridge::{source.id}", "args": ' in section  # Python
        assert f'{{ function_id: "bridge::{source.id}", args: ' in section  # TypeScript
        assert section.count("iii.observe(") == 2
        for bullet in ("Guarantee", "Ordering", "Retries", "Dead letters", "Back-pressure", "No binding yet",
                       "Engine outages", "Replicas"):
            assert f"- **{bullet}**: " in section, bullet
        assert f"tried up to {source.delivery.retry.max_attempts} times" in section or "not retried" in section
        assert f"at most {source.max_in_flight} events" in section


def test_kafka_orders_content() -> None:
    text = render_docs(_load(EXAMPLES / "kafka-orders" / "bridge.yaml"))
    section = _section(text, "orders.placed")
    assert "| `min_total` | number, ≥ 0 | `0` | no | only orders whose total is at least this |" in section
    assert "Kafka topics `orders`, consumer group `iii-bridge.orders.placed`" in section
    # payload_schema: its properties, and the template with the event fields it uses
    assert "| `currency` | string, matching `^[A-Z]{3}$` | yes |" in section
    assert "| `placed_at` | `{{ event.timestamp \\| datetime }}` | `timestamp` |" in section
    assert "| `order_id` | `{{ event.key }}` | `key` |" in section
    assert '"config": {"min_total": 0},' in section and "config: { min_total: 0 }," in section
    assert "**Guarantee**: at-least-once. A partition's offset is committed only up to the lowest event" in section
    assert "every 2000 ms" in section
    assert "per message key (`ordering: key`)" in section
    assert "within 10000 ms" in section and "waiting 500 ms before the first retry" in section
    assert "`./.bridge/dead-letters.jsonl`" in section
    assert "at most 128 events" in section and "partitions are paused" in section
    assert "nothing is consumed and nothing is committed until a function binds" in section
    assert "**Engine outages**: while the iii engine is unreachable (a restart, a network cut) events wait" in section
    assert "Nothing is filtered, skipped or acknowledged because of an outage" in section
    assert "up to `engine.rebind_grace_ms` (60000 ms) after the reconnect" in section
    assert "counts it in `bridge_bindings_expired_total`" in section
    assert "retried like a delivery, never taken as a skip" in section
    assert "mirror the engine's list of bindings every `engine.reconcile_interval_ms` (2000 ms)" in section
    assert "consumer group `iii-bridge.orders.placed`" in section


def test_postgres_content() -> None:
    listen = _section(render_docs(_load(EXAMPLES / "postgres-signups" / "bridge.yaml")), "users.signed_up")
    assert "**Guarantee**: at-most-once." in listen
    assert "Delivery mode `void`" in listen
    assert "Postgres LISTEN on channels `user_signup`" in listen
    assert "notifications are dropped and counted" in listen
    assert "the bridge keeps listening and notifications wait in memory" in listen
    assert "one of them listens (a Postgres advisory lock)" in listen
    assert "a standby never registers it (not at start, not on a reconnect, not after losing its lock)" in listen
    assert "This trigger type takes no options besides `condition_function_id`." not in listen
    assert "| `signed_up_at` | `{{ event.received_at }}` | `received_at` |" in listen
    outbox = _section(render_docs(_load(EXAMPLES / "postgres-outbox" / "bridge.yaml")), "payments.captured")
    assert "**Guarantee**: at-least-once. Rows of `app.payment_outbox` are claimed" in outbox
    assert "the iii queue `payments`" in outbox
    assert "`./.bridge/payments-dead-letters.jsonl`" in outbox
    assert "| `currencies` | array of string, matching `^[A-Z]{3}$` | `[]` | no |" in outbox
    assert "rows wait in the table" in outbox
    assert "They share the rows of `app.payment_outbox` (`FOR UPDATE SKIP LOCKED`)" in outbox


def test_file_content() -> None:
    section = _section(render_docs(_load(EXAMPLES / "file-inbox" / "bridge.yaml")), "invoices.received")
    assert "directory `./invoices` (top level only)" in section
    assert "moved to `./invoices-done`" in section
    assert "**Guarantee**: at-least-once across restarts." in section
    assert "versions of one file are delivered one after the other" in section
    assert '"config": {"customer": None},' in section and "config: { customer: null }," in section
    assert "files wait on disk" in section
    assert "one of them is active per watched directory (a lock on `.iii-bridge.lock` there)" in section


def test_without_payload_template_the_event_fields_are_listed(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nsources:\n  raw:\n    kafka: {bootstrap_servers: 'b:9092', topics: [t], ordering: none}\n"
        "    bind_schema:\n      type: object\n      required: [region]\n"
        "      properties:\n        region: {type: string, enum: [eu, us], description: where}\n"
        "        limit: {type: integer, examples: [10], description: how many}\n"
    )
    config = _load(tmp_path / "bridge.yaml")
    text = render_docs(config)
    assert "The function receives the whole event" in text
    for field in ("id", "topic", "partition", "offset", "key", "value", "headers", "timestamp", "timestamp_iso"):
        assert f"| `{field}` |" in text, field
    assert "| `region` | one of `\"eu\"`, `\"us\"` | - | yes | where |" in text
    assert example_bind_config(config.sources[0]) == {"region": "eu", "limit": 10}
    assert "none (`ordering: none`): up to 64 events in parallel" in text


def test_a_source_that_names_its_observable_function_is_documented_under_that_name(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nsources:\n  raw:\n    function_id: shop::order-placed\n"
        "    kafka: {bootstrap_servers: 'b:9092', topics: [t]}\n"
    )
    text = render_docs(_load(tmp_path / "bridge.yaml"))
    assert "| observable function (iii 0.25+) | `shop::order-placed` |" in text
    assert '"function_id": "shop::order-placed"' in text and "bridge::raw" not in text


def test_outage_and_replica_figures_come_from_the_engine_config(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nengine: {rebind_grace_ms: 4500, reconcile_interval_ms: 1500}\nsources:\n"
        "  raw:\n    kafka: {bootstrap_servers: 'b:9092', topics: [t]}\n"
    )
    text = render_docs(_load(tmp_path / "bridge.yaml"))
    assert "up to `engine.rebind_grace_ms` (4500 ms) after the reconnect" in text
    assert "every `engine.reconcile_interval_ms` (1500 ms)" in text


SECRETS = ("hunter2-kafka", "s3cr3t-dsn", "tok-9f8e7d", "bind-default-pw", "pw-in-description")


def test_no_secret_ever_appears(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text(f"""\
version: 1
sources:
  k:
    description: "mirror of kafka://admin:{SECRETS[4]}@broker:9092"
    kafka:
      bootstrap_servers: broker:9092
      topics: [t]
      security: {{protocol: SASL_SSL, sasl_mechanism: PLAIN, username: u, password: {SECRETS[0]}}}
    bind_schema:
      type: object
      properties:
        password: {{type: string, default: {SECRETS[3]}, description: the target's password}}
    payload:
      api_token: {SECRETS[2]}
      value: "{{{{ event.value }}}}"
  p:
    postgres:
      dsn: postgresql://app:{SECRETS[1]}@db:5432/shop
      channels: [c]
""")
    text = render_docs(_load(tmp_path / "bridge.yaml"))
    for secret in SECRETS:
        assert secret not in text, secret
    assert "| `password` | string | `\"***\"` | no | the target's password |" in text
    assert '"config": {"password": "***"},' in text


def test_cli_writes_the_file_and_prints_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = EXAMPLES / "postgres-signups" / "bridge.yaml"
    out = tmp_path / "docs.md"
    assert main(["docs", "-c", str(config), "-o", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("# Worker Docs\n")
    assert "Worker Docs of 1 trigger type(s)" in capsys.readouterr().err
    assert main(["docs", "-c", str(config)]) == 0
    assert capsys.readouterr().out == out.read_text(encoding="utf-8")
    assert main(["docs", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert main(["docs", "-c", str(config), "-o", str(tmp_path / "no" / "dir" / "x.md")]) == 2
