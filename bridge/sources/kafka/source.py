"""The ``kafka`` source: a consumer group's records become events. aiokafka is imported only in the kafka modules:
this one, ``_assign`` (group membership or the dry run's manual assignment), ``_deadletter`` (the dead-letter
destination) and ``_conn`` (client settings).

Flow: nothing joins the group until a function is bound. Then a *fetch* task polls ``getmany`` into a small
per-partition buffer and a *submit* task hands buffered records to the sink, round-robin over partitions, each
partition in offset order. Once an event is done its offset counts as done; a *commit* task commits every
``commit_interval_ms`` the lowest offset of each partition that is not done (see
:mod:`bridge.sources.kafka._offsets`), so a commit never passes an unfinished event: at-least-once.

Back-pressure without head-of-line blocking: each partition gets a share of the in-flight window, so a partition
stuck on retries holds at most its share while the others go on, and a cap of outstanding records (buffered + in
flight; see :mod:`bridge.sources.kafka._flow`); near that cap it is left out of the polls until it drained some,
and the client keeps at most one fetched batch of it meanwhile, so memory stays bounded whatever the backlog. The
fetch task never waits on the sink, so the member keeps polling and heartbeating however slow delivery is. With no
binding every partition is paused (the member stays in the group) and nothing is committed for events nobody
received.

Ordering: ``partition`` gives every event of a partition the order key (topic, partition), ``key`` the key
(topic, partition, key bytes) (a null key falls back to the partition), ``none`` none; the runtime then runs
events of one order key one at a time in submit order, retries included.

Rebalance: a revoked partition first commits what is done; its buffered records are dropped and its in-flight
events abandoned (their acknowledgement changes nothing: the partition's track is retired). Whoever gets the
partition next resumes from the committed offset, so abandoned events may be delivered twice, never lost.
Cancellation stops intake at once, waits up to ``shutdown_grace_s`` for in-flight events, commits what is done,
leaves the group and closes the consumer.

Dry run (``bridge up --dry-run``): the source reads every partition of its topics without joining the group,
from the group's committed offsets on, and never commits (see :mod:`~bridge.sources.kafka._assign`), so live
bridges keep their partitions and lose nothing the dry run shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from bridge._tasks import cancel_and_wait, first_ended
from bridge.config import SourceConfig
from bridge.sources import SHUTDOWN_GRACE_S, Event, OnDone, Outcome, Sample, Sink
from bridge.sources.kafka._assign import DryRunAssignment, GroupListener, subscribe, topics_text
from bridge.sources.kafka._conn import at_most, connection_options, consumer_options, tp_text
from bridge.sources.kafka._deadletter import KafkaDeadLetter, kafka_dead_letter
from bridge.sources.kafka._decode import record_event
from bridge.sources.kafka._flow import Shares
from bridge.sources.kafka._offsets import PartitionTrack
from bridge.sources.kafka._probe import explain_connection_failure
from bridge.sources.kafka.spec import KafkaSourceConfig

__all__ = ["KafkaDeadLetter", "KafkaSource", "connection_options", "kafka_dead_letter"]

log = logging.getLogger("bridge.sources.kafka")

_FETCH_WAIT_MS = 1000  # longest wait of one poll; arriving data ends it at once
_SHORT_FETCH_WAIT_MS = 10  # the same while a partition at its cap waits to be polled again
_IDLE_WAIT_S = 1.0  # while nothing may be polled: how often the fetch loop looks around anyway
_LIVENESS_POLL_S = 10.0  # ... and how often it polls all the same, which keeps the member in the group
_COMMIT_TIMEOUT_S = 5.0  # a commit on revoke or shutdown gives up after this long (the next owner redelivers)
_CLOSE_TIMEOUT_S = 10.0


class KafkaSource:
    """Consumes ``config.kind_config.topics`` (or ``topic_pattern``); see the module docstring."""

    def __init__(
        self,
        config: SourceConfig,
        state_dir: Path,
        *,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        dry_run: bool = False,
    ) -> None:
        if not isinstance(config.kind_config, KafkaSourceConfig):
            raise TypeError(f"source {config.id} is not a kafka source")
        self.config = config
        self._kc: KafkaSourceConfig = config.kind_config
        self._grace_s = shutdown_grace_s
        self._dry_run = dry_run
        self._shares = Shares(config.max_in_flight, self._kc.ordering)
        self._consumer: Any = None
        self._parts: dict[tuple[str, int], PartitionTrack] = {}
        self._sink: Sink | None = None
        self._wake = asyncio.Event()  # something to submit may be there: records fetched, an event done
        self._room = asyncio.Event()  # a partition left out of the polls (at its cap) may be polled again
        self._idle = asyncio.Event()  # set at shutdown once no event is in flight
        self._held = False  # every partition paused because nothing is bound
        self._stopping = False
        self._round = 0
        self._low_water = 0  # a done event wakes the submit task once its partition has no more undone than this
        self._window_blocked = False  # the last submit round stopped at a full in-flight window
        self._committed: dict[tuple[str, int], int] = {}

    # --- read-only views (tests, metrics, dead letters) ---------------------------------------------------------

    def committed_positions(self) -> dict[tuple[str, int], int]:
        """(topic, partition) → the last offset position this source committed successfully."""
        return dict(self._committed)

    def lag(self) -> dict[tuple[str, int], int]:
        """(topic, partition) → records between the lowest offset not done and the partition's high watermark,
        for assigned partitions whose both figures are known (something was fetched in this assignment)."""
        out: dict[tuple[str, int], int] = {}
        consumer = self._consumer
        if consumer is None:
            return out
        assigned = consumer.assignment()
        for part in list(self._parts.values()):
            tp = TopicPartition(part.topic, part.partition)
            position = part.position()
            if position is None or tp not in assigned:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                out[part.key] = max(0, highwater - position)
        return out

    def outstanding(self) -> dict[tuple[str, int], int]:
        """(topic, partition) → records received and not done (buffered + in flight), per assigned partition."""
        return {key: part.outstanding for key, part in list(self._parts.items())}

    def assigned(self) -> set[tuple[str, int]]:
        """(topic, partition) of every partition this source holds right now."""
        return set(self._parts)

    def figures(self) -> dict[str, list[Sample]]:
        """``bridge_kafka_lag`` per assigned partition (see :meth:`lag`)."""
        return {"bridge_kafka_lag": [((topic, str(partition)), lag) for (topic, partition), lag in self.lag().items()]}

    # --- the run ----------------------------------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        kc = self._kc
        self._sink = sink
        if not sink.has_bindings():
            log.info("kafka source %s: no function is bound; %s once one is", self.config.id,
                     "reading (dry run)" if self._dry_run else f"joining group {kc.group_id}")
            await sink.wait_for_bindings()
        consumer = self._consumer = AIOKafkaConsumer(**consumer_options(kc))
        tasks: list[asyncio.Task[None]] = []
        dry_run: DryRunAssignment | None = None
        subscribed = False
        try:
            await consumer.start()
            if self._dry_run:
                dry_run = DryRunAssignment(consumer, self.config.id, kc, self._parts, on_revoked=self._on_revoked,
                                           on_assigned=self._on_assigned)
                log.info("kafka source %s: dry run: reading %s on %s without joining group %s or committing, from "
                         "the group's committed offsets (start_from %s where it has none)", self.config.id,
                         topics_text(kc), kc.bootstrap_servers, kc.group_id, kc.start_from)
                await dry_run.start()
                tasks.append(asyncio.create_task(dry_run.run(), name=f"{self.config.id} discover"))
            else:
                subscribe(consumer, kc, GroupListener(self._on_revoked, self._on_assigned))
                log.info("kafka source %s: subscribed to %s on %s as group %s (start_from %s, ordering %s)",
                         self.config.id, topics_text(kc), kc.bootstrap_servers, kc.group_id, kc.start_from,
                         kc.ordering)
                subscribed = True
                tasks.append(asyncio.create_task(self._commit_loop(), name=f"{self.config.id} commit"))
            tasks += [
                asyncio.create_task(self._fetch_loop(sink), name=f"{self.config.id} fetch"),
                asyncio.create_task(self._submit_loop(sink), name=f"{self.config.id} submit"),
            ]
            await first_ended(tasks)
            raise RuntimeError(f"kafka source {self.config.id}: its consumer loop ended")
        except KafkaConnectionError as exc:
            # aiokafka keeps the cause (a TLS alert, a refused certificate) to its debug log: find it out.
            cause = await explain_connection_failure(kc)
            if cause is None:
                log.error("kafka source %s: the Kafka client failed: %s; check that %s is reachable and the "
                          "security settings; the source is started again", self.config.id, exc,
                          kc.bootstrap_servers)
                raise
            log.error("kafka source %s: cannot connect to Kafka: %s; the source is started again", self.config.id,
                      cause)
            raise KafkaConnectionError(f"cannot connect to Kafka: {cause}") from exc
        except KafkaError as exc:
            log.error("kafka source %s: the Kafka client failed: %s; check that %s is reachable and the "
                      "security settings; the source is started again", self.config.id, exc, kc.bootstrap_servers)
            raise
        finally:
            try:
                await self._shut_down(consumer, tasks, subscribed)
            finally:
                if dry_run is not None:
                    await dry_run.close()

    async def _shut_down(self, consumer: Any, tasks: list[asyncio.Task[None]], subscribed: bool) -> None:
        self._stopping = True
        await cancel_and_wait(tasks)
        parts = list(self._parts.values())
        try:
            self._set_paused([p for p in parts if not p.paused], True)
            for part in parts:
                part.drop_buffer()
            if self._grace_s > 0 and any(p.undone for p in parts):
                self._idle.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), self._grace_s)
            # A rebalance during the grace may have revoked (and committed) some of them already.
            await self._commit([p for p in parts if p.current], "shutdown", timeout_s=_COMMIT_TIMEOUT_S)
        finally:
            left = sum(p.undone for p in parts)
            for part in parts:
                part.current = False
            self._parts.clear()
            try:
                await asyncio.wait_for(consumer.stop(), _CLOSE_TIMEOUT_S)
            except (TimeoutError, KafkaError) as exc:
                log.warning("kafka source %s: closing the consumer failed: %r", self.config.id, exc)
            if self._dry_run:
                log.info("kafka source %s: dry run stopped; nothing was committed", self.config.id)
            elif left:
                log.info("kafka source %s: stopped with %d event(s) in flight; they were not committed and come "
                         "back on the next start", self.config.id, left)
            elif subscribed:
                log.info("kafka source %s: stopped and left group %s", self.config.id, self._kc.group_id)

    # --- partitions -------------------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[Any]) -> None:
        parts = [p for p in (self._parts.pop((tp.topic, tp.partition), None) for tp in revoked) if p is not None]
        if not parts:
            return
        abandoned = 0
        for part in parts:
            part.drop_buffer()
            abandoned += part.undone
        # Retired before committing: acknowledgements arriving from now on belong to the next owner's run.
        for part in parts:
            part.current = False
        await self._commit(parts, "revoke", timeout_s=_COMMIT_TIMEOUT_S)
        log.info("kafka source %s: partitions revoked: %s (%d in-flight event(s) abandoned; they come back from "
                 "the committed offset)", self.config.id, tp_text(p.key for p in parts), abandoned)

    def _on_assigned(self, assigned: set[Any]) -> None:
        for tp in assigned:
            self._track(tp)
        log.info("kafka source %s: partitions assigned: %s", self.config.id,
                 tp_text((tp.topic, tp.partition) for tp in assigned))
        if self._sink is not None and not self._stopping:
            self._apply_hold(self._sink)
        self._room.set()  # new partitions may be polled at once

    def _track(self, tp: Any) -> PartitionTrack:
        key = (tp.topic, tp.partition)
        part = self._parts.get(key)
        if part is None:
            part = self._parts[key] = PartitionTrack(tp.topic, tp.partition)
        return part

    def _set_paused(self, parts: list[PartitionTrack], paused: bool) -> None:
        consumer = self._consumer
        if not parts or consumer is None:
            return
        assigned = consumer.assignment()
        tps = [tp for tp in (TopicPartition(p.topic, p.partition) for p in parts) if tp in assigned]
        for part in parts:
            part.paused = paused
        if tps:
            (consumer.pause if paused else consumer.resume)(*tps)

    def _apply_hold(self, sink: Sink) -> bool:
        """Pause every partition while nothing is bound, resume them when a binding is back."""
        held = not sink.has_bindings()
        if held != self._held:
            self._held = held
            if held:
                log.info("kafka source %s: no function is bound any more; partitions paused, nothing committed for "
                         "what nobody received", self.config.id)
            else:
                log.info("kafka source %s: a function is bound; partitions resumed", self.config.id)
        self._set_paused([p for p in self._parts.values() if p.paused != held], held)
        return held

    def _assigned_count(self) -> int:
        return len(self._consumer.assignment()) if self._consumer is not None else 1

    # --- fetching ---------------------------------------------------------------------------------------------

    async def _fetch_loop(self, sink: Sink) -> None:
        """Polls only partitions below their cap: the client keeps at most one fetched batch per partition it is
        not asked for and fetches nothing more for it, so a full partition costs no memory and no refetch (a
        paused one would have its fetched batch thrown away). ``consumer.pause`` is kept for the unbound hold."""
        consumer = self._consumer
        last_poll = time.monotonic()
        while True:
            held = self._apply_hold(sink)
            fetchable, limit, capped = ([], 0, True) if held else self._shares.fetchable(consumer.assignment(),
                                                                                          self._parts)
            if held or (capped and not fetchable):
                self._room.clear()
                await at_most(self._room.wait() if not held else sink.wait_for_bindings(), _IDLE_WAIT_S)
                if time.monotonic() - last_poll < _LIVENESS_POLL_S:
                    continue
                # aiokafka leaves the group after max_poll_interval_ms without a poll: show the member is alive.
                fetchable, limit = list(consumer.assignment())[:1], 1
                timeout_ms = 0
            else:
                # A partition at its cap is not in this poll; a short wait lets it back in soon after it drained.
                timeout_ms = _SHORT_FETCH_WAIT_MS if capped else _FETCH_WAIT_MS
            batch = await consumer.getmany(*fetchable, timeout_ms=timeout_ms, max_records=max(1, limit))
            last_poll = time.monotonic()
            if batch:
                self._buffer(batch)

    def _buffer(self, batch: dict[Any, list[Any]]) -> None:
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            part = self._parts.get((tp.topic, tp.partition))
            if part is None:
                if tp not in assigned:
                    continue  # revoked while the records were on their way
                part = self._track(tp)  # the records came before the assignment callback ran
            part.add_fetched(records)
        self._wake.set()

    # --- submitting -------------------------------------------------------------------------------------------

    async def _submit_loop(self, sink: Sink) -> None:
        while True:
            if not sink.has_bindings():
                await sink.wait_for_bindings()
                continue
            self._wake.clear()
            await self._submit_round(sink)
            # A round takes every partition up to its share (or the window up to full): nothing more can go before
            # an event is done or records are fetched, and either sets the wake (also while the round ran).
            await self._wake.wait()

    async def _submit_round(self, sink: Sink) -> None:
        parts = [p for p in self._parts.values() if p.buffer]
        self._window_blocked = False
        if not parts:
            return
        share = self._shares.share(self._assigned_count(), sum(1 for p in self._parts.values() if p.outstanding))
        # With ordering partition the runner's lane of a partition still holds the events submitted after the one
        # that finished, so topping it up can wait until half its share is free; otherwise (none, or key, whose
        # lanes are per key) every free slot is an event fewer in flight.
        self._low_water = share - (max(1, share // 2) if self._kc.ordering == "partition" else 1)
        start = self._round % len(parts)
        self._round += 1
        for part in parts[start:] + parts[:start]:
            while part.current and part.buffer and part.undone < share:
                if self._stopping or not sink.has_bindings():
                    return
                if sink.window_full():
                    self._window_blocked = True
                    return
                record = part.take()
                event, on_done = self._event_of(part, record)
                if not sink.offer(event, on_done):  # the fast path refused it: a binding is stale, or a submit waits
                    try:
                        await sink.submit(event, on_done)
                    except BaseException:
                        part.untake(record)
                        raise

    def _event_of(self, part: PartitionTrack, record: Any) -> tuple[Event, OnDone]:
        """The event of a record just taken from ``part``'s buffer, and its acknowledgement hook."""
        event = record_event(self.config.id, self._kc, record)
        if event.error is not None:
            log.warning("kafka source %s: %s; the event goes to the dead letter", self.config.id, event.error)
        offset = record.offset
        if record.key is not None:
            event.raw_key = bytes(record.key)  # templates see the decoded key; a dead letter keeps the bytes

        async def on_done(outcome: Outcome) -> None:
            self._on_done(part, offset)

        return event, on_done

    def _on_done(self, part: PartitionTrack, offset: int) -> None:
        if not part.current:
            return  # abandoned at a revoke: the partition's next owner starts from the committed offset
        part.done(offset)
        # The submit task tops a partition up once it fell to its low water (see _submit_round): with ordering
        # partition, one submit round per few events, not one per event. While the window held a round back,
        # every freed slot counts.
        if part.undone <= self._low_water or self._window_blocked:
            self._wake.set()
        if self._stopping:
            self._room.set()
            if not any(p.undone for p in self._parts.values()):
                self._idle.set()
        elif self._shares.pollable_again(part, self._parts, self._assigned_count()):
            self._room.set()

    # --- committing -------------------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        interval = self._kc.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            await self._commit(list(self._parts.values()), "periodic")

    async def _commit(self, parts: list[PartitionTrack], why: str, timeout_s: float | None = None) -> bool:
        if self._dry_run:
            return True  # a dry run never moves the group's offsets: the live bridges would lose what it showed
        due = [(part, pos) for part in parts if (pos := part.commit_due()) is not None]
        if not due or self._consumer is None:
            return True
        offsets = {TopicPartition(part.topic, part.partition): pos for part, pos in due}
        commit: Awaitable[None] = self._consumer.commit(offsets)
        try:
            await (asyncio.wait_for(commit, timeout_s) if timeout_s is not None else commit)
        except (KafkaError, TimeoutError) as exc:
            log.warning("kafka source %s: %s commit of %s failed: %r; done offsets are committed at the next "
                        "attempt (or redelivered by the partition's next owner)", self.config.id, why,
                        tp_text(part.key for part, _ in due), exc)
            return False
        for part, pos in due:
            part.committed = pos
            self._committed[part.key] = pos
        log.debug("kafka source %s: %s commit: %s", self.config.id, why,
                  ", ".join(f"{p.topic}/{p.partition}@{pos}" for p, pos in due))
        return True
