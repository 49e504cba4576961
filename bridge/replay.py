"""`bridge deadletters`: list, show and replay dead-letter records of the file destination.

Replaying re-delivers a record to its binding's function (same namespace; the recorded payload, or a payload
rendered again with today's templates when the record has none, e.g. after a template fix). A replayed record is
marked in a sidecar file next to the dead-letter file (``<file>.replayed``), so the dead-letter file itself is
only ever appended to (the running bridge may be writing to it at the same time).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bridge._clock import iso_now
from bridge.config import BridgeConfig
from bridge.deadletter import read_records
from bridge.errors import BridgeError, DeliveryError, EventError
from bridge.templates import compile_tree, make_context


@dataclass(frozen=True)
class DeadLetter:
    ref: str  # how the operator names it: "LINE" or "FILE:LINE" when several files exist
    file: Path
    line: int
    record: dict[str, Any]
    replayed_at: str | None


def dead_letter_files(config: BridgeConfig) -> list[Path]:
    files: list[Path] = []
    for candidate in [config.defaults.dead_letter.file, *(s.delivery.dead_letter.file for s in config.sources)]:
        if candidate is not None and candidate not in files:
            files.append(candidate)
    return files


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".replayed")


def load(config: BridgeConfig, source: str | None = None) -> list[DeadLetter]:
    files = dead_letter_files(config)
    several = len(files) > 1
    letters: list[DeadLetter] = []
    for path in files:
        replayed = {line: rec.get("at") for line, rec in _replayed_lines(path)}
        for line, record in read_records(path):
            if source is not None and record.get("source") != source:
                continue
            ref = f"{path.name}:{line}" if several else str(line)
            letters.append(DeadLetter(ref, path, line, record, replayed.get(line)))
    return letters


def _replayed_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    for _, rec in read_records(_sidecar(path)):
        line = rec.get("line")
        if isinstance(line, int):
            yield line, rec


def format_list(letters: list[DeadLetter], out: TextIO) -> None:
    if not letters:
        out.write("no dead letters\n")
        return
    out.write(f"{'REF':<8} {'AT':<24} {'SOURCE':<16} {'FUNCTION':<24} {'ERROR':<26} EVENT\n")
    for d in letters:
        rec = d.record
        binding = rec.get("binding") or {}
        error = rec.get("error") or {}
        event = rec.get("event") or {}
        status = "  (replayed)" if d.replayed_at else ""
        out.write(
            f"{d.ref:<8} {rec.get('last_attempt_at') or '-'!s:<24} {rec.get('source')!s:<16} "
            f"{binding.get('function_id', '-')!s:<24} {error.get('code')!s:<26} {event.get('id')}{status}\n"
        )


def select(letters: list[DeadLetter], refs: list[str]) -> list[DeadLetter]:
    by_ref = {d.ref: d for d in letters}
    missing = [r for r in refs if r not in by_ref]
    if missing:
        raise BridgeError(f"no dead letter {', '.join(missing)} (see `bridge deadletters list`)")
    return [by_ref[r] for r in refs]


async def replay(
    config: BridgeConfig, letters: list[DeadLetter], out: TextIO, *, connect_timeout_s: float = 15.0
) -> int:
    """Re-deliver each record to its binding's function; return how many failed."""
    from bridge.engine import EngineLink

    link = EngineLink(config.engine)
    link.start([])
    failures = 0
    try:
        try:
            await asyncio.wait_for(link.wait_connected(), connect_timeout_s)
        except TimeoutError:
            raise BridgeError(f"the iii engine at {config.engine.url} is unreachable") from None
        for letter in letters:
            ok = await _replay_one(config, link, letter, out)
            failures += 0 if ok else 1
    finally:
        await link.close()
    return failures


async def _replay_one(config: BridgeConfig, link: Any, letter: DeadLetter, out: TextIO) -> bool:
    rec = letter.record
    binding = rec.get("binding")
    if not isinstance(binding, dict):
        out.write(f"{letter.ref}: skipped: the event failed before any binding was involved ({_err(rec)})\n")
        return False
    try:
        payload = rec.get("payload")
        if payload is None:
            payload = _render_again(config, rec, binding)
        source = config.source(str(rec.get("source")))
        await link.invoke(
            str(binding["function_id"]),
            payload,
            namespace=None if binding.get("namespace") in (None, "default") else str(binding["namespace"]),
            timeout_ms=source.delivery.timeout_ms,
        )
    except (DeliveryError, EventError, KeyError) as exc:
        out.write(f"{letter.ref}: replay failed: {exc}\n")
        return False
    _mark(letter)
    out.write(f"{letter.ref}: replayed to {binding['function_id']}\n")
    return True


def _render_again(config: BridgeConfig, rec: dict[str, Any], binding: dict[str, Any]) -> Any:
    source = config.source(str(rec.get("source")))
    event = rec.get("event") or {}
    if source.payload is None:
        return event
    view: dict[str, Any] = {"id": binding.get("id"), "function_id": binding.get("function_id"),
            "namespace": binding.get("namespace") or "default", "metadata": {}}
    ctx = make_context(event, binding.get("config") or {}, view, {"id": source.id, "kind": source.kind})
    return compile_tree(source.payload, root=("payload",)).render(ctx)


def _mark(letter: DeadLetter) -> None:
    with open(_sidecar(letter.file), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"line": letter.line, "event_id": (letter.record.get("event") or {}).get("id"),
                             "at": iso_now()}) + "\n")


def _err(rec: dict[str, Any]) -> str:
    error = rec.get("error") or {}
    return f"{error.get('code')}: {error.get('message')}"
