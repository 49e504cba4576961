"""Metrics and health: /metrics, /healthz and /readyz of a running bridge.

End to end: `bridge up` as a real process against the test engine with a real iii-sdk consumer, files dropped,
counters scraped, readiness following the engine. In process: a runtime in dry-run mode with a synthetic source
that exposes the figures Kafka and Postgres sources expose (``lag()``, ``gaps``, ``dropped``).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import load_config
from bridge.metrics import parse_listen
from bridge.runtime import Runtime
from bridge.sources import REGISTRY, Event, Outcome, Sample, Sink
from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import drop, wait_for
from tests.support.process import BridgeProcess

CONFIG = """\
version: 1
engine:
  url: ${III_URL}
state_dir: state
observability:
  listen: 127.0.0.1:0
  log_format: json
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 3, initial_backoff_ms: 50, jitter: 0}
sources:
  inbox:
    description: metrics test inbox
    file: {path: ./inbox, include: ["*.json"], content: json, settle_ms: 30}
    payload:
      n: "{{ event.content.n }}"
"""


def _get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page: (name, labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "bridge.yaml").write_text(CONFIG)
    return tmp_path


@pytest.fixture
def bridge(workdir: Path, iii_engine: TestEngine) -> Iterator[BridgeProcess]:
    proc = BridgeProcess(workdir / "bridge.yaml", iii_engine.url).start()
    proc.wait_for_log(r"connected to the iii engine")
    yield proc
    proc.kill()


def test_counters_move_and_readiness_follows_the_engine(
    workdir: Path, bridge: BridgeProcess, consumer: Consumer, iii_engine: TestEngine
) -> None:
    match = re.search(r"serving /metrics, /healthz and /readyz on (http://127\.0\.0\.1:\d+)", bridge.log())
    assert match, bridge.log()
    base = match.group(1)
    assert _get(f"{base}/healthz")[0] == 200
    wait_for(lambda: _get(f"{base}/readyz")[0] == 200, 10, "/readyz 200")
    assert _get(f"{base}/nothing")[0] == 404

    fails = {"left": 1}

    def flaky(payload: Any) -> Any:
        if payload["n"] == 2 and fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("once")
        return {"ok": True}

    consumer.function("m::sink", flaky)
    consumer.bind("inbox", "m::sink")
    bridge.wait_for_log(r"binding \S+ added: inbox → m::sink")
    for n in (1, 2, 3):
        drop(workdir / "inbox", f"ok{n}.json", {"n": n})
    drop(workdir / "inbox", "bad.json", {"no_n": True})  # the template fails: dead-lettered, not retried
    wait_for(lambda: len([r for r in consumer.records("m::sink") if r.outcome == "ok"]) == 3, 10, "3 deliveries")

    def done() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        samples = _samples(_get(f"{base}/metrics")[2])
        finished = sum(_value(samples, "bridge_events_done_total", trigger_type="inbox", outcome=o)
                       for o in ("delivered", "filtered", "dead_lettered"))
        # An event counts as done before its acknowledgement (a checkpoint write) ends and frees its slot.
        settled = _value(samples, "bridge_events_in_flight", trigger_type="inbox") == 0
        return samples if finished == 4 and settled else None

    samples = wait_for(done, 10, "4 events done")
    status, content_type, _ = _get(f"{base}/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert _value(samples, "bridge_events_received_total", trigger_type="inbox") == 4
    assert _value(samples, "bridge_events_done_total", trigger_type="inbox", outcome="delivered") == 3
    assert _value(samples, "bridge_events_done_total", trigger_type="inbox", outcome="dead_lettered") == 1
    assert _value(samples, "bridge_events_done_total", trigger_type="inbox", outcome="filtered") == 0
    assert _value(samples, "bridge_deliveries_total", trigger_type="inbox", outcome="ok") == 3
    assert _value(samples, "bridge_deliveries_total", trigger_type="inbox", outcome="error") == 1
    assert _value(samples, "bridge_retries_total", trigger_type="inbox") == 1
    assert _value(samples, "bridge_dead_letter_failures_total", trigger_type="inbox") == 0
    assert _value(samples, "bridge_events_in_flight", trigger_type="inbox") == 0
    assert _value(samples, "bridge_bindings", trigger_type="inbox") == 1
    assert _value(samples, "bridge_bindings_expired_total", trigger_type="inbox") == 0
    assert _value(samples, "bridge_delivery_seconds_count", trigger_type="inbox") == 3
    assert _value(samples, "bridge_delivery_seconds_bucket", trigger_type="inbox", le="+Inf") == 3
    assert 0 < _value(samples, "bridge_delivery_seconds_sum", trigger_type="inbox") < 10
    assert _value(samples, "bridge_engine_connected") == 1
    assert _value(samples, "bridge_source_running", trigger_type="inbox") == 1

    # The render failure was logged as one JSON object carrying the event and the binding.
    lines = [json.loads(line) for line in bridge.log().splitlines() if line.startswith("{")]
    failed = [e for e in lines if str(e.get("event_id", "")).startswith("file:bad.json:")]
    assert failed, lines
    assert failed[0]["level"] == "warning" and failed[0]["trigger_type"] == "inbox"
    assert failed[0]["binding_id"] and failed[0]["function_id"] == "m::sink"
    assert "dead-lettered" in failed[0]["message"] and failed[0]["logger"] == "bridge.dispatch"

    iii_engine.pause()
    wait_for(lambda: _get(f"{base}/readyz")[0] == 503, 10, "/readyz 503 while the engine is away")
    status, _, body = _get(f"{base}/readyz")
    assert status == 503 and body == "not ready: the iii engine is not connected\n"
    assert _get(f"{base}/healthz")[0] == 200
    assert _value(_samples(_get(f"{base}/metrics")[2]), "bridge_engine_connected") == 0
    iii_engine.resume()
    wait_for(lambda: _get(f"{base}/readyz")[0] == 200, 30, "/readyz 200 once the engine is back")
    assert _get(f"{base}/readyz")[2] == "ready (trigger mode)\n"  # how the sources are offered to this engine


# ---------------------------------------------------------------------------------------------------------
# in process


class _FigureSource:
    """A source reporting the figures the Kafka and Postgres kinds declare; submits two events."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def figures(self) -> dict[str, list[Sample]]:
        return {
            "bridge_kafka_lag": [(("orders", "1"), 7), (("orders", "0"), 3)],
            "bridge_postgres_listen_gaps": [((), 2)],
            "bridge_postgres_listen_dropped": [((), 5)],
        }

    async def run(self, sink: Sink) -> None:
        async def on_done(outcome: Outcome) -> None:
            return None

        for i in range(2):
            await sink.submit(Event(id=f"e{i}", source=self.config.id, fields={"n": i}), on_done)
        await asyncio.Event().wait()


async def _http(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    writer.write_eof()  # the request is all there is: a partial one is then a client that hung up
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data


async def test_source_figures_and_http_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class _FigureSpec(type(REGISTRY["file"])):  # type: ignore[misc]
        def open_source(self, source: Any, state_dir: Path, *, dry_run: bool = False) -> Any:
            return _FigureSource(source)

    monkeypatch.setitem(REGISTRY, "file", _FigureSpec())
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nobservability: {listen: '127.0.0.1:0'}\nsources:\n  s:\n    file: {path: ./in}\n"
        "    payload: {n: '{{ event.n }}'}\n"
    )
    out = io.StringIO()
    runtime = Runtime(load_config(tmp_path / "bridge.yaml"), dry_run=True, out=out)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await asyncio.wait_for(_until(lambda: runtime.runners and runtime.runners["s"].stats.delivered == 2), 5)
        assert runtime.metrics_address is not None
        port = runtime.metrics_address[1]
        runtime.tables["s"].mark_stale()  # the engine link dropped and nobody replayed the binding in time
        runtime.tables["s"].expire_stale()
        page = (await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")).decode()
        head, _, body = page.partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200 OK") and "Connection: close" in head
        samples = _samples(body)
        assert _value(samples, "bridge_kafka_lag", trigger_type="s", topic="orders", partition="0") == 3
        assert _value(samples, "bridge_kafka_lag", trigger_type="s", topic="orders", partition="1") == 7
        assert _value(samples, "bridge_postgres_listen_gaps_total", trigger_type="s") == 2
        assert _value(samples, "bridge_postgres_listen_dropped_total", trigger_type="s") == 5
        assert _value(samples, "bridge_events_done_total", trigger_type="s", outcome="delivered") == 2
        assert _value(samples, "bridge_engine_connected") == 1  # a dry run needs no engine
        assert _value(samples, "bridge_bindings_expired_total", trigger_type="s") == 1
        assert _value(samples, "bridge_bindings", trigger_type="s") == 0
        assert any(name == "process_cpu_seconds_total" for name, _ in samples)
        head = (await _http(port, b"HEAD /readyz HTTP/1.0\r\n\r\n")).decode()
        assert head.startswith("HTTP/1.1 200 OK") and head.endswith("\r\n\r\n")  # no body
        assert (await _http(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _http(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await _http(port, b"GET /metr")) == b""  # hung up mid-request: nothing to answer
        assert [json.loads(line)["payload"] for line in out.getvalue().splitlines()] == [{"n": 0}, {"n": 1}]
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
    assert runtime.readiness() == (False, "shutting down")


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_taken_port_stops_the_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "bridge.yaml").write_text(
            f"version: 1\nobservability: {{listen: '127.0.0.1:{port}'}}\nsources:\n  s:\n    file: {{path: ./in}}\n"
        )
        runtime = Runtime(load_config(tmp_path / "bridge.yaml"), dry_run=True, out=io.StringIO())
        assert await asyncio.wait_for(runtime.run(asyncio.Event()), 5) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:80") == ("localhost", 80)
    for bad in ("9464", ":9464", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_listen(bad)
