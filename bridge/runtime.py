"""The supervisor: starts the sources and the engine link, wires them together, shuts down cleanly.

Data flows one way: source → event → dispatcher → done → the source's acknowledgement hook. Back-pressure is
the in-flight window of each source (``max_in_flight``): ``submit`` waits while it is full, so a source never
runs ahead of delivery and memory stays bounded whatever the backlog.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bridge._tasks import cancel_and_wait, first_then_cancel
from bridge._window import Window
from bridge.bindings import Binding, BindingTable
from bridge.config import BridgeConfig, DeadLetterConfig, SourceConfig, redact_dsn
from bridge.config.schemas import BindValidator
from bridge.deadletter import DeadLetterSink, destination_key, open_destination
from bridge.dispatch import Dispatcher, Invocation, Invoker, Stats
from bridge.errors import BindConfigError
from bridge.reload import Reloader, ReloadPlan, ReloadStats, plan_reload
from bridge.sources import SHUTDOWN_GRACE_S, Event, OnDone, Source, spec_of
from bridge.status import SourceStatus, StatusLine, status_enabled

if TYPE_CHECKING:
    from bridge.engine import EngineLink, TriggerTypeSpec
    from bridge.metrics import MetricsServer

log = logging.getLogger("bridge.runtime")

DRAIN_TIMEOUT_S = SHUTDOWN_GRACE_S
"""How long shutdown waits for in-flight events before leaving them unacknowledged."""


@dataclasses.dataclass(frozen=True)
class SourceReport:
    """One source as the metrics see it: its counters and state, and its Source object (for the figures its kind
    declares), None until it first starts."""

    id: str
    stats: Stats
    in_flight: int
    bindings: int
    expired_bindings: int
    running: bool
    source: Source | None


class SourceRunner:
    """The Sink a source submits to: the in-flight window, per-key ordering, and the acknowledgement hook."""

    def __init__(
        self,
        config: SourceConfig,
        dispatcher: Dispatcher,
        table: BindingTable,
        on_activate: Callable[[str], None] | None = None,
        on_deactivate: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._on_activate = on_activate
        self._on_deactivate = on_deactivate
        self.dispatcher = dispatcher
        self.table = table
        self.stats = dispatcher.stats
        self._window = Window(config.max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        # Events of one order key that wait for their turn, the first being delivered; one task works through
        # each lane and ends when it is empty (see :meth:`_run_lane`).
        self._lanes: dict[Any, deque[tuple[Event, OnDone]]] = {}

    # Sink ----------------------------------------------------------------------------------------------------

    async def submit(self, event: Event, on_done: OnDone) -> None:
        waited = False
        while not self.offer(event, on_done, waited=waited):
            if not self.table.ready:
                # Nothing bound, or every binding stale (the engine link dropped and has not replayed them yet):
                # the source waits either way, so an outage holds events instead of letting them run ahead.
                await self.table.wait_ready()
                continue
            await self._window.wait_turn()
            waited = True

    def offer(self, event: Event, on_done: OnDone, *, waited: bool = False) -> bool:
        """Start delivering ``event`` now if a live (not stale) binding exists and the window has room (and no
        earlier submit waits for it); False, accepting nothing, otherwise. The source's fast path: no task switch
        before the delivery starts.

        An event with an order key joins the lane of its key: the lane's task delivers its events one after the
        other, in submit order, each right after the one before it is done (no task, future or loop turn of its
        own per event). Any other event gets a task of its own."""
        if not self.table.ready or not self._window.take(waited=waited):
            return False
        key = event.order_key
        if key is None:
            self._start(self._run_one(event, on_done), event)
            return True
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append((event, on_done))  # its task is delivering an earlier event: this one comes next
            return True
        lane = self._lanes[key] = deque(((event, on_done),))
        self._start(self._run_lane(key, lane), event)
        return True

    def _start(self, work: Coroutine[Any, Any, None], event: Event) -> None:
        task = asyncio.create_task(work, name=f"event {event.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def peak_in_flight(self) -> int:
        return self._window.peak

    def has_bindings(self) -> bool:
        return len(self.table) > 0

    async def wait_for_bindings(self) -> None:
        await self.table.wait_non_empty()

    def in_flight(self) -> int:
        return self._window.taken

    def window_full(self) -> bool:
        return self._window.full

    def activate(self) -> None:
        if self._on_activate is not None:
            self._on_activate(self.config.id)

    def deactivate(self) -> None:
        if self._on_deactivate is not None:
            self._on_deactivate(self.config.id)

    # delivery ------------------------------------------------------------------------------------------------

    async def _run_one(self, event: Event, on_done: OnDone) -> None:
        try:
            await self._deliver(event, on_done)
        finally:
            self._window.release()

    async def _run_lane(self, key: Any, lane: deque[tuple[Event, OnDone]]) -> None:
        """Deliver the events of one order key in submit order, retries included: the next one starts only once
        the one before it is done (acknowledged, or its acknowledgement failed). Events offered meanwhile join
        the lane; the task ends when the lane is empty, and the key's next event starts a new one."""
        try:
            while lane:
                event, on_done = lane[0]
                await self._deliver(event, on_done)
                lane.popleft()
                self._window.release()
        finally:
            # Cancelled (at shutdown, past the drain timeout): what is left stays unacknowledged; its slots free.
            for _ in range(len(lane)):
                self._window.release()
            lane.clear()
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _deliver(self, event: Event, on_done: OnDone) -> None:
        """Deliver one event and acknowledge it; raises only on cancellation."""
        try:
            if len(self.table) == 0:
                await self.table.wait_non_empty()
            try:
                outcome = await self.dispatcher.deliver(event)
            except Exception as exc:
                # The dispatcher handles every failure of a delivery; reaching here is a bug. The event must
                # still end: it is dead-lettered (internal_error, no binding) and acknowledged, so it cannot
                # hold its partition, outbox row or file. The dead letter is retried until it is durable (as
                # any dead letter: the dispatcher holds the event while the destination refuses, and treats
                # any error of the destination as a refusal), so the event is never acknowledged unrecorded.
                log.exception("event %s of %s: unexpected error while delivering it; dead-lettering it",
                              event.id, self.config.id, extra=self._log_extra(event))
                outcome = await self.dispatcher.dead_letter_internal_error(event, exc)
            try:
                await on_done(outcome)
            except Exception:
                log.exception("event %s of %s: acknowledgement failed; it stays unacknowledged", event.id,
                              self.config.id, extra=self._log_extra(event))
        except Exception:
            # Only waiting for bindings can get here (a plain future): log it loudly, the event stays
            # unacknowledged and a restart redelivers it.
            log.exception("event %s of %s: unexpected error; it stays unacknowledged", event.id, self.config.id,
                          extra=self._log_extra(event))

    def _log_extra(self, event: Event) -> dict[str, Any]:
        return {"trigger_type": self.config.id, "event_id": event.id}

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight events; cancel what is left after ``timeout_s``. Returns how many events were
        abandoned (being delivered, or waiting in a lane for their turn)."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        abandoned = self._window.taken if pending else 0
        await cancel_and_wait(pending)
        return abandoned


class DryRunInvoker:
    """`bridge up --dry-run`: prints each rendered payload as one JSON line instead of invoking anything."""

    connected = True

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self._out = out

    async def wait_connected(self) -> None:
        return None

    async def invoke(self, call: Invocation) -> Any:
        line = json.dumps({"function_id": call.function_id, "payload": call.payload}, ensure_ascii=False, default=str)
        self._out.write(line + "\n")
        self._out.flush()
        return None


class Runtime:
    """Runs every configured source until ``stop`` is set, on the engine link's loop (see :func:`run_up`)."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        link: EngineLink | None = None,
        dry_run: bool = False,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        out: TextIO = sys.stdout,
        status: TextIO | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        """``link``: the engine link, whose loop :meth:`run` must run on (a dry run has none and needs none).
        ``status``: draw the live status line on this stream (a terminal) while running. ``reloader``: watches the
        config and calls :meth:`reload` (see :mod:`bridge.reload`)."""
        if link is None and not dry_run:
            raise ValueError("a Runtime needs an engine link, unless it is a dry run")
        self._dry_run_dir: tempfile.TemporaryDirectory[str] | None = None
        if dry_run:
            self._dry_run_dir = tempfile.TemporaryDirectory(prefix="bridge-dry-run-")
            config = _dry_run_config(config, Path(self._dry_run_dir.name))
        self.config = config
        self.dry_run = dry_run
        self.drain_timeout_s = drain_timeout_s
        self._out = out
        self.runners: dict[str, SourceRunner] = {}
        self.tables: dict[str, BindingTable] = {}
        self.validators: dict[str, BindValidator] = {}
        self._sinks: dict[str, DeadLetterSink] = {}
        self._link = None if dry_run else link
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self.sources: dict[str, Source] = {}  # the current Source object of each source (metrics read it)
        self.source_states: dict[str, str] = {}  # "running", or why not (readiness, metrics)
        self._status_stream = status
        self._status_task: asyncio.Task[None] | None = None
        self._metrics: MetricsServer | None = None
        self._stopping = False
        self._refused = asyncio.Event()  # the engine refused this bridge for good: `bridge up` exits 1
        self._invoker: Invoker | None = None
        self._reloader = reloader
        self._reload_lock = asyncio.Lock()
        self._reloading: dict[str, str] = {}  # source id -> "changed" or "removed": a reload is stopping it
        self.reloads = ReloadStats()

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # First, so that a port already taken stops the start before anything else was set up.
        if cfg.observability.listen and not await self._serve_metrics(cfg.observability.listen):
            if self._dry_run_dir is not None:
                self._dry_run_dir.cleanup()
            return 1
        self._invoker = self._make_invoker()
        for source in cfg.sources:
            self._prepare_source(source, Stats())
        if self.dry_run:
            for source in cfg.sources:
                self._bind_dry_run(source)
        else:
            self._start_engine()
        for source in cfg.sources:
            self._start_source(source)
        self.reloads.started(time.time())
        log.info(
            "bridge up: %d source(s) running (%s)%s",
            len(cfg.sources),
            ", ".join(f"{s.id} [{s.kind}]" for s in cfg.sources),
            " in dry-run mode (payloads are printed, nothing is invoked)" if self.dry_run else "",
        )
        if self._status_stream is not None:
            line = StatusLine(self._status_stream, self.status_snapshot, mode=self.engine_mode,
                              note=self.reloads.status_note)
            self._status_task = asyncio.create_task(line.run(), name="status line")
        if self._reloader is not None:
            self._reloader.start(self)
        stopping = asyncio.create_task(stop.wait(), name="stop signal")
        refused = asyncio.create_task(self._refused.wait(), name="engine refusal")
        await first_then_cancel([stopping, refused])
        if self._reloader is not None:
            await self._reloader.close()
        await self.shutdown()
        return 1 if self._refused.is_set() else 0

    def _engine_refused(self, message: str) -> None:
        """The engine refused this bridge for good (the SDK stopped reconnecting): stop, and exit 1."""
        self._refused.set()

    async def shutdown(self) -> None:
        self._stopping = True
        if self._status_task is not None:
            await cancel_and_wait([self._status_task])
        log.info("shutting down: no new events; waiting up to %.0f s for in-flight ones", self.drain_timeout_s)
        # Sources stop intake at once but go on acknowledging what finishes during the drain, so both run
        # together.
        async with self._reload_lock:  # a reload under way finishes first (it may be starting sources)
            abandoned = await self._stop_sources(list(self.runners))
        if abandoned:
            log.warning("%d event(s) were still in flight; they stay unacknowledged and come back", abandoned)
        await self._close_resources()
        log.info("bridge stopped")

    async def _stop_sources(self, source_ids: list[str]) -> int:
        """Stop these sources as at shutdown: intake stops at once, in-flight events get up to ``drain_timeout_s``
        to finish and be acknowledged (both run together). Returns how many events were abandoned."""
        runners = [self.runners[sid] for sid in source_ids if sid in self.runners]
        tasks = [self._source_tasks[sid] for sid in source_ids if sid in self._source_tasks]
        drains = [r.drain(self.drain_timeout_s) for r in runners]
        results = await asyncio.gather(*drains, cancel_and_wait(tasks), return_exceptions=True)
        return sum(r for r in results[: len(drains)] if isinstance(r, int))

    # reloading -----------------------------------------------------------------------------------------------

    async def reload(self, new: BridgeConfig) -> ReloadPlan:
        """Apply a new, valid config source by source (DESIGN §4): unchanged sources are not touched; changed ones
        drain, stop and start again with their new config (their trigger type is registered again, so the engine
        replays every binding against the new bind schema); added ones start and advertise; removed ones drain
        and stop. ``engine``, ``observability`` and ``state_dir`` need a restart: they are kept as they run."""
        async with self._reload_lock:
            if self._stopping:
                return ReloadPlan((), (), (), ())  # too late: the bridge is stopping
            if self._dry_run_dir is not None:
                new = _dry_run_config(new, Path(self._dry_run_dir.name))
            plan = plan_reload(self.config, new)
            # Counters go on across a change (a Prometheus counter that drops reads as a restart).
            stats = {sid: self.runners[sid].stats for sid in plan.changed}
            expired = {sid: self.tables[sid].expired for sid in plan.changed}
            self._reloading = {**dict.fromkeys(plan.changed, "changed"), **dict.fromkeys(plan.removed, "removed")}
            try:
                abandoned = await self._stop_sources([*plan.removed, *plan.changed])
            finally:
                self._reloading = {}
            if abandoned:
                log.warning("reload: %d event(s) were still in flight after %.0f s; they stay unacknowledged and "
                            "come back", abandoned, self.drain_timeout_s)
            for sid in plan.removed:
                self._forget_source(sid)
                if self._link is not None:
                    self._link.withdraw(sid)
            fresh = {s.id: s for s in new.sources}
            for sid in plan.changed:
                self._forget_source(sid)
            for sid in (*plan.changed, *plan.added):
                source = fresh[sid]
                try:
                    self._prepare_source(source, stats.get(sid, Stats()))
                    self.tables[sid].expired = expired.get(sid, 0)
                    if self._link is not None:
                        self._link.provide(self._spec(source))
                    else:
                        self._bind_dry_run(source)
                    self._start_source(source)
                except Exception as exc:  # one source that cannot start must not keep the others stopped
                    self._forget_source(sid)
                    log.error("reload: source %s could not be started: %s; it stays stopped until the next reload",
                              sid, redact_dsn(str(exc)), extra={"trigger_type": sid})
            # The status line and the metrics list sources in file order.
            self.runners = {s.id: self.runners[s.id] for s in new.sources if s.id in self.runners}
            # What runs now: a source that could not start is left out, so the next reload adds it again.
            self.config = dataclasses.replace(
                new, engine=self.config.engine, observability=self.config.observability,
                state_dir=self.config.state_dir, path=self.config.path,
                sources=tuple(s for s in new.sources if s.id in self.runners),
            )
            return plan

    def _prepare_source(self, source: SourceConfig, stats: Stats) -> None:
        assert self._invoker is not None
        table = BindingTable(source.id)
        self.tables[source.id] = table
        self.validators[source.id] = BindValidator(source.id, source.bind_schema)
        dispatcher = Dispatcher(source, table, self._invoker, self._dead_letters(source), stats=stats)
        self.runners[source.id] = SourceRunner(source, dispatcher, table, self._activate, self._deactivate)
        self.source_states[source.id] = "starting"

    def _start_source(self, source: SourceConfig) -> None:
        self._source_tasks[source.id] = asyncio.create_task(
            self._supervise(source, self.runners[source.id]), name=f"source {source.id}"
        )

    def _forget_source(self, source_id: str) -> None:
        self.runners.pop(source_id, None)
        self.tables.pop(source_id, None)
        self.validators.pop(source_id, None)
        self._source_tasks.pop(source_id, None)
        self.sources.pop(source_id, None)
        self.source_states.pop(source_id, None)

    async def _close_resources(self) -> None:
        for sink in self._sinks.values():
            await sink.close()
        if self._metrics is not None:
            await self._metrics.close()
        if self._link is not None:
            await self._link.close()
        if self._dry_run_dir is not None:
            self._dry_run_dir.cleanup()

    # observation ---------------------------------------------------------------------------------------------

    def engine_connected(self) -> bool:
        if self.dry_run:
            return True
        return self._link is not None and bool(self._link.connected)

    def engine_mode(self) -> str | None:
        """``trigger`` or ``observe``: how the sources are offered to the connected engine (None: not known yet)."""
        return None if self._link is None else self._link.mode

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): the engine link is up and every source runs."""
        if self._stopping:
            return False, "shutting down"
        reasons = [] if self.engine_connected() else ["the iii engine is not connected"]
        reasons += [f"source {sid} is {state}" for sid, state in self.source_states.items() if state != "running"]
        return not reasons, "; ".join(reasons)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the metrics endpoint listens on, once it does (port 0 in the config: the one chosen)."""
        return self._metrics.address if self._metrics is not None else None

    def status_snapshot(self) -> tuple[bool, list[SourceStatus]]:
        """What the live status line shows: the engine state and each source's counters."""
        rows = [
            SourceStatus(sid, len(r.table), r.stats.received, r.in_flight(), r.stats.dead_lettered)
            for sid, r in self.runners.items()
        ]
        return self.engine_connected(), rows

    def source_reports(self) -> list[SourceReport]:
        """What the metrics read of each source at a scrape (on the bridge loop)."""
        return [
            SourceReport(sid, r.stats, r.in_flight(), len(r.table), r.table.expired,
                         self.source_states.get(sid) == "running", self.sources.get(sid))
            for sid, r in self.runners.items()
        ]

    async def _serve_metrics(self, listen: str) -> bool:
        from bridge.metrics import MetricsServer

        server = MetricsServer(self, listen)
        try:
            await server.start()
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s; fix observability.listen (nothing was started)", listen, exc)
            return False
        self._metrics = server
        return True

    # wiring --------------------------------------------------------------------------------------------------

    def _make_invoker(self) -> Invoker:
        if self._link is None:
            return DryRunInvoker(self._out)
        return self._link

    def _start_engine(self) -> None:
        assert self._link is not None

        self._link.start([self._spec(s) for s in self.config.sources], on_fatal=self._engine_refused)

    def _spec(self, source: SourceConfig) -> TriggerTypeSpec:
        from bridge.engine import TriggerTypeSpec

        return TriggerTypeSpec(
            id=source.id,
            description=source.description,
            bind=self.validators[source.id],
            payload_schema=source.payload_schema,
            table=self.tables[source.id],
            exclusive=spec_of(source).exclusive(source),
            function_id=source.function_id,
        )

    def _activate(self, source_id: str) -> None:
        if self._link is not None:
            self._link.activate(source_id)

    def _deactivate(self, source_id: str) -> None:
        if self._link is not None:
            self._link.deactivate(source_id, reload=self._reloading.get(source_id))

    def _bind_dry_run(self, source: SourceConfig) -> None:
        try:
            config = self.validators[source.id].check({})
        except BindConfigError as exc:
            log.info("dry run: %s needs a bind config (%s); rendering with an empty one", source.id, exc)
            config = {}
        self.tables[source.id].upsert(
            Binding(id="dry-run", trigger_type=source.id, function_id=f"dry-run::{source.id}",
                    namespace=None, config=config)
        )

    def _dead_letters(self, source: SourceConfig) -> DeadLetterSink:
        config = source.delivery.dead_letter
        key = destination_key(config, source)
        if key not in self._sinks:
            self._sinks[key] = open_destination(config, source)
        return self._sinks[key]

    async def _supervise(self, config: SourceConfig, runner: SourceRunner) -> None:
        """Run one source; if it fails, log why and start it again (one source never stops the bridge)."""
        delay = 1.0
        while True:
            try:
                source = spec_of(config).open_source(config, self.config.state_dir, dry_run=self.dry_run)
                self.sources[config.id] = source
                self.source_states[config.id] = "running"
                await source.run(runner)
                self.source_states[config.id] = "finished"
                log.info("source %s finished", config.id, extra={"trigger_type": config.id})
                return
            except asyncio.CancelledError:
                self.source_states[config.id] = "stopped"
                raise
            except Exception as exc:
                reason = redact_dsn(str(exc))
                self.source_states[config.id] = f"restarting after an error ({reason})"
                log.error("source %s failed: %s; restarting it in %.0f s", config.id, reason, delay,
                          exc_info=log.isEnabledFor(logging.DEBUG), extra={"trigger_type": config.id})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


def _dry_run_config(config: BridgeConfig, scratch: Path) -> BridgeConfig:
    """A dry run changes nothing: scratch state, dead letters in scratch. What each source must not touch (locks,
    offsets, rows, files) it leaves alone itself, told by the ``dry_run`` flag (see ``KindSpec.open_source``)."""
    sources = []
    for s in config.sources:
        dead_letter = DeadLetterConfig(file=scratch / "dead-letters.jsonl")
        delivery = dataclasses.replace(s.delivery, dead_letter=dead_letter, mode="sync")
        sources.append(dataclasses.replace(s, delivery=delivery))
    return dataclasses.replace(config, state_dir=scratch, sources=tuple(sources))


def install_signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, on_second: Callable[[], None],
    on_hup: Callable[[], None] | None = None,
) -> None:
    """First SIGINT/SIGTERM: set ``stop`` on ``loop`` (graceful stop). Second: ``on_second`` (exit at once).
    SIGHUP: ``on_hup()`` on ``loop`` (reload the config), when given.

    Installed on the main thread, which is not the thread the runtime runs on when an engine link owns its loop;
    the handlers run there and hand the stop over to the loop."""
    import signal

    received: list[str] = []

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("second %s: exiting now; in-flight events stay unacknowledged", name)
            on_second()
            return
        received.append(name)
        log.info("%s received", name)
        loop.call_soon_threadsafe(stop.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    if on_hup is not None:
        def hup(_signum: int, _frame: object) -> None:
            log.info("SIGHUP received: reloading the config")
            loop.call_soon_threadsafe(on_hup)

        signal.signal(signal.SIGHUP, hup)


def run_up(
    config: BridgeConfig, *, dry_run: bool = False, quiet: bool = False, config_path: Path | None = None,
    watch: bool = True,
) -> int:
    """`bridge up`: run until SIGINT/SIGTERM; exit 0 after a graceful stop. The live status line is drawn on
    stderr when it is a terminal, unless ``quiet``. With ``config_path`` (the file as the user named it), the
    config is reloaded live on SIGHUP and, when ``watch``, whenever it or a schema file it loads changes.

    With an engine, the runtime runs on the engine link's loop (the SDK's own: DESIGN §5, "One event loop"); a
    dry run connects to nothing and runs on a loop of its own."""
    import os

    status = sys.stderr if status_enabled(sys.stderr, quiet=quiet) else None
    stop = asyncio.Event()
    loop = asyncio.new_event_loop() if dry_run else None
    link = None
    if not dry_run:
        from bridge.engine import EngineLink

        link = EngineLink(config.engine)
        loop = link.loop
    assert loop is not None

    async def main() -> int:
        # Made on the loop it runs on (its events belong there).
        reloader = Reloader(config_path, config, watch=watch) if config_path is not None else None
        if reloader is not None:
            hup_target.append(reloader)
        return await Runtime(config, link=link, dry_run=dry_run, status=status, reloader=reloader).run(stop)

    hup_target: list[Reloader] = []

    def on_hup() -> None:
        for reloader in hup_target:
            reloader.request("SIGHUP")

    install_signal_handlers(loop, stop, lambda: os._exit(1), on_hup if config_path is not None else None)
    if link is None:
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(main())
    return link.run(main())
