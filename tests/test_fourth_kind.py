"""Adding a source kind takes a spec, a source and a registry entry: nothing outside the kind.

This test registers a fourth kind, ``memory`` (its spec, schema and source are test code), and runs every tool
on it as it runs on kafka, postgres and file: ``validate`` (schema and semantic checks, did-you-mean hints),
``schema``, ``docs``, ``render``, and a delivery through the runtime (a dry run, which renders and acknowledges
each event, with the kind's own metrics figure on ``/metrics``). A part of a spec left out fails loudly.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.cli import main
from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig, load_config
from bridge.config.diagnostics import Problem
from bridge.config.yamlpos import KeyPath
from bridge.deadletter import DeadLetterSink
from bridge.errors import DeadLetterError
from bridge.runtime import Runtime
from bridge.sources import REGISTRY, Event, Figure, KindChecker, KindSpec, Outcome, Sample, Sink, Source

_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "memory source",
    "description": "Events from a list of texts held in memory.",
    "type": "object",
    "required": ["texts"],
    "properties": {
        "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1, "description": "One event each."},
        "prefix": {"type": "string", "default": "", "description": "Put before each text."},
    },
    "additionalProperties": False,
}


@dataclass(frozen=True)
class MemoryConfig:
    texts: tuple[str, ...]
    prefix: str = ""


class MemorySource:
    """Submits one event per text, then waits; counts the events acknowledged, by outcome."""

    def __init__(self, source: SourceConfig) -> None:
        assert isinstance(source.kind_config, MemoryConfig)
        self.config = source
        self.texts = source.kind_config.texts
        self.prefix = source.kind_config.prefix
        self.done: list[Outcome] = []

    async def run(self, sink: Sink) -> None:
        async def on_done(outcome: Outcome) -> None:
            self.done.append(outcome)

        for index, text in enumerate(self.texts):
            fields = {"text": self.prefix + text, "index": index}
            await sink.submit(Event(id=f"memory:{index}", source=self.config.id, fields=fields), on_done)
        await asyncio.Event().wait()

    def figures(self) -> Mapping[str, list[Sample]]:
        return {"bridge_memory_acknowledged": [((), len(self.done))]}


class MemorySpec(KindSpec):
    name = "memory"
    config_type = MemoryConfig
    event_fields = (
        ("id", "string", "`memory:<index>`"),
        ("source", "string", "the trigger type id"),
        ("text", "string", "the text, after the prefix"),
        ("index", "integer", "its place in the list"),
    )
    sample_event: dict[str, Any] = {"text": "hello", "index": 0}  # noqa: RUF012
    figures = (Figure("bridge_memory_acknowledged", "Events of a memory source acknowledged.", "counter"),)
    dead_letter_key = None
    reserved_options: Mapping[str, Mapping[str, str]] = {}

    def __init__(self) -> None:
        self.opened: list[MemorySource] = []

    def schema(self) -> dict[str, Any]:
        return json.loads(json.dumps(_SCHEMA))

    def build(self, source_id: str, block: dict[str, Any], resolve: Callable[[str], Path]) -> MemoryConfig:
        return MemoryConfig(texts=tuple(block["texts"]), prefix=block.get("prefix", MemoryConfig.prefix))

    def check(self, checker: KindChecker, here: KeyPath, block: dict[str, Any]) -> None:
        texts = block.get("texts")
        if isinstance(texts, list) and len(set(map(str, texts))) != len(texts):
            checker.add("value", (*here, "texts"), "a text is listed twice", "each text is one event")

    def check_dead_letter(self, checker: KindChecker, path: KeyPath, value: Any) -> None:
        pass

    def online_problems(self, config: BridgeConfig, display: str) -> list[Problem]:
        return []

    def exclusive(self, source: SourceConfig) -> bool:
        return False

    def render_id(self, fields: dict[str, Any]) -> str | None:
        return f"memory:{fields['index']}" if "index" in fields else None

    def ddl(self, source: SourceConfig) -> str | None:
        return None

    def summary(self, source: SourceConfig, base: Path) -> str:
        assert isinstance(source.kind_config, MemoryConfig)
        return f"{len(source.kind_config.texts)} texts held in memory"

    def guarantee(self, source: SourceConfig) -> str:
        return "memory-only: the texts are delivered again at every start."

    def ordering(self, source: SourceConfig) -> str:
        return "list order at submission; calls may overlap."

    def back_pressure(self, source: SourceConfig) -> str:
        return "the remaining texts wait in the list."

    def unbound(self, source: SourceConfig) -> str:
        return "texts wait in the list."

    def outage_wait(self, source: SourceConfig) -> str:
        return "texts wait in the list"

    def replicas(self, source: SourceConfig) -> tuple[str, str]:
        return "Each replica has its own copy of the list", "Nothing is left behind."

    def dead_letter_place(self, dead: DeadLetterConfig) -> str:
        raise AssertionError("no destination of its own")

    def open_source(self, source: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
        opened = MemorySource(source)
        self.opened.append(opened)
        return opened

    def open_dead_letter(self, dead: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
        raise DeadLetterError("no destination of its own")

    def connection(self, source: SourceConfig) -> str:
        return "memory"


CONFIG = """\
version: 1
observability: {listen: '127.0.0.1:0'}
sources:
  notes:
    description: notes kept in memory
    memory:
      texts: [a, b]
      prefix: "note-"
    payload:
      text: "{{ event.text }}"
      at: "{{ event.index }}"
"""


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[MemorySpec]:
    spec = MemorySpec()
    monkeypatch.setitem(REGISTRY, "memory", spec)
    yield spec


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(CONFIG)
    return path


def test_validate_checks_the_kind_with_its_schema_and_its_own_rules(
    memory: MemorySpec, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "-c", str(config_file)]) == 0
    assert capsys.readouterr().out == f"{config_file}: valid, 1 source\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsources:\n  a:\n    memory: {texts: [x, x], prefx: p}\n  b:\n    memroy: {}\n")
    assert main(["validate", "-c", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{bad}:4:21: error[value] sources.a.memory.texts: a text is listed twice; each text is one event",
        f"{bad}:4:29: error[unknown-key] sources.a.memory.prefx: unknown key; did you mean 'prefix'?",
        f"{bad}:6:5: error[unknown-key] sources.b.memroy: unknown key; did you mean 'memory'?",
        f"{bad}: 3 errors",
    ]
    none = tmp_path / "none.yaml"
    none.write_text("version: 1\nsources:\n  a: {description: x}\n")
    assert main(["validate", "-c", str(none)]) == 1
    assert "no source kind; set exactly one of: kafka, postgres, file, memory" in capsys.readouterr().out


def test_schema_bundles_the_kind(memory: MemorySpec, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$defs"]["source"]["properties"]["memory"] == {"$ref": "#/$defs/source-memory"}
    assert schema["$defs"]["source-memory"]["properties"]["texts"]["minItems"] == 1


def test_docs_describe_the_kind_in_its_own_words(
    memory: MemorySpec, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["docs", "-c", str(config_file)]) == 0
    docs = capsys.readouterr().out
    assert "| [`notes`](#notes) | memory | notes kept in memory |" in docs
    assert "| source | 2 texts held in memory |" in docs
    assert "- **Guarantee**: memory-only: the texts are delivered again at every start." in docs
    assert "- **Ordering**: list order at submission; calls may overlap." in docs
    assert "beyond that the remaining texts wait in the list." in docs
    assert "- **No binding yet**: texts wait in the list." in docs
    assert "unreachable (a restart, a network cut) texts wait in the list." in docs
    assert "Each replica has its own copy of the list, and each replica delivers" in docs


def test_render_uses_the_kind_fields_and_ids(
    memory: MemorySpec, config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({**memory.sample_event, "extra": 1})))
    assert main(["render", "-c", str(config_file), "notes", "--event", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"text": "hello", "at": 0}
    assert "note: extra is not among the fields of memory events (id, index, source, text)" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("[1]"))
    assert main(["render", "-c", str(config_file), "notes", "--event", "-"]) == 1
    assert "must be a JSON object of the memory event fields (text, index), not an array" in capsys.readouterr().err


async def _scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return data.decode()


async def test_the_runtime_delivers_and_acknowledges_the_kind_events(memory: MemorySpec, config_file: Path) -> None:
    out = io.StringIO()
    runtime = Runtime(load_config(config_file), dry_run=True, out=out)
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        async with asyncio.timeout(10):
            while not (memory.opened and len(memory.opened[0].done) == 2):
                await asyncio.sleep(0.01)
        assert memory.opened[0].done == ["delivered", "delivered"]
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["payload"] for line in lines] == [{"text": "note-a", "at": 0}, {"text": "note-b", "at": 1}]
        assert runtime.metrics_address is not None
        page = await _scrape(runtime.metrics_address[1])
        assert 'bridge_memory_acknowledged_total{trigger_type="notes"} 2.0' in page
        assert 'bridge_events_done_total{outcome="delivered",trigger_type="notes"} 2.0' in page
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0


def test_a_spec_that_leaves_a_part_out_cannot_be_registered() -> None:
    parts = sorted(KindSpec.__abstractmethods__) + list(KindSpec._ATTRIBUTES)
    every_part = {name: getattr(MemorySpec, name) for name in parts}
    assert type("Complete", (KindSpec,), every_part)() is not None
    for left_out in parts:
        partial = type("Partial", (KindSpec,), {k: v for k, v in every_part.items() if k != left_out})
        with pytest.raises(TypeError, match=f"Can't instantiate .*{left_out}"):
            partial()


def test_every_kind_sample_event_has_exactly_its_event_fields() -> None:
    for spec in REGISTRY.values():
        names = {name for name, _, _ in spec.event_fields}
        assert [name for name, _, _ in spec.event_fields][:2] == ["id", "source"], spec.name
        assert set(spec.sample_event) == names - {"id", "source"}, spec.name
