"""`bridge render`: one sample event per kind through the example configs' templates, and every mistake."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.config import load_config
from bridge.render import event_view, render_event

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

KAFKA_EVENT = {
    "topic": "orders",
    "partition": 2,
    "offset": 41,
    "key": "order-7",
    "value": {"customer_id": "c-1", "total": 99.5, "currency": "SEK", "items": [{"sku": "A-1", "quantity": 2}]},
    "headers": {"trace": "t1"},
    "timestamp": 1700000000123,
    "timestamp_iso": "2023-11-14T22:13:20.123Z",
}
POSTGRES_EVENT = {
    "channel": "payment_captured",
    "payload": {"payment_id": "p-9", "amount_cents": 1250, "currency": "EUR"},
    "pid": None,
    "received_at": "2026-01-02T03:04:05.006Z",
}
FILE_EVENT = {
    "path": "/srv/invoices/inv-1.json",
    "relative_path": "inv-1.json",
    "name": "inv-1.json",
    "change": "created",
    "size": 64,
    "mtime": "2026-01-02T03:04:05.678Z",
    "content": {"id": "inv-1", "customer": "acme", "amount_cents": 4200},
}


def _render(
    tmp_path: Path, example: str, source: str, event: Any, *extra: str, stdin: str | None = None
) -> tuple[int, str, str]:
    """Run `bridge render` in process; (exit code, stdout, stderr)."""
    args = ["render", "-c", str(EXAMPLES / example / "bridge.yaml"), source]
    if stdin is None:
        path = tmp_path / "event.json"
        path.write_text(event if isinstance(event, str) else json.dumps(event))
        args += ["--event", str(path)]
    else:
        args += ["--event", "-"]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", err)
        mp.setattr("sys.stdin", io.StringIO(stdin or ""))
        code = main([*args, *extra])
    return code, out.getvalue(), err.getvalue()


def test_kafka_event(tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, "kafka-orders", "orders.placed", KAFKA_EVENT, "--config", '{"min_total": 50}')
    assert code == 0, err
    assert json.loads(out) == {
        "order_id": "order-7",
        "customer_id": "c-1",
        "total": 99.5,
        "currency": "SEK",
        "placed_at": "2023-11-14T22:13:20.123Z",
        "items": [{"sku": "A-1", "quantity": 2}],
    }
    assert err.splitlines() == ["when: true", "payload_schema: ok"]


def test_kafka_event_filtered_out_and_schema_violation(tmp_path: Path) -> None:
    code, _, err = _render(tmp_path, "kafka-orders", "orders.placed", KAFKA_EVENT, "--config", '{"min_total": 100}')
    assert code == 0
    assert "when: false (this binding would skip the event" in err
    event = {**KAFKA_EVENT, "value": {**KAFKA_EVENT["value"], "currency": "euro", "items": [{"sku": "A"}]}}
    code, out, err = _render(tmp_path, "kafka-orders", "orders.placed", event)
    assert code == 1
    assert json.loads(out)["currency"] == "euro"  # still shown: it is what would be dead-lettered
    assert "payload_schema: violated" in err
    assert "  $.currency: 'euro' does not match '^[A-Z]{3}$'" in err
    assert "  $.items[0]: missing required property 'quantity'" in err


def test_postgres_event_from_stdin_with_a_condition_function(tmp_path: Path) -> None:
    code, out, err = _render(
        tmp_path, "postgres-outbox", "payments.captured", None,
        "--config", '{"currencies": ["EUR"], "condition_function_id": "billing::is-big"}',
        stdin=json.dumps(POSTGRES_EVENT),
    )
    assert code == 0, err
    assert json.loads(out) == {"payment_id": "p-9", "amount_cents": 1250, "currency": "EUR"}
    assert "when: true" in err
    assert "condition: billing::is-big is not called by `bridge render`" in err
    assert "payload_schema: none configured" in err


def test_file_event_with_defaults_applied(tmp_path: Path) -> None:
    code, out, err = _render(tmp_path, "file-inbox", "invoices.received", FILE_EVENT)
    assert code == 0, err
    assert json.loads(out) == {
        "invoice_id": "inv-1",
        "customer": "acme",
        "amount_cents": 4200,
        "file": "inv-1.json",
        "received_at": "2026-01-02T03:04:05.678Z",
    }
    assert "when: true" in err  # the bind_schema default customer: null lets every invoice through
    code, _, err = _render(tmp_path, "file-inbox", "invoices.received", FILE_EVENT, "--config", '{"customer": "x"}')
    assert code == 0 and "\nwhen: false (" in f"\n{err}"


def test_bad_bind_config_names_every_violation_by_json_path(tmp_path: Path) -> None:
    code, out, err = _render(
        tmp_path, "postgres-outbox", "payments.captured", POSTGRES_EVENT,
        "--config", '{"currencies": ["EUR", "dollars"], "colour": "red"}',
    )
    assert code == 1 and out == ""
    # (the example's delivery mode enqueue draws the enqueue-observe warning first)
    assert [line for line in err.splitlines() if "warning[enqueue-observe]" not in line] == [
        "bridge: the bind config does not match the bind_schema of payments.captured:",
        "  $.currencies[1]: 'dollars' does not match '^[A-Z]{3}$'",
        "  $: unknown property 'colour' (allowed: condition_function_id, currencies)",
    ]
    code, _, err = _render(tmp_path, "postgres-outbox", "payments.captured", POSTGRES_EVENT, "--config", "{oops")
    assert code == 1 and "--config is not valid JSON" in err
    code, _, err = _render(tmp_path, "postgres-outbox", "payments.captured", POSTGRES_EVENT, "--config", "[1]")
    assert code == 1 and "  $: [1] is not of type 'object'" in err


def test_unknown_source_suggests_the_closest(tmp_path: Path) -> None:
    code, _, err = _render(tmp_path, "kafka-orders", "orders.plaed", KAFKA_EVENT)
    assert code == 2
    assert err.strip() == "bridge: no source 'orders.plaed' in bridge.yaml; did you mean 'orders.placed'? " \
                          "sources: orders.placed"


def test_event_mistakes(tmp_path: Path) -> None:
    code, _, err = _render(tmp_path, "kafka-orders", "orders.placed", '{"topic": "orders",\n "value": }')
    assert code == 1
    assert "is not valid JSON: Expecting value (line 2, column 11)" in err
    code, _, err = _render(tmp_path, "kafka-orders", "orders.placed", None, stdin="[1, 2]")
    assert code == 1
    assert "the event on stdin must be a JSON object of the kafka event fields (topic, partition" in err
    code, _, err = _render(tmp_path, "kafka-orders", "orders.placed", None, "--event", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read event file" in err and "No such file or directory" in err


def test_render_errors_exit_1_and_missing_fields_are_named(tmp_path: Path) -> None:
    event = {k: v for k, v in KAFKA_EVENT.items() if k not in ("key", "timestamp")}
    event["colour"] = "red"
    code, out, err = _render(tmp_path, "kafka-orders", "orders.placed", event)
    assert code == 1 and out == ""
    assert "note: the templates use event field(s) key, timestamp, which this event lacks" in err
    assert "note: colour is not among the fields of kafka events" in err
    assert "bridge: render error: payload.order_id: 'dict object' has no attribute 'key'" in err


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert main(["render", "-c", str(EXAMPLES / "kafka-orders" / "bridge.yaml"), "orders.placed"]) == 2
    assert main(["render", "-c", str(tmp_path / "missing.yaml"), "x", "--event", "-"]) == 2


def test_event_view_fills_id_and_source() -> None:
    source = load_config(EXAMPLES / "kafka-orders" / "bridge.yaml", env={}).sources[0]
    view = event_view(source, KAFKA_EVENT)
    assert view["id"] == "kafka:orders:2:41" and view["source"] == "orders.placed"
    assert event_view(source, {"id": "mine", "value": 1})["id"] == "mine"
    assert event_view(source, {"value": 1})["id"] == "render:orders.placed"
    rendered = render_event(source, view, {})
    assert rendered.config == {"min_total": 0} and rendered.when is True and rendered.schema_violations == ()


def test_without_payload_template_the_whole_event_is_the_payload(tmp_path: Path) -> None:
    (tmp_path / "bridge.yaml").write_text("version: 1\nsources:\n  raw:\n    file: {path: ./in}\n")
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"name": "a.txt", "content": "hi"}))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", out)
        mp.setattr("sys.stderr", io.StringIO())
        assert main(["render", "-c", str(tmp_path / "bridge.yaml"), "raw", "--event", str(event)]) == 0
    assert json.loads(out.getvalue()) == {"id": "render:raw", "source": "raw", "name": "a.txt", "content": "hi"}
