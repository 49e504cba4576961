"""Live reload of `bridge up` (DESIGN §4): watch bridge.yaml and the schema files it ``$ref``s, take SIGHUP, check
the whole new file, and hand a valid one to :meth:`Runtime.reload <bridge.runtime.Runtime.reload>`, which applies
it source by source.

What is compared is the parsed config, not the text: a comment or a moved block changes nothing, and a changed
``$ref``'d schema changes every source that loads it (``bind_schema`` holds the resolved schema). A file change
whose bytes equal those of the config running now is not reloaded again (an editor saving twice); SIGHUP always
reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bridge._tasks import cancel_and_wait
from bridge.config import BridgeConfig, SourceConfig

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger("bridge.reload")

# The watch reports a batch once the watched files stayed quiet this long (an editor's several writes are one
# reload), and at the latest after the debounce.
WATCH_STEP_MS = 200
WATCH_DEBOUNCE_MS = 2000

_WATCH_SETUP_S = 1.0  # the watch is set up well within this after it starts

RESTART_ONLY = ("engine", "observability", "state_dir")
"""Top-level settings a reload reports but does not apply: they need a restart."""


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    """What a reload does, per source id; ``kept``: the restart-only settings that changed (not applied)."""

    added: tuple[str, ...]
    changed: tuple[str, ...]
    removed: tuple[str, ...]
    unchanged: tuple[str, ...]
    kept: tuple[str, ...] = ()

    def describe(self) -> str:
        """``changed: inbox; added: audit; removed: none; unchanged: orders``."""
        parts = [f"{name}: {', '.join(ids) if ids else 'none'}" for name, ids in (
            ("changed", self.changed), ("added", self.added), ("removed", self.removed),
            ("unchanged", self.unchanged))]
        return "; ".join(parts)

    def restart_note(self) -> str | None:
        if not self.kept:
            return None
        return (f"{', '.join(self.kept)} changed: that needs a restart of `bridge up` to take effect; the running "
                "settings stay until then")


def same_source(a: SourceConfig, b: SourceConfig) -> bool:
    """Whether two parsed source configs are the same (where the source is declared in the file does not count)."""
    return dataclasses.replace(a, line=0) == dataclasses.replace(b, line=0)


def plan_reload(old: BridgeConfig, new: BridgeConfig) -> ReloadPlan:
    before = {s.id: s for s in old.sources}
    after = {s.id: s for s in new.sources}
    return ReloadPlan(
        added=tuple(sid for sid in after if sid not in before),
        changed=tuple(sid for sid in after if sid in before and not same_source(before[sid], after[sid])),
        removed=tuple(sid for sid in before if sid not in after),
        unchanged=tuple(sid for sid in after if sid in before and same_source(before[sid], after[sid])),
        kept=tuple(name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)),
    )


class ReloadStats:
    """Counts and the last outcome, for the metrics and the status line."""

    def __init__(self) -> None:
        self.applied = 0
        self.rejected = 0
        self.last_success_s = 0.0  # wall-clock time of the last config taken (the start counts)
        self.last_ok = True
        self._note: str | None = None

    def started(self, now: float) -> None:
        self.last_success_s = now

    def record_applied(self, now: float) -> None:
        self.applied += 1
        self.last_success_s = now
        self.last_ok = True
        self._note = f"config reloaded {time.strftime('%H:%M:%S', time.localtime(now))}"

    def record_rejected(self, now: float, errors: int) -> None:
        self.rejected += 1
        self.last_ok = False
        plural = "" if errors == 1 else "s"
        self._note = (f"config reload REFUSED {time.strftime('%H:%M:%S', time.localtime(now))} "
                      f"({errors} error{plural})")

    def status_note(self) -> str | None:
        """What the live status line shows of the last reload (None before the first)."""
        return self._note


def _digest(paths: Iterable[Path]) -> str:
    """The bytes of these files, hashed (a missing file counts as such)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError as exc:
            h.update(f"unreadable: {exc.errno}".encode())
        h.update(b"\0")
    return h.hexdigest()


class Reloader:
    """Reloads the config of a running :class:`~bridge.runtime.Runtime` on a file change (when ``watch``) and
    whenever :meth:`request` is called (SIGHUP). Runs on the runtime's loop."""

    def __init__(self, path: Path, config: BridgeConfig, *, watch: bool = True) -> None:
        """``path``: the config file as the user named it (diagnostics show it so); ``config``: the one loaded."""
        self._path = path
        self._watch_enabled = watch
        self._watched = self._files(config)
        self._digest = _digest(self._watched)
        self._runtime: Runtime | None = None
        self._wake = asyncio.Event()
        self._reasons: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_stop: asyncio.Event | None = None
        self._current: asyncio.Task[None] | None = None

    def _files(self, config: BridgeConfig) -> tuple[Path, ...]:
        return (config.path, *config.schema_files)

    def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._tasks.append(asyncio.create_task(self._loop(), name="config reload"))
        if self._watch_enabled:
            self._start_watch()
            self._tasks.append(asyncio.create_task(self._changed_while_starting(), name="config check at start"))
            log.info("watching %s for changes (reloads live; SIGHUP reloads too)",
                     ", ".join(str(p) for p in self._watched))

    def request(self, reason: str) -> None:
        """Reload soon (on the runtime's loop); requests arriving meanwhile are one reload."""
        self._reasons.append(reason)
        self._wake.set()

    async def close(self) -> None:
        """Stop watching; a reload under way is finished, not cut short (it may be restarting sources)."""
        if self._watch_stop is not None:
            self._watch_stop.set()
        await cancel_and_wait([*self._tasks, *([self._watch_task] if self._watch_task else [])])
        if self._current is not None and not self._current.done():
            await asyncio.wait([self._current])

    # watching ------------------------------------------------------------------------------------------------

    def _start_watch(self) -> None:
        self._watch_stop = asyncio.Event()
        self._watch_task = asyncio.create_task(self._watch(self._watched, self._watch_stop), name="config watch")

    async def _restart_watch(self) -> None:
        if self._watch_task is None or self._watch_stop is None:
            return
        self._watch_stop.set()
        await cancel_and_wait([self._watch_task])
        self._start_watch()

    async def _changed_while_starting(self) -> None:
        """An edit saved after the config was read but before the watch was set up reports nothing: once the watch
        surely runs, compare the files with what was read, and reload if they differ."""
        await asyncio.sleep(_WATCH_SETUP_S)
        if await asyncio.to_thread(_digest, self._watched) != self._digest:
            self.request("changed while starting")

    async def _watch(self, files: tuple[Path, ...], stop: asyncio.Event) -> None:
        from watchfiles import awatch

        wanted = {str(p) for p in files}
        # The directories, not the files: an editor that saves by writing a new file and renaming it over the old
        # one would leave a watch on the file itself looking at a file that is gone.
        dirs = sorted({str(p.parent) for p in files if p.parent.is_dir()})
        changes = awatch(
            *dirs,
            watch_filter=lambda _change, path: path in wanted,
            debounce=WATCH_DEBOUNCE_MS,
            step=WATCH_STEP_MS,
            stop_event=stop,
            recursive=False,
            ignore_permission_denied=True,
        )
        try:
            async with contextlib.aclosing(changes) as batches:
                async for batch in batches:
                    names = sorted({Path(path).name for _, path in batch})
                    self.request(f"{', '.join(names)} changed")
        except Exception as exc:  # the bridge runs on; only the live watch is gone
            log.error("the watch on the config failed (%s: %s); edits are no longer picked up, SIGHUP still reloads",
                      type(exc).__name__, exc)

    # reloading -----------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            reasons, self._reasons = self._reasons, []
            self._current = asyncio.create_task(self._reload_logged(reasons), name="config reload step")
            await asyncio.shield(self._current)  # a close() waits for it instead of cutting it short

    async def _reload_logged(self, reasons: list[str]) -> None:
        try:
            await self.reload_once(reasons)
        except Exception:
            log.exception("config reload failed unexpectedly; the running config stays")

    async def reload_once(self, reasons: list[str]) -> None:
        from bridge.config import check_config
        from bridge.config.diagnostics import summary

        runtime = self._runtime
        assert runtime is not None
        forced = "SIGHUP" in reasons
        digest = await asyncio.to_thread(_digest, self._watched)
        if not forced and digest == self._digest:
            log.debug("config files touched but unchanged; nothing to reload")
            return
        why = "; ".join(dict.fromkeys(reasons)) or "requested"
        config, problems = await asyncio.to_thread(check_config, self._path)
        for problem in problems:
            (log.error if problem.is_error else log.warning)("%s", problem.format_text())
        if config is None:
            errors = sum(p.is_error for p in problems)
            runtime.reloads.record_rejected(time.time(), errors)
            log.error("config reload refused (%s): %s is invalid (%s); the running config stays", why, self._path,
                      summary(problems))
            self._digest = digest  # the same broken bytes are not checked again; a fix is a change
            return
        plan = await runtime.reload(config)
        runtime.reloads.record_applied(time.time())
        note = plan.restart_note()
        line = f"config reloaded ({why}): {plan.describe()}"
        if note is None:
            log.info("%s", line)
        else:
            log.warning("%s; %s", line, note)
        self._digest = digest
        files = self._files(config)
        if files != self._watched:
            self._watched = files
            self._digest = await asyncio.to_thread(_digest, files)
            if self._watch_enabled:
                await self._restart_watch()
