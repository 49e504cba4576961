"""The file source against real files in tmp_path, with an in-memory Sink (MemorySink) standing in for the runtime."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import SourceConfig
from bridge.errors import DecodeError
from bridge.sources import REGISTRY
from bridge.sources.file._fs import Refused, RootDir
from bridge.sources.file._state import read_content
from bridge.sources.file.source import FileSource
from bridge.sources.file.spec import FileSourceConfig
from bridge.testing.sink import MemorySink
from bridge.testing.sink import running as run_source
from bridge.testing.waiting import until
from tests.support.configs import source_config
from tests.support.logwatch import LogWatch, watch_log

SETTLE_MS = 30
QUIET_S = 0.4  # how long "nothing more arrives" is watched for


def new_sink(*, bound: bool = True, hold: bool = False) -> MemorySink:
    """The runtime stand-in: ``hold`` keeps every event in flight until ``ack_all``; ``exactly`` watches for
    QUIET_S."""
    return MemorySink(bound=bound, hold=hold, quiet_s=QUIET_S)


def summary(sink: MemorySink) -> list[tuple[str, str]]:
    return [(e.fields["relative_path"], e.fields["change"]) for e in sink.events]


def make_config(path: Path, source_id: str = "inbox", **kw: Any) -> SourceConfig:
    kw.setdefault("settle_ms", SETTLE_MS)
    return source_config(source_id, FileSourceConfig(path=path, **kw))


def watching(source: FileSource) -> contextlib.AbstractContextManager[LogWatch]:
    """Watches for the source's "watching" log line: its watcher is set up and its initial scan done, so any file
    written from then on is seen."""
    return watch_log("bridge.sources.file", rf"^file source {re.escape(source.config.id)}: watching ")


@contextlib.asynccontextmanager
async def running(
    source: FileSource, sink: MemorySink, *, ready: bool = True
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``source`` for the block; with ``ready``, enter it once the source watches (a replica standing by, or
    a dry run waiting for its directory, is entered at once)."""
    with watching(source) as watch:
        async with run_source(source, sink, stop_timeout_s=5) as task:
            if ready:
                await until(lambda: watch.seen or task.done(), 10, "the file source to watch its directory")
            yield task


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def _source(inbox: Path, state: Path, **kw: Any) -> FileSource:
    return FileSource(make_config(inbox, **kw), state)


def _inotify_count() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += "inotify" in os.readlink(f"/proc/self/fd/{fd}")
    return n


# --- the event ------------------------------------------------------------------------------------------------


async def test_a_new_file_is_one_created_event_with_every_field(inbox: Path, state: Path) -> None:
    sink = new_sink()
    before = _inotify_count()
    async with running(_source(inbox, state), sink):
        (inbox / "sub").mkdir()
        (inbox / "sub" / "a.txt").write_text("hello")
        [event] = await sink.exactly(1)
    deadline = time.monotonic() + 1  # notify's thread closes the inotify instance a moment after the drop
    while _inotify_count() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert _inotify_count() == before  # the watcher was closed on cancel
    st = (inbox / "sub" / "a.txt").stat()
    assert event.id == f"file:sub/a.txt:{st.st_mtime_ns}:5"
    assert event.source == "inbox"
    assert event.order_key == "sub/a.txt"
    assert event.error is None
    mtime = event.fields.pop("mtime")
    assert event.fields == {
        "path": str(inbox / "sub" / "a.txt"),
        "relative_path": "sub/a.txt",
        "name": "a.txt",
        "change": "created",
        "size": 5,
        "content": "hello",
    }
    ms = st.st_mtime_ns // 1_000_000
    assert mtime == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


async def test_created_modified_deleted_follow_changes(inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state, changes=("created", "modified", "deleted")), sink):
        (inbox / "a.txt").write_text("one")
        await sink.wait_for(1)
        (inbox / "a.txt").write_text("three")
        await sink.wait_for(2)
        st = (inbox / "a.txt").stat()
        (inbox / "a.txt").unlink()
        events = await sink.exactly(3)
    assert [(e.fields["change"], e.fields["size"]) for e in events] == [
        ("created", 3), ("modified", 5), ("deleted", 5)
    ]
    assert events[2].fields["content"] is None
    assert events[2].id == f"file:a.txt:{st.st_mtime_ns}:5:deleted"


async def test_changes_not_listed_are_not_delivered(inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state, changes=("modified",)), sink):
        (inbox / "a.txt").write_text("one")
        await asyncio.sleep(QUIET_S)
        assert sink.events == []
        (inbox / "a.txt").write_text("second")  # seen before, though not delivered: a modification
        [event] = await sink.exactly(1)
        (inbox / "a.txt").unlink()
        await asyncio.sleep(QUIET_S)
    assert event.fields["change"] == "modified"
    assert len(sink.events) == 1


async def test_include_and_exclude_globs_on_names_and_relative_paths(inbox: Path, state: Path) -> None:
    for rel in ["a.json", "b.txt", ".hidden.json", "c.json.tmp", "x.json.tmp", ".git/d.json", "sub/e.json",
                "skip/f.json", "sub/.cache/g.json", "orders/h.json"]:
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_text("{}")
    sink = new_sink()
    source = _source(inbox, state, include=("*.json",), exclude=(".*", "*.tmp", "skip/*"))
    async with running(source, sink):
        await sink.exactly(3)
    assert sorted(e.fields["relative_path"] for e in sink.events) == ["a.json", "orders/h.json", "sub/e.json"]


async def test_include_matches_relative_paths_too(inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state, include=("orders/*.json",)), sink):
        for rel in ["x.json", "orders/a.json", "orders/2024/b.json", "other/orders.json"]:
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            (inbox / rel).write_text("{}")
        await sink.exactly(2)
    assert sorted(e.fields["relative_path"] for e in sink.events) == ["orders/2024/b.json", "orders/a.json"]


async def test_a_file_written_in_chunks_is_one_event_once_it_settles(inbox: Path, state: Path) -> None:
    settle_ms = 200
    sink = new_sink()
    async with running(_source(inbox, state, settle_ms=settle_ms), sink):
        with open(inbox / "big.txt", "wb") as fh:
            for _ in range(15):  # 15 x 40 ms = 3 x settle_ms, never pausing for settle_ms
                fh.write(b"x" * 1000)
                fh.flush()
                await asyncio.sleep(0.04)
        [event] = await sink.exactly(1)
    assert event.fields["size"] == 15_000
    assert event.fields["content"] == "x" * 15_000


async def test_a_file_gone_before_it_settled_is_dropped(inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state, settle_ms=300, changes=("created", "deleted")), sink):
        (inbox / "brief.txt").write_text("x")
        await asyncio.sleep(0.05)
        (inbox / "brief.txt").unlink()
        (inbox / "stays.txt").write_text("y")
        await sink.exactly(1)
    assert summary(sink) == [("stays.txt", "created")]


async def test_the_source_fails_when_its_directory_is_removed(inbox: Path, state: Path) -> None:
    source = _source(inbox, state)
    with watching(source) as watch:
        task = asyncio.create_task(source.run(new_sink()))
        await until(lambda: watch.seen, 10, "the file source to watch its directory")
    shutil.rmtree(inbox)
    with pytest.raises(RuntimeError, match="was removed"):
        await asyncio.wait_for(task, timeout=5)


# --- content --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "data", "expected"),
    [
        ("none", b"anything", None),
        ("text", "h\u00e9llo\n".encode(), "h\u00e9llo\n"),
        ("json", b'{"amount": 5, "tags": ["a"]}', {"amount": 5, "tags": ["a"]}),
        ("bytes", b"\x00\xff\x10", base64.b64encode(b"\x00\xff\x10").decode()),
    ],
)
async def test_content_modes(inbox: Path, state: Path, content: str, data: bytes, expected: Any) -> None:
    (inbox / "f.bin").write_bytes(data)
    sink = new_sink()
    async with running(_source(inbox, state, content=content), sink):
        [event] = await sink.wait_for(1)
    assert event.error is None
    assert event.fields["content"] == expected


@pytest.mark.parametrize(
    ("content", "data", "reason", "raw"),
    [
        # Undecodable content is carried raw for the dead-letter record: as text when it is UTF-8 (content), as
        # base64 when it is not (raw_b64); content too large to be read is not carried.
        ("json", b'{"amount": ', "invalid JSON", {"content": '{"amount": '}),
        ("json", b"NaN", "invalid JSON (content: json): NaN is not JSON", {"content": "NaN"}),
        ("json", b"[" * 600 + b"]" * 600, "nested deeper than 512 levels", {"content": "[" * 600 + "]" * 600}),
        ("json", b'"\\ud800"', "lone surrogate", {"content": '"\\ud800"'}),
        ("json", b"\xff{}", "not UTF-8 text (content: json): invalid start byte at byte 0",
         {"content": None, "raw_b64": "/3t9"}),
        ("json", b"", "Expecting value", {"content": ""}),
        ("text", b"\xff\xfe\x00bad", "not UTF-8 text", {"content": None, "raw_b64": "//4AYmFk"}),
        ("text", b"x" * 2001, "2001 bytes is more than max_content_bytes (2000)", {"content": None}),
        ("bytes", b"x" * 2001, "2001 bytes is more than max_content_bytes (2000)", {"content": None}),
    ],
)
async def test_undecodable_content_is_an_event_with_a_decode_error(
    inbox: Path, state: Path, content: str, data: bytes, reason: str, raw: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (inbox / "bad.dat").write_bytes(data)
    sink = new_sink()
    async with running(_source(inbox, state, content=content, max_content_bytes=2000), sink):
        [event] = await sink.wait_for(1)
    assert isinstance(event.error, DecodeError)
    assert str(inbox / "bad.dat") in str(event.error)
    assert reason in str(event.error)
    assert {k: event.fields[k] for k in ("content", "raw_b64") if k in event.fields} == raw
    assert event.fields["size"] == len(data)
    assert any(r.levelno == logging.WARNING and reason in r.getMessage() for r in caplog.records)
    # acknowledged like any event: checkpointed, not submitted again after a restart
    sink2 = new_sink()
    async with running(_source(inbox, state, content=content, max_content_bytes=2000), sink2):
        await asyncio.sleep(QUIET_S)
    assert sink2.events == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_an_unreadable_file_is_an_event_with_a_decode_error(inbox: Path, state: Path) -> None:
    (inbox / "secret.txt").write_text("x")
    (inbox / "secret.txt").chmod(0)
    sink = new_sink()
    async with running(_source(inbox, state), sink):
        [event] = await sink.wait_for(1)
    assert isinstance(event.error, DecodeError)
    assert "cannot read" in str(event.error)


# --- start, restart, checkpoint -------------------------------------------------------------------------------


async def test_initial_scan_submits_existing_files_and_creates_a_missing_directory(
    tmp_path: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.file")
    missing = tmp_path / "not" / "yet"
    sink = new_sink()
    async with running(_source(missing, state), sink):
        pass
    assert missing.is_dir()
    assert any("created the watched directory" in r.getMessage() for r in caplog.records)

    for rel in ["a.txt", "d/b.txt", "d/e/c.txt"]:
        (missing / rel).parent.mkdir(parents=True, exist_ok=True)
        (missing / rel).write_text(rel)
    caplog.clear()
    async with running(_source(missing, state), sink):
        await sink.exactly(3)
    assert sorted(summary(sink)) == [("a.txt", "created"), ("d/b.txt", "created"), ("d/e/c.txt", "created")]
    assert any("3 file(s) pending from the initial scan" in r.getMessage() for r in caplog.records)


async def test_restart_delivers_only_what_changed_while_down(inbox: Path, state: Path) -> None:
    changes = ("created", "modified", "deleted")
    for name in ["keep.txt", "edit.txt", "gone.txt"]:
        (inbox / name).write_text("v1")
    sink = new_sink()
    async with running(_source(inbox, state, changes=changes), sink):
        await sink.exactly(3)
    # while the bridge is down
    (inbox / "edit.txt").write_text("version 2")
    (inbox / "gone.txt").unlink()
    (inbox / "new.txt").write_text("v1")
    sink2 = new_sink()
    async with running(_source(inbox, state, changes=changes), sink2):
        await sink2.exactly(3)
    assert sorted(summary(sink2)) == [("edit.txt", "modified"), ("gone.txt", "deleted"), ("new.txt", "created")]
    sink3 = new_sink()
    async with running(_source(inbox, state, changes=changes), sink3):
        await asyncio.sleep(QUIET_S)
    assert sink3.events == []


async def test_unacknowledged_events_come_back_after_a_restart(inbox: Path, state: Path) -> None:
    (inbox / "a.txt").write_text("a")
    sink = new_sink(hold=True)
    async with running(_source(inbox, state), sink):
        await sink.exactly(1)  # in flight: not submitted twice
    sink2 = new_sink()
    async with running(_source(inbox, state), sink2):
        await sink2.exactly(1)
    assert summary(sink2) == [("a.txt", "created")]


async def test_a_torn_checkpoint_line_is_ignored_and_compacted(inbox: Path, state: Path) -> None:
    (inbox / "a.txt").write_text("a")
    (inbox / "b.txt").write_text("b")
    st = (inbox / "a.txt").stat()
    log_path = state / "file" / "inbox.jsonl"
    log_path.parent.mkdir(parents=True)
    log_path.write_text(json.dumps({"p": "a.txt", "v": f"{st.st_mtime_ns}:{st.st_size}"}) + '\n{"p": "b.t')
    sink = new_sink()
    async with running(_source(inbox, state), sink):
        await sink.exactly(1)
    assert summary(sink) == [("b.txt", "created")]
    lines = log_path.read_text().splitlines()
    assert [json.loads(line)["p"] for line in lines] == ["a.txt", "b.txt"]
    sink2 = new_sink()
    async with running(_source(inbox, state), sink2):
        await asyncio.sleep(QUIET_S)
    assert sink2.events == []


async def test_checkpoint_is_compacted_on_start_when_it_has_grown(inbox: Path, state: Path) -> None:
    log_path = state / "file" / "inbox.jsonl"
    log_path.parent.mkdir(parents=True)
    with open(log_path, "w") as fh:
        for i in range(3000):
            fh.write(json.dumps({"p": "old.txt", "v": f"{i}:1"}) + "\n")
        fh.write(json.dumps({"p": "old.txt", "d": True}) + "\n")
    async with running(_source(inbox, state), new_sink()):
        pass
    assert log_path.read_text() == ""


# --- after delivery -------------------------------------------------------------------------------------------


async def test_after_delivery_delete_removes_the_file_without_a_deleted_event(inbox: Path, state: Path) -> None:
    changes = ("created", "modified", "deleted")
    sink = new_sink()
    async with running(_source(inbox, state, changes=changes, after_delivery="delete"), sink):
        (inbox / "sub").mkdir()
        (inbox / "a.txt").write_text("a")
        (inbox / "sub" / "b.txt").write_text("b")
        await sink.exactly(2)
        assert sorted(p.name for p in inbox.rglob("*") if p.is_file() and p.name != ".iii-bridge.lock") == []
        (inbox / "a.txt").write_text("a again")  # the same name later is a new file
        await sink.exactly(3)
    assert [change for _, change in summary(sink)] == ["created", "created", "created"]
    sink2 = new_sink()
    async with running(_source(inbox, state, changes=changes), sink2):
        await asyncio.sleep(QUIET_S)
    assert sink2.events == []


async def test_after_delivery_move_keeps_the_relative_path_and_never_overwrites(
    tmp_path: Path, inbox: Path, state: Path
) -> None:
    done = tmp_path / "done"
    (done / "sub").mkdir(parents=True)
    (done / "sub" / "b.json").write_text("earlier")
    changes = ("created", "modified", "deleted")
    sink = new_sink(hold=True)
    source = _source(inbox, state, changes=changes, after_delivery="move", move_to=done)
    async with running(source, sink):
        (inbox / "sub").mkdir()
        (inbox / "a.json").write_text("a")
        (inbox / "sub" / "b.json").write_text("b")
        await sink.exactly(2)
        await sink.ack_all("dead_lettered")  # after_delivery applies whatever the outcome
        await asyncio.sleep(QUIET_S)
        assert len(sink.events) == 2  # no deleted events for our own moves
    assert (done / "a.json").read_text() == "a"
    assert (done / "sub" / "b.json").read_text() == "earlier"
    assert (done / "sub" / "b.1.json").read_text() == "b"
    assert not (inbox / "a.json").exists()
    assert not (inbox / "sub" / "b.json").exists()


async def test_move_to_inside_the_watched_directory_is_not_watched(inbox: Path, state: Path) -> None:
    sink = new_sink()
    source = _source(inbox, state, after_delivery="move", move_to=inbox / "done")
    async with running(source, sink):
        (inbox / "a.txt").write_text("a")
        await sink.exactly(1)
    assert (inbox / "done" / "a.txt").exists()


# --- directories and symlinks ---------------------------------------------------------------------------------


async def test_files_written_at_once_into_new_subdirectories_are_all_seen(inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state), sink):
        for i in range(20):
            deep = inbox / f"d{i}" / "deeper"
            deep.mkdir(parents=True)
            for j in range(5):
                (deep / f"f{j}.txt").write_text(f"{i}/{j}")
        await sink.exactly(100)
    assert len({e.fields["relative_path"] for e in sink.events}) == 100


async def test_non_recursive_watches_the_top_level_only(inbox: Path, state: Path) -> None:
    (inbox / "sub").mkdir()
    (inbox / "sub" / "early.txt").write_text("x")
    sink = new_sink()
    async with running(_source(inbox, state, recursive=False), sink):
        (inbox / "top.txt").write_text("x")
        (inbox / "sub" / "late.txt").write_text("x")
        await sink.exactly(1)
    assert summary(sink) == [("top.txt", "created")]


async def test_a_directory_moved_out_deletes_its_files(tmp_path: Path, inbox: Path, state: Path) -> None:
    sink = new_sink()
    async with running(_source(inbox, state, changes=("created", "deleted")), sink):
        (inbox / "d" / "e").mkdir(parents=True)
        (inbox / "d" / "x.txt").write_text("x")
        (inbox / "d" / "e" / "y.txt").write_text("y")
        await sink.exactly(2)
        (inbox / "d").rename(tmp_path / "elsewhere")
        await sink.exactly(4)
    assert sorted(summary(sink)[2:]) == [("d/e/y.txt", "deleted"), ("d/x.txt", "deleted")]


async def test_symlinks_outside_are_ignored_inside_are_files(tmp_path: Path, inbox: Path, state: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.txt").write_text("outside")
    (inbox / "real").mkdir()
    (inbox / "real" / "r.txt").write_text("real")
    (inbox / "out.txt").symlink_to(outside / "o.txt")
    (inbox / "outdir").symlink_to(outside)
    (inbox / "in.txt").symlink_to(inbox / "real" / "r.txt")
    (inbox / "alias").symlink_to(inbox / "real")
    (inbox / "real" / "loop").symlink_to(inbox)
    sink = new_sink()
    async with running(_source(inbox, state), sink):
        await sink.exactly(2)
        (outside / "later.txt").write_text("x")
        (inbox / "real" / "s.txt").write_text("s")  # reported through the alias: still real/s.txt
        await sink.exactly(3)
    assert sorted(summary(sink)) == [("in.txt", "created"), ("real/r.txt", "created"), ("real/s.txt", "created")]
    assert next(e for e in sink.events if e.fields["name"] == "in.txt").fields["content"] == "real"


# --- waiting, bursts, replicas --------------------------------------------------------------------------------


async def test_files_wait_while_nothing_is_bound(inbox: Path, state: Path) -> None:
    sink = new_sink(bound=False)
    async with running(_source(inbox, state), sink):
        for i in range(50):
            (inbox / f"f{i}.txt").write_text(str(i))
        await asyncio.sleep(QUIET_S)
        assert sink.events == []
        sink.bind()
        await sink.exactly(50)
    assert sorted(int(e.fields["content"]) for e in sink.events) == list(range(50))


async def test_a_version_in_flight_is_not_submitted_twice(inbox: Path, state: Path) -> None:
    sink = new_sink(hold=True)
    async with running(_source(inbox, state), sink):
        (inbox / "a.txt").write_text("a")
        await sink.wait_for(1)
        os.utime(inbox / "a.txt", ns=(1, (inbox / "a.txt").stat().st_mtime_ns))  # an event, same version
        await asyncio.sleep(QUIET_S)
        assert len(sink.events) == 1
        (inbox / "a.txt").write_text("ab")
        await sink.exactly(2)
    assert summary(sink) == [("a.txt", "created"), ("a.txt", "modified")]


async def test_a_burst_of_a_thousand_files_is_submitted_exactly_once(inbox: Path, state: Path) -> None:
    sink = new_sink()

    # Each file lands whole (written beside the inbox, then renamed in): with this suite's 30 ms settle time, a
    # write_text descheduled between its create and its write on a loaded machine is two versions of one file.
    staging = inbox.parent / "staging"
    staging.mkdir()

    def burst() -> None:
        for i in range(1000):
            written = staging / f"f{i:04d}.json"
            written.write_text(json.dumps({"i": i}))
            os.replace(written, inbox / written.name)

    async with running(_source(inbox, state, content="json"), sink):
        await asyncio.to_thread(burst)
        await sink.exactly(1000, timeout=20)
    assert sorted(e.fields["content"]["i"] for e in sink.events) == list(range(1000))
    assert len({e.id for e in sink.events}) == 1000


async def test_a_second_bridge_on_the_same_directory_stands_by(
    tmp_path: Path, inbox: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.file")
    first, second = new_sink(), new_sink()
    # different state_dirs: the lock lives in the watched directory
    async with (
        running(_source(inbox, tmp_path / "state1"), first) as first_task,
        running(_source(inbox, tmp_path / "state2"), second, ready=False),
    ):
        (inbox / "a.txt").write_text("a")
        await first.exactly(1)
        assert second.events == []
        assert any("standing by" in r.getMessage() for r in caplog.records)
        # Only the replica holding the lock may provide the trigger type (else it draws the bindings away).
        assert (first.activations, second.activations) == (1, 0)
        first_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first_task
        (inbox / "b.txt").write_text("b")
        await second.wait_for(2, timeout=5)  # its own state_dir: a.txt is new to it
    assert sorted(summary(second)) == [("a.txt", "created"), ("b.txt", "created")]
    assert second.activations == 1
    assert any("this replica is now active" in r.getMessage() for r in caplog.records)


# --- dry run ----------------------------------------------------------------------------------------------------


def _dry_source(inbox: Path, state: Path, **kw: Any) -> FileSource:
    return FileSource(make_config(inbox, **kw), state, dry_run=True)


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every entry at or below ``directory`` with its (mtime_ns, size); a directory's own changes whenever an
    entry is created, removed or renamed in it, so two equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(directory)): (p.lstat().st_mtime_ns, p.lstat().st_size)
        for p in [directory, *directory.rglob("*")]
    }


@pytest.mark.parametrize("dry_run_first", [True, False], ids=["dry-run-first", "live-first"])
async def test_a_dry_run_beside_a_live_replica_takes_no_lock_and_both_see_a_new_file(
    tmp_path: Path, inbox: Path, caplog: pytest.LogCaptureFixture, dry_run_first: bool
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.file")
    live, dry = new_sink(), new_sink()
    starts = [(_source(inbox, tmp_path / "live"), live), (_dry_source(inbox, tmp_path / "scratch"), dry)]
    async with contextlib.AsyncExitStack() as stack:
        for source, sink in reversed(starts) if dry_run_first else starts:
            await stack.enter_async_context(running(source, sink))
        (inbox / "a.txt").write_text("a")
        [seen_live] = await live.exactly(1)
        [seen_dry] = await dry.exactly(1)
    assert seen_live.id == seen_dry.id
    assert not any("standing by" in r.getMessage() for r in caplog.records)
    assert any("dry run: reading" in r.getMessage() and "without its replica lock" in r.getMessage()
               for r in caplog.records)
    # Only the live replica provides the trigger type: a dry run must not draw the bindings away from it.
    assert (live.activations, dry.activations) == (1, 0)
    assert sorted(p.name for p in inbox.iterdir()) == [".iii-bridge.lock", "a.txt"]  # the live one's lock only
    assert [json.loads(line)["p"] for line in (tmp_path / "live" / "file" / "inbox.jsonl").read_text().splitlines()
            ] == ["a.txt"]


@pytest.mark.parametrize("after_delivery", ["delete", "move"])
async def test_a_dry_run_writes_nothing_in_the_watched_directory(
    inbox: Path, state: Path, after_delivery: str
) -> None:
    (inbox / "sub").mkdir()
    (inbox / "sub" / "old.txt").write_text("old")
    move_to = inbox / "done" if after_delivery == "move" else None
    source = _dry_source(inbox, state, after_delivery=after_delivery, move_to=move_to,
                         changes=("created", "modified", "deleted"))
    sink = new_sink()
    async with running(source, sink):
        (inbox / "new.txt").write_text("new")
        before = _snapshot(inbox)  # settle_ms has not passed yet: nothing was delivered so far
        await sink.exactly(2)  # both acknowledged: this is when after_delivery would act
        assert _snapshot(inbox) == before
    assert _snapshot(inbox) == before  # no lock file, nothing moved or deleted, move_to not created
    assert sorted(summary(sink)) == [("new.txt", "created"), ("sub/old.txt", "created")]


async def test_a_dry_run_waits_for_a_missing_directory_instead_of_creating_it(
    tmp_path: Path, state: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.sources.file")
    monkeypatch.setattr("bridge.sources.file.source._DRY_RUN_DIR_POLL_S", 0.02)
    missing = tmp_path / "not" / "yet"
    sink = new_sink()
    async with running(_dry_source(missing, state), sink, ready=False):
        await until(lambda: any("does not exist; waiting" in r.getMessage() for r in caplog.records), 5, "waiting")
        assert not (tmp_path / "not").exists()
        missing.mkdir(parents=True)
        await until(lambda: any("dry run: reading" in r.getMessage() for r in caplog.records), 5, "reading")
        (missing / "a.txt").write_text("a")
        await sink.exactly(1)
    assert summary(sink) == [("a.txt", "created")]
    assert sorted(p.name for p in missing.iterdir()) == ["a.txt"]


def test_the_registry_builds_a_file_source(inbox: Path, state: Path) -> None:
    assert isinstance(REGISTRY["file"].open_source(make_config(inbox), state), FileSource)



# --- containment ----------------------------------------------------------------------------------------------

_SWAPS = 200
_SAME_MTIME_NS = 1_700_000_000_123_456_789  # inside and sentinel files share it, so version checks cannot tell


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.utime(name, ns=(_SAME_MTIME_NS, _SAME_MTIME_NS), dir_fd=dir_fd)


async def test_a_directory_swapped_for_a_symlink_never_leads_outside(
    tmp_path: Path, inbox: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The adversary: while a writer drops files into inbox/d, d is swapped 200 times for a symlink to a directory
    outside holding same-named sentinel files with the same size and mtime. No sentinel is ever read into an
    event or deleted by after_delivery: delete, and every inside file is still delivered."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret, inner = b'{"who": "sentinel"}', b'{"who": "inside!!"}'
    assert len(secret) == len(inner)
    names = [f"f{i:03d}.json" for i in range(_SWAPS)]
    for name in names:
        (outside / name).write_bytes(secret)
        os.utime(outside / name, ns=(_SAME_MTIME_NS, _SAME_MTIME_NS))
    (inbox / "d").mkdir()
    dir_fd = os.open(inbox / "d", os.O_RDONLY | os.O_DIRECTORY)
    rng = random.Random(7)
    writing = threading.Event()

    def writer() -> None:
        for name in names:  # through the directory's fd: it lands inside whatever name d has right now
            _write_at(dir_fd, name, inner)
            time.sleep(rng.uniform(0, 0.02))
        writing.set()

    def swapper() -> None:
        while not writing.is_set():
            os.rename(inbox / "d", inbox / "d.old")
            os.symlink(outside, inbox / "d")
            time.sleep(rng.uniform(0, 0.03))
            os.unlink(inbox / "d")
            os.rename(inbox / "d.old", inbox / "d")
            time.sleep(rng.uniform(0, 0.01))

    sink = new_sink()
    source = _source(inbox, state, content="json", after_delivery="delete")
    try:
        async with running(source, sink):
            await asyncio.gather(asyncio.to_thread(writer), asyncio.to_thread(swapper))
            delivered = lambda: {e.fields["name"] for e in sink.events}  # noqa: E731
            await until(lambda: delivered() >= set(names), 20, lambda: f"{len(delivered())} of {_SWAPS} delivered")
            await asyncio.sleep(QUIET_S)
    finally:
        os.close(dir_fd)
    assert [e.fields["content"] for e in sink.events if e.fields["content"] != {"who": "inside!!"}] == []
    assert sorted(p.name for p in outside.iterdir()) == names
    assert {p.read_bytes() for p in outside.iterdir()} == {secret}
    # A delete refused because d was a symlink at that moment leaves the delivered file in place, and says so.
    refused = {r.getMessage() for r in caplog.records if "cannot delete" in r.getMessage()}
    for left in (inbox / "d").iterdir():
        assert any(f"d/{left.name} after delivery" in line for line in refused), (left.name, refused)


def test_no_operation_follows_a_symlink_on_the_path(tmp_path: Path, inbox: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "x.json").write_text("secret")
    (inbox / "d").symlink_to(outside)
    (inbox / "real").mkdir()
    (inbox / "real" / "r.json").write_text("inside")
    (inbox / "up.json").symlink_to("../outside/x.json")  # relative, climbing out
    (inbox / "abs.json").symlink_to(outside / "x.json")
    (inbox / "in.json").symlink_to("real/r.json")
    (inbox / "via.json").symlink_to("d/x.json")  # inside by its text, but through a directory symlink
    root = RootDir(inbox)
    try:
        for rel in ("d/x.json", "up.json", "abs.json", "via.json", "../outside/x.json", "real/../d/x.json"):
            with pytest.raises(Refused):
                root.stat(rel)
            with pytest.raises(Refused):
                os.close(root.open_file(rel))
        with pytest.raises(Refused):
            root.unlink("d/x.json")
        with pytest.raises(Refused):
            root.move("d/x.json", root.fd, "moved.json")
        with pytest.raises(Refused), root.directory("d"):
            pass
        with pytest.raises(Refused):  # a destination below a symlinked directory is refused too
            root.move("real/r.json", root.fd, "d/sub/r.json")
        assert root.stat("in.json").st_size == len("inside")
        fd = root.open_file("in.json")
        with open(fd, "rb") as fh:
            assert fh.read() == b"inside"
        # A symlink leaf moves the file it leads to (its content was the event's); the link itself goes.
        assert root.move("in.json", root.fd, "moved/in.json") == "moved/in.json"
        assert (inbox / "moved" / "in.json").read_text() == "inside"
        assert not (inbox / "in.json").is_symlink()
        os.mkfifo(inbox / "pipe.json")  # a file swapped for a FIFO after its stat: the read must not block
        assert read_content(root, "pipe.json", "json", 100, (0, 0)) is None
    finally:
        root.close()
    assert (outside / "x.json").read_text() == "secret"
    assert sorted(p.name for p in outside.rglob("*")) == ["sub", "x.json"]
    assert (inbox / "real" / "r.json").read_text() == "inside"


async def test_move_to_swapped_for_a_symlink_is_refused_and_logged(
    tmp_path: Path, inbox: Path, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sink = new_sink(hold=True)
    async with running(_source(inbox, state, after_delivery="move", move_to=inbox / "done"), sink):
        (inbox / "a.txt").write_text("a")
        await sink.exactly(1)
        (inbox / "done").symlink_to(outside)  # after the event, before its acknowledgement moves it
        await sink.ack_all()
    assert list(outside.iterdir()) == []
    assert (inbox / "a.txt").read_text() == "a"
    assert any("cannot move" in r.getMessage() and "symlink" in r.getMessage() for r in caplog.records)


async def test_a_lock_file_swapped_for_a_symlink_or_hard_link_writes_nothing_outside(
    tmp_path: Path, inbox: Path, state: Path
) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("keep me")
    (inbox / ".iii-bridge.lock").symlink_to(sentinel)
    task = asyncio.create_task(_source(inbox, state).run(new_sink()))
    with pytest.raises(OSError, match="is a symlink; the bridge does not follow it"):
        await asyncio.wait_for(task, 5)
    (inbox / ".iii-bridge.lock").unlink()
    os.link(sentinel, inbox / ".iii-bridge.lock")
    async with running(_source(inbox, state), new_sink()):
        pass
    assert sentinel.read_text() == "keep me"


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (tmpfs at /dev/shm)")
def test_a_move_across_file_systems_copies_without_replacing(inbox: Path) -> None:
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        if other.stat().st_dev == inbox.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        (inbox / "sub").mkdir()
        (inbox / "sub" / "a.json").write_text("new")
        os.utime(inbox / "sub" / "a.json", ns=(1, 1_600_000_000_000_000_000))
        (other / "sub").mkdir()
        (other / "sub" / "a.json").write_text("earlier")
        root = RootDir(inbox)
        base = os.open(other, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert root.move("sub/a.json", base, "sub/a.json") == "sub/a.1.json"
        finally:
            os.close(base)
            root.close()
        assert (other / "sub" / "a.json").read_text() == "earlier"
        assert (other / "sub" / "a.1.json").read_text() == "new"
        assert (other / "sub" / "a.1.json").stat().st_mtime_ns == 1_600_000_000_000_000_000
        assert not (inbox / "sub" / "a.json").exists()
    finally:
        shutil.rmtree(other)
