"""Live reload of `bridge up` (DESIGN §4): real `bridge up` processes on file sources, the real iii-sdk on both
sides of the test engine. Edits are written as editors do (a new file renamed over the old one)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.testing.consumer import Consumer
from bridge.testing.engine import TestEngine
from tests.support.files import drop, wait_for
from tests.support.process import BridgeProcess

RELOAD_S = 15.0  # bound on a reload being applied (the watch reports ~0.2 s after the write)

# Placeholders are <name> (str.format would need every Jinja brace doubled).
HEAD = """\
version: 1
engine:
  url: <engine_url>
  reconcile_interval_ms: 1000
state_dir: state
observability:
  listen: 127.0.0.1:<port>
defaults:
  delivery:
    timeout_ms: 5000
    retry: {max_attempts: 2, initial_backoff_ms: 50, jitter: 0}
sources:
"""

INBOX = """\
  inbox:
    description: Files dropped into the inbox
    file: {path: ./inbox, include: ["*.json"], content: json, settle_ms: 50}
    bind_schema: <bind_schema>
    payload:
      name: "{{ event.name }}"
      label: "<label>"
"""

AUDIT = """\
  audit:
    description: Files dropped into the audit folder
    file: {path: ./audit, include: ["*.json"], content: json, settle_ms: 50}
    payload:
      audited: "{{ event.name }}"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Setup:
    """A work directory with bridge.yaml, written (atomically, as editors save) from the parts above."""

    def __init__(self, root: Path, engine_url: str) -> None:
        self.root = root
        self.engine_url = engine_url
        self.port = _free_port()
        for name in ("inbox", "audit"):
            (root / name).mkdir()

    @property
    def config(self) -> Path:
        return self.root / "bridge.yaml"

    def write(self, *, label: str = "v1", audit: bool = False, engine_url: str = "${III_URL}",
              bind_schema: str = "{type: object, additionalProperties: false}", extra: str = "") -> None:
        text = HEAD + INBOX + (AUDIT if audit else "") + extra
        for name, value in {"engine_url": engine_url, "port": str(self.port), "label": label,
                            "bind_schema": bind_schema}.items():
            text = text.replace(f"<{name}>", value)
        tmp = self.root / ".bridge.yaml.swp"
        tmp.write_text(text)
        tmp.rename(self.config)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in the metrics"
    return float(found.group(1))


@pytest.fixture
def setup(tmp_path: Path, iii_engine: TestEngine) -> Setup:
    return Setup(tmp_path, iii_engine.url)


@pytest.fixture
def bridges(setup: Setup) -> Iterator[Callable[..., BridgeProcess]]:
    started: list[BridgeProcess] = []

    def start(*args: str) -> BridgeProcess:
        proc = BridgeProcess(setup.config, setup.engine_url, extra_args=args)
        started.append(proc)
        proc.start()
        proc.wait_for_log(r"connected to the iii engine")
        if "--no-reload" not in args:
            proc.wait_for_log(r"bridge.reload: watching .* for changes")
        return proc

    yield start
    for proc in started:
        proc.kill()


def _payloads(consumer: Consumer, function_id: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.payload.items() if k != "_caller_worker_id"} for r in consumer.records(function_id)]


def _callers(consumer: Consumer, function_id: str) -> set[str]:
    return {r.payload["_caller_worker_id"] for r in consumer.records(function_id)}


def test_edits_apply_live_per_source_and_invalid_ones_are_refused(
    setup: Setup, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    setup.write()
    bridge = bridges()
    assert bridge.proc is not None
    pid = bridge.proc.pid
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file")
    drop(setup.root / "inbox", "a.json", {"n": 1})
    consumer.wait_calls("shop::on-file", 1)

    # A template change: applied within seconds by the same process and the same engine connection.
    setup.write(label="v2")
    bridge.wait_for_log(r"config reloaded \(bridge\.yaml changed\): changed: inbox; added: none; removed: none",
                        timeout=RELOAD_S)
    drop(setup.root / "inbox", "b.json", {"n": 2})
    consumer.wait_calls("shop::on-file", 2)
    assert _payloads(consumer, "shop::on-file") == [{"name": "a.json", "label": "v1"},
                                                     {"name": "b.json", "label": "v2"}]
    assert len(_callers(consumer, "shop::on-file")) == 1, "one engine connection throughout"
    assert bridge.proc.pid == pid and bridge.proc.poll() is None

    # A source added: it starts and advertises; the one already there is not touched.
    setup.write(label="v2", audit=True)
    bridge.wait_for_log(r"changed: none; added: audit; removed: none; unchanged: inbox", timeout=RELOAD_S)
    consumer.function("shop::on-audit")
    consumer.bind("audit", "shop::on-audit")
    drop(setup.root / "audit", "x.json", {"n": 3})
    assert consumer.wait_calls("shop::on-audit", 1)[0]["audited"] == "x.json"

    # An invalid edit: its diagnostics (file:line:col) are printed and the running config stays.
    setup.write(label="v2", audit=True, extra="    max_in_flihgt: 4\n")
    text = bridge.wait_for_log(r"config reload refused", timeout=RELOAD_S)
    assert re.search(r"bridge\.yaml:\d+:\d+: error\[unknown-key\] sources\.audit\.max_in_flihgt", text), text
    metrics = setup.metrics()
    assert _metric(metrics, 'bridge_config_reloads_total{result="rejected"}') == 1
    assert _metric(metrics, 'bridge_config_reloads_total{result="applied"}') == 2
    assert _metric(metrics, "bridge_config_last_reload_successful") == 0
    drop(setup.root / "audit", "y.json", {"n": 4})
    consumer.wait_calls("shop::on-audit", 2)

    # The fixed file is applied; then the source removed drains and stops.
    setup.write(label="v2", audit=True, extra="    max_in_flight: 4\n")
    bridge.wait_for_log(r"changed: audit; added: none; removed: none; unchanged: inbox", timeout=RELOAD_S)
    setup.write(label="v2")
    bridge.wait_for_log(r"changed: none; added: none; removed: audit; unchanged: inbox", timeout=RELOAD_S)
    drop(setup.root / "audit", "z.json", {"n": 5})
    drop(setup.root / "inbox", "c.json", {"n": 6})
    consumer.wait_calls("shop::on-file", 3)
    time.sleep(0.5)
    assert len(consumer.records("shop::on-audit")) == 2, "a removed source delivers nothing more"

    # engine settings need a restart: said so, and kept (the bridge stays connected where it was).
    before = time.time()
    setup.write(label="v3", engine_url="ws://127.0.0.1:1")
    text = bridge.wait_for_log(r"config reloaded .*changed: inbox.*engine changed: that needs a restart",
                               timeout=RELOAD_S)
    drop(setup.root / "inbox", "d.json", {"n": 7})
    assert consumer.wait_calls("shop::on-file", 4)[-1] == {"name": "d.json", "label": "v3"}
    metrics = setup.metrics()
    assert _metric(metrics, 'bridge_config_reloads_total{result="applied"}') == 5
    assert _metric(metrics, "bridge_config_last_reload_successful") == 1
    assert _metric(metrics, "bridge_config_last_reload_success_timestamp_seconds") >= before - 1
    assert len(_callers(consumer, "shop::on-file")) == 1
    assert bridge.stop() == 0


def test_no_reload_ignores_edits_until_sighup(
    setup: Setup, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    setup.write()
    bridge = bridges("--no-reload")
    assert bridge.proc is not None
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file")
    setup.write(label="v2")
    time.sleep(1.0)  # well past the watch's report of a change
    drop(setup.root / "inbox", "a.json", {"n": 1})
    assert consumer.wait_calls("shop::on-file", 1)[0]["label"] == "v1"
    assert "config reloaded" not in bridge.log()
    bridge.proc.send_signal(signal.SIGHUP)
    bridge.wait_for_log(r"config reloaded \(SIGHUP\): changed: inbox", timeout=RELOAD_S)
    drop(setup.root / "inbox", "b.json", {"n": 2})
    assert consumer.wait_calls("shop::on-file", 2)[-1]["label"] == "v2"


def test_a_tightened_bind_schema_in_a_ref_file_rejects_the_binding_that_no_longer_fits(
    setup: Setup, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    schema = setup.root / "bind.schema.json"
    loose = {"type": "object", "properties": {"label": {"type": "string"}}, "additionalProperties": False}
    schema.write_text(json.dumps(loose))
    setup.write(bind_schema="{$ref: bind.schema.json}")
    bridge = bridges()
    consumer.function("shop::short")
    consumer.function("shop::long")
    consumer.bind("inbox", "shop::short", {"label": "ok"})
    consumer.bind("inbox", "shop::long", {"label": "much-too-long"})
    drop(setup.root / "inbox", "a.json", {"n": 1})
    consumer.wait_calls("shop::short", 1)
    consumer.wait_calls("shop::long", 1)

    tight = {**loose, "properties": {"label": {"type": "string", "maxLength": 5}}}
    tmp = setup.root / ".bind.tmp"
    tmp.write_text(json.dumps(tight))
    tmp.rename(schema)
    bridge.wait_for_log(r"config reloaded \(bind\.schema\.json changed\): changed: inbox", timeout=RELOAD_S)
    errors = consumer.wait_registration_errors(1, timeout=RELOAD_S)
    assert errors[0]["function_id"] == "shop::long"
    assert errors[0]["error"]["message"].endswith("$.label: 'much-too-long' is too long"), errors
    bridge.wait_for_log(r"binding \S+ of inbox → shop::long rejected", timeout=RELOAD_S)
    drop(setup.root / "inbox", "b.json", {"n": 2})
    consumer.wait_calls("shop::short", 2)
    time.sleep(0.5)
    assert len(consumer.records("shop::long")) == 1, "the binding that no longer fits receives nothing more"


def test_150_files_across_three_reloads_each_delivered_once(
    setup: Setup, bridges: Callable[..., BridgeProcess], consumer: Consumer
) -> None:
    setup.write()
    bridge = bridges()
    consumer.function("shop::on-file")
    consumer.bind("inbox", "shop::on-file")
    for reload in range(3):
        for i in range(50):
            drop(setup.root / "inbox", f"r{reload}-{i:02d}.json", {"n": i})
            if i == 25:
                setup.write(label=f"after-{reload}")  # mid-batch: some files are in flight as it applies
        bridge.wait_for_log(r"config reloaded", count=reload + 1, timeout=RELOAD_S)
    wait_for(lambda: len(consumer.records("shop::on-file")) >= 150, 30, "150 calls")
    time.sleep(1.0)  # nothing more arrives
    names = Counter(p["name"] for p in _payloads(consumer, "shop::on-file"))
    assert set(names) == {f"r{r}-{i:02d}.json" for r in range(3) for i in range(50)}
    assert max(names.values()) == 1, [n for n, c in names.items() if c > 1]
    assert os.path.isdir(setup.root / "state")
