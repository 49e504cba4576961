"""Every event ends (DESIGN.md §3): a dead letter can always be written whatever the event held, a torn write is
repaired before the next one, a refusing destination holds the event (logged, counted) until the record is
durable, and an unexpected error in delivery still dead-letters and acknowledges the event.

Real files and a real small filesystem (a 64 KiB tmpfs, when this process may mount one) or a real file-size
limit; an in-process invoker stands in for the engine, as the runtime is what is under test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge._dlencode import encode_record
from bridge.bindings import Binding, BindingTable
from bridge.config import DeadLetterConfig, DeliveryConfig, RetryConfig
from bridge.deadletter import FileDeadLetter, read_records
from bridge.dispatch import Dispatcher, Invocation
from bridge.errors import DeliveryError
from bridge.runtime import SourceRunner
from bridge.sources import Event, Outcome
from bridge.sources.file.spec import FileSourceConfig
from tests.support.configs import source_config


def _deep(levels: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(levels):
        node.append([])
        node = node[0]
    return root


class _Unserialisable:
    def __repr__(self) -> str:
        return "<unserialisable>"


def _hostile_values() -> dict[str, Any]:
    return {
        "lone surrogate": "x\ud800y",
        "surrogate key": {"k\udcff": 1},
        "NUL": "a\x00b",
        "NaN": float("nan"),
        "infinity": [float("inf"), float("-inf")],
        "bytes": b"\x00\xff",
        "set": {1, 2},
        "object": _Unserialisable(),
        "int keys": {1: "one", (2, 3): "tuple key"},
        "huge int": 10**5000,
        "deep": _deep(5000),
    }


def _record(event_id: str, value: Any) -> dict[str, Any]:
    return {"source": "inbox", "event": {"id": event_id, "value": value}, "binding": None, "payload": None,
            "error": {"code": "decode_error", "message": "bad \ud800"}, "attempts": 0,
            "first_attempt_at": None, "last_attempt_at": None}


@pytest.mark.parametrize("name,value", list(_hostile_values().items()), ids=list(_hostile_values()))
def test_any_content_serialises_to_one_valid_json_line(name: str, value: Any) -> None:
    text = encode_record(_record("e1", value))
    assert "\n" not in text
    text.encode("utf-8")  # no lone surrogate left in the text
    record = json.loads(text)
    assert record["event"]["id"] == "e1" and record["error"]["code"] == "decode_error"
    assert record["error"]["message"] == "bad \ud800"  # escaped in the text, the same string once read


def test_what_json_cannot_take_is_kept_and_noted() -> None:
    record = json.loads(encode_record(_record("e1", _hostile_values())))
    value = record["event"]["value"]
    assert value["lone surrogate"] == "x\ud800y" and value["NUL"] == "a\x00b"
    assert value["NaN"] == "NaN" and value["infinity"] == ["Infinity", "-Infinity"]
    assert value["bytes"] == {"raw_b64": "AP8="} and value["set"] == [1, 2]
    assert value["object"] == "<unserialisable>" and value["int keys"] == {"1": "one", "(2, 3)": "tuple key"}
    assert value["huge int"] == {"hex": hex(10**5000)}
    node, levels = value["deep"], 0
    while isinstance(node, list):
        node, levels = node[0], levels + 1
    assert levels < 200 and node["note"] == "nested deeper than 200 levels"  # the rest is kept as JSON text
    assert node["json_text"].startswith("[[[") and node["json_text"].count("[") == 5000 - levels + 1
    assert record["encoding_notes"], record.keys()


async def test_the_file_destination_writes_every_hostile_record(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    sink = FileDeadLetter(path)
    values = _hostile_values()
    await asyncio.wait_for(asyncio.gather(*(sink.write(_record(k, v)) for k, v in values.items())), 10)
    await sink.close()
    records = [r for _, r in read_records(path)]
    assert sorted(r["event"]["id"] for r in records) == sorted(values)
    assert path.read_bytes().count(b"\n") == len(values)


async def test_a_torn_last_line_is_cut_before_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    sink = FileDeadLetter(path)
    await sink.write(_record("before", 1))
    with open(path, "a", encoding="utf-8") as fh:  # a short write: half a record, no newline
        fh.write(encode_record(_record("torn", 2))[:40])
    await sink.write(_record("after", 3))
    await sink.close()
    assert [r["event"]["id"] for _, r in read_records(path)] == ["before", "after"]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 2


async def test_a_file_that_is_only_a_torn_line_is_emptied_first(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    path.write_text('{"source": "inbox", "ev')
    sink = FileDeadLetter(path)
    await sink.write(_record("after", 3))
    await sink.close()
    assert [r["event"]["id"] for _, r in read_records(path)] == ["after"]


# a refusing destination -----------------------------------------------------------------------------------------


class _Failing:
    """Every invocation fails: each event is dead-lettered after one attempt."""

    connected = True

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        raise DeliveryError("invocation_failed", "boom")


def _runner(dl_path: Path, dispatcher_class: type[Dispatcher] = Dispatcher) -> SourceRunner:
    source = source_config(
        "inbox", FileSourceConfig(path=dl_path.parent), max_in_flight=4,
        delivery=DeliveryConfig(retry=RetryConfig(max_attempts=1), dead_letter=DeadLetterConfig(file=dl_path)),
    )
    table = BindingTable(source.id)
    table.upsert(Binding("b1", source.id, "f::one", None, {}))
    dispatcher = dispatcher_class(source, table, _Failing(), FileDeadLetter(dl_path))
    return SourceRunner(source, dispatcher, table)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs); skipped where this process may not mount one."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                              capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10, check=False)


async def test_a_full_disk_holds_the_event_until_the_record_is_durable(small_fs: Path) -> None:
    filler = small_fs / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    dl_path = small_fs / "dl.jsonl"
    runner = _runner(dl_path)
    outcomes: list[Outcome] = []

    async def on_done(outcome: Outcome) -> None:
        outcomes.append(outcome)

    event = Event(id="e1", source="inbox", fields={"text": "x\ud800" * 200, "n": float("nan")})
    await runner.submit(event, on_done)
    for _ in range(200):  # the first write and one retry (after 0.5 s) are refused
        if runner.stats.dead_letter_failures >= 2:
            break
        await asyncio.sleep(0.05)
    assert runner.stats.dead_letter_failures >= 2
    assert outcomes == [] and runner.in_flight() == 1  # held: not acknowledged
    assert not dl_path.exists() or b"\n" not in dl_path.read_bytes()

    filler.unlink()  # the space comes back
    for _ in range(200):
        if outcomes:
            break
        await asyncio.sleep(0.05)
    assert outcomes == ["dead_lettered"]
    [(_, record)] = list(read_records(dl_path))
    assert record["event"]["id"] == "e1" and record["event"]["text"] == "x\ud800" * 200
    assert dl_path.read_bytes().count(b"\n") == 1  # written once, no torn rest before it


SHORT_WRITE_SCRIPT = textwrap.dedent("""\
    import asyncio, resource, signal, sys
    from pathlib import Path
    from bridge.deadletter import FileDeadLetter, read_records
    from bridge.errors import DeadLetterError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead
    path = Path(sys.argv[1])

    async def main():
        sink = FileDeadLetter(path)
        await sink.write({"event": {"id": "first"}})
        size = path.stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # room for a part of the next record
        try:
            await sink.write({"event": {"id": "second", "pad": "p" * 1000}})
        except DeadLetterError as exc:
            print("refused:", exc)
        assert path.stat().st_size == size, "the part that got through was taken back"
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await sink.write({"event": {"id": "second", "pad": "p" * 1000}})
        await sink.close()
        print("ids:", [r["event"]["id"] for _, r in read_records(path)])

    asyncio.run(main())
""")


def test_a_short_write_is_taken_back_and_the_record_written_once_later(tmp_path: Path) -> None:
    path = tmp_path / "dl.jsonl"
    done = subprocess.run([sys.executable, "-c", SHORT_WRITE_SCRIPT, str(path)], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONWARNINGS": "error"})
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "File too large" in done.stdout, done.stdout
    assert "ids: ['first', 'second']" in done.stdout, done.stdout


# an unexpected error in delivery ---------------------------------------------------------------------------------


class _BuggyDispatcher(Dispatcher):
    """A delivery bug: the dispatcher itself raises what nothing handles."""

    async def deliver(self, event: Event) -> Outcome:
        raise ZeroDivisionError("a bug in delivery")


class _OneBuggyBinding(Dispatcher):
    """A bug in one binding's share (f::one) while its sibling (f::two) is still being delivered."""

    sibling_may_finish: asyncio.Event

    async def _deliver_one(self, event: Event, view: dict[str, Any], binding: Binding) -> Outcome:
        if binding.function_id == "f::one":
            raise ZeroDivisionError("a bug in one binding")
        await self.sibling_may_finish.wait()
        return "delivered"


async def test_an_unexpected_error_dead_letters_and_acknowledges_the_event(tmp_path: Path) -> None:
    dl_path = tmp_path / "dl.jsonl"
    runner = _runner(dl_path, _BuggyDispatcher)
    done = asyncio.get_running_loop().create_future()

    async def on_done(outcome: Outcome) -> None:
        done.set_result(outcome)

    await runner.submit(Event(id="e1", source="inbox", fields={"n": 1}), on_done)
    assert await asyncio.wait_for(done, 5) == "dead_lettered"
    [(_, record)] = list(read_records(dl_path))
    assert record["binding"] is None and record["event"]["id"] == "e1"
    assert record["error"] == {"code": "internal_error", "message": "ZeroDivisionError: a bug in delivery"}
    assert runner.stats.dead_lettered == 1 and runner.in_flight() == 0


async def test_a_bug_in_one_binding_dead_letters_its_share_and_the_event_waits_for_its_siblings(
    tmp_path: Path,
) -> None:
    dl_path = tmp_path / "dl.jsonl"
    runner = _runner(dl_path, _OneBuggyBinding)
    dispatcher = runner.dispatcher
    assert isinstance(dispatcher, _OneBuggyBinding)
    dispatcher.sibling_may_finish = asyncio.Event()
    runner.table.upsert(Binding("b2", "inbox", "f::two", None, {}))
    done = asyncio.get_running_loop().create_future()

    async def on_done(outcome: Outcome) -> None:
        done.set_result(outcome)

    await runner.submit(Event(id="e1", source="inbox", fields={"n": 1}), on_done)
    await asyncio.sleep(0.3)
    assert not done.done(), "acknowledged while a sibling binding was still being delivered"
    dispatcher.sibling_may_finish.set()
    assert await asyncio.wait_for(done, 5) == "dead_lettered"
    [(_, record)] = list(read_records(dl_path))
    assert record["binding"]["function_id"] == "f::one"
    assert record["error"] == {"code": "internal_error", "message": "ZeroDivisionError: a bug in one binding"}
