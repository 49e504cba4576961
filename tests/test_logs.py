"""Logs: one JSON object per line with the event's context, human text otherwise, secrets masked in both."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import logs
from tests.support.files import drop, wait_for


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    bridge_level = logging.getLogger("bridge").level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("bridge").setLevel(bridge_level)


def test_json_lines_carry_the_context(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("json", stream=stream)
    log = logging.getLogger("bridge.dispatch")
    log.warning("event %s → %s: boom (dead-lettered)", "file:a.json:1:2", "shop::x",
                extra={"trigger_type": "inbox", "event_id": "file:a.json:1:2", "binding_id": "b-1",
                       "function_id": "shop::x"})
    log.info("plain")
    try:
        raise ValueError("connect to postgresql://app:pw-in-trace@db/x failed")
    except ValueError:
        log.exception("source failed")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "warning" and first["logger"] == "bridge.dispatch"
    assert first["message"] == "event file:a.json:1:2 → shop::x: boom (dead-lettered)"
    assert (first["trigger_type"], first["event_id"], first["binding_id"], first["function_id"]) == (
        "inbox", "file:a.json:1:2", "b-1", "shop::x"
    )
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert set(second) == {"ts", "level", "logger", "message"}
    assert "ValueError" in third["exception"] and "pw-in-trace" not in third["exception"]
    assert "postgresql://app:***@db/x" in third["exception"]


def test_text_stays_human_and_secrets_are_masked(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("text", stream=stream)
    log = logging.getLogger("bridge.runtime")
    log.info("connecting to %s", "postgresql://app:s3cret@db:5432/shop?sslmode=require")
    log.info("binding added (config %s)", {"password": "hunter2", "api_token": "tok-1", "region": "eu"})
    log.info("dsn host=db password=pa55 user=app", extra={"event_id": "ignored-in-text"})
    text = stream.getvalue()
    for secret in ("s3cret", "hunter2", "tok-1", "pa55"):
        assert secret not in text
    lines = text.splitlines()
    assert lines[0].endswith("INFO    bridge.runtime: connecting to postgresql://app:***@db:5432/shop?sslmode=require")
    assert lines[1].endswith("binding added (config {'password': '***', 'api_token': '***', 'region': 'eu'})")
    assert lines[2].endswith("dsn host=db password=*** user=app")
    assert not text.startswith("{")


def test_redact_text_leaves_ordinary_text_alone() -> None:
    plain = "event kafka:orders:0:7 → shop::x delivered"
    assert logs.redact_text(plain) == plain
    assert logs.redact_text("the key is order-7") == "the key is order-7"
    assert logs.redact_text('{"secret": "x y"}') == '{"secret": "***"}'


def test_a_dry_run_writes_only_json_lines(tmp_path: Path) -> None:
    """`bridge up` as a process: every stderr line is a JSON object; a failed event names its id."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "bridge.yaml").write_text(
        "version: 1\nstate_dir: state\nobservability: {log_format: json}\nsources:\n  inbox:\n"
        "    file: {path: ./inbox, content: json, settle_ms: 20}\n    payload: {n: '{{ event.content.n }}'}\n"
    )
    drop(tmp_path / "inbox", "bad.json", {"m": 1})
    err = tmp_path / "err.log"
    with err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "up", "--dry-run", "-c", str(tmp_path / "bridge.yaml")],
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=tmp_path,
        )
    try:
        wait_for(lambda: "file:bad.json:" in err.read_text(), 15, "the failed event in the log")
        time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
    entries = [json.loads(line) for line in err.read_text().splitlines()]
    failed = [e for e in entries if str(e.get("event_id", "")).startswith("file:bad.json:")]
    assert len(failed) == 1, entries
    assert failed[0]["trigger_type"] == "inbox" and failed[0]["binding_id"] == "dry-run"
    assert "render" in failed[0]["message"] or "no attribute" in failed[0]["message"]
    assert entries[-1]["message"] == "bridge stopped"
