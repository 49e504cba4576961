"""The ``file`` kind (a watched directory): its config, checks, event fields and docs prose. No client library
here: the watcher (:mod:`bridge.sources.file.source`) loads watchfiles when it is opened."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bridge.errors import DeadLetterError
from bridge.sources import Figure, KindChecker, KindSpec, Source, is_set
from bridge.sources._prose import names, relative

if TYPE_CHECKING:
    from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig
    from bridge.config.diagnostics import Problem
    from bridge.config.yamlpos import KeyPath
    from bridge.deadletter import DeadLetterSink


@dataclass(frozen=True)
class FileSourceConfig:
    path: Path  # absolute
    recursive: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = (".*", "*.tmp")
    changes: tuple[Literal["created", "modified", "deleted"], ...] = ("created", "modified")
    content: Literal["none", "text", "json", "bytes"] = "text"
    max_content_bytes: int = 1048576
    settle_ms: int = 200
    after_delivery: Literal["keep", "delete", "move"] = "keep"
    move_to: Path | None = None  # absolute


def file_config(source: SourceConfig) -> FileSourceConfig:
    """``source.kind_config`` of a file source."""
    fc = source.kind_config
    assert isinstance(fc, FileSourceConfig), f"{source.id} is a {source.kind} source"
    return fc


class FileSpec(KindSpec):
    name = "file"
    config_type = FileSourceConfig
    event_fields = (
        ("id", "string", "`file:<relative path>:<mtime ns>:<size>`; one per file version"),
        ("source", "string", "the trigger type id"),
        ("path", "string", "absolute path of the file"),
        ("relative_path", "string", "path relative to the watched directory, with `/`"),
        ("name", "string", "the file name"),
        ("change", "string", "`created`, `modified` or `deleted`"),
        ("size", "integer", "size in bytes"),
        ("mtime", "string", "modification time, ISO-8601 UTC"),
        ("content", "per content", "null, UTF-8 text, parsed JSON or base64 of the bytes"),
    )
    sample_event: dict[str, Any] = {  # noqa: RUF012 (read-only by convention, like every spec attribute)
        "path": "/srv/inbox/orders/42.json", "relative_path": "orders/42.json", "name": "42.json",
        "change": "created", "size": 12, "mtime": "2026-01-01T00:00:00.000Z", "content": '{"id": 42}',
    }
    figures: tuple[Figure, ...] = ()
    dead_letter_key = None
    reserved_options: Mapping[str, Mapping[str, str]] = {}

    # -- config

    def schema(self) -> dict[str, Any]:
        from bridge.config.schemas import kind_schema

        return kind_schema(self.name)

    def build(self, source_id: str, block: dict[str, Any], resolve: Callable[[str], Path]) -> FileSourceConfig:
        values = {**block, "path": resolve(block["path"])}
        for name in ("include", "exclude", "changes"):
            if name in block:
                values[name] = tuple(block[name])
        if block.get("move_to"):
            values["move_to"] = resolve(block["move_to"])
        return FileSourceConfig(**values)

    def check(self, checker: KindChecker, here: KeyPath, block: dict[str, Any]) -> None:
        path = block.get("path")
        if isinstance(path, str) and path:
            checker.directory((*here, "path"), path, warn_missing=True)
        after, move_to = block.get("after_delivery", FileSourceConfig.after_delivery), block.get("move_to")
        if after == "move" and not is_set(move_to):
            checker.require(here, ("move_to",), "after_delivery: move needs move_to")
        elif after != "move" and is_set(move_to):
            checker.add("value", (*here, "move_to"), "only used with after_delivery: move", key=True)
        if after == "move" and isinstance(move_to, str) and move_to:
            checker.directory((*here, "move_to"), move_to, warn_missing=False)

    def check_dead_letter(self, checker: KindChecker, path: KeyPath, value: Any) -> None:
        del checker, path, value  # the kind has no destination of its own

    def online_problems(self, config: BridgeConfig, display: str) -> list[Problem]:
        del config, display  # the directory was checked offline
        return []

    def exclusive(self, source: SourceConfig) -> bool:
        return True  # one replica per directory (a lock file there); several would deliver every file twice

    def render_id(self, fields: dict[str, Any]) -> str | None:
        return f"file:{fields['relative_path']}:0:0" if "relative_path" in fields else None

    def ddl(self, source: SourceConfig) -> str | None:
        return None

    # -- docs prose

    def summary(self, source: SourceConfig, base: Path) -> str:
        fc = file_config(source)
        scope = "with subdirectories" if fc.recursive else "top level only"
        after = {"keep": "kept in place", "delete": "deleted"}.get(fc.after_delivery, "")
        if fc.after_delivery == "move" and fc.move_to is not None:
            after = f"moved to `{relative(fc.move_to, base)}`"
        return (
            f"directory `{relative(fc.path, base)}` ({scope}), files matching {names(fc.include)} except "
            f"{names(fc.exclude)}; changes: {', '.join(fc.changes)}; content as {fc.content} (up to "
            f"{fc.max_content_bytes} bytes); a file must be unchanged for {fc.settle_ms} ms; once done it is {after}"
        )

    def guarantee(self, source: SourceConfig) -> str:
        return (
            "at-least-once across restarts. Each delivered file version is recorded in the bridge's state "
            "directory, and on start the bridge delivers what changed while it was down; a crash between delivery "
            "and record delivers that version again. `event.id` (`file:<relative path>:<mtime ns>:<size>`) "
            "identifies a version."
        )

    def ordering(self, source: SourceConfig) -> str:
        return (
            "per file: versions of one file are delivered one after the other, in order; different files run in "
            "parallel, in no particular order."
        )

    def back_pressure(self, source: SourceConfig) -> str:
        return "further files wait on disk."

    def unbound(self, source: SourceConfig) -> str:
        return "files wait on disk and are delivered once a function binds."

    def outage_wait(self, source: SourceConfig) -> str:
        return "files wait on disk"

    def replicas(self, source: SourceConfig) -> tuple[str, str]:
        return (
            "one of them is active per watched directory (a lock on `.iii-bridge.lock` there); the others stand by "
            "and one takes over within about a second when it goes, delivering every file version not yet "
            "recorded (at-least-once)",
            "",
        )

    def dead_letter_place(self, dead: DeadLetterConfig) -> str:
        raise AssertionError("the file kind has no dead-letter destination of its own")

    # -- running

    def open_source(self, source: SourceConfig, state_dir: Path, *, dry_run: bool = False) -> Source:
        from bridge.sources.file.source import FileSource

        return FileSource(source, state_dir, dry_run=dry_run)

    def open_dead_letter(self, dead: DeadLetterConfig, source: SourceConfig) -> DeadLetterSink:
        raise DeadLetterError(f"source {source.id!r}: a file source has no dead-letter destination of its own")

    def connection(self, source: SourceConfig) -> str:
        return str(file_config(source).path)


SPEC = FileSpec()
