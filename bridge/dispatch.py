"""Delivery of one event to every binding of its source: when, render, condition, invoke, retry, dead letter.

Each binding runs on its own: a binding that fails and retries never re-invokes a binding that already
succeeded, and one bad binding never stops the others. An event is done when every binding it started with has
succeeded, been filtered out, or been dead-lettered.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge._clock import iso_from_epoch
from bridge._prepare import prepare_payload
from bridge.bindings import Binding, BindingTable
from bridge.config import DeliveryConfig, RetryConfig, SourceConfig
from bridge.config.schemas import PayloadValidator
from bridge.deadletter import DeadLetterSink
from bridge.errors import DeadLetterError, DeliveryError, EngineUnavailable, EventError
from bridge.sources import Event, Outcome
from bridge.templates import CompiledTree, CompiledWhen, compile_tree, compile_when, make_context

log = logging.getLogger("bridge.dispatch")


@dataclass(frozen=True, slots=True)
class Invocation:
    """One function call the dispatcher asks its invoker for (the engine link, or the dry-run printer)."""

    function_id: str
    payload: Any
    namespace: str | None  # the target's namespace; None means the engine's default
    timeout_ms: int
    mode: str = "sync"  # "sync", "void" or "enqueue" (delivery.mode)
    queue: str | None = None  # with mode "enqueue"
    metadata: dict[str, Any] | None = None  # the binding's metadata, passed along with the call
    binding_id: str | None = None  # the delivery's binding (an observer in observe mode); None for a condition


class Invoker(Protocol):
    """How the dispatcher calls functions (the engine link, or a dry-run printer)."""

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    async def invoke(self, call: Invocation) -> Any:
        """The function's result; raises DeliveryError (EngineUnavailable when the link is down)."""
        ...


CONDITION_FAILED = "invocation_failed"
"""The error code of a condition function that raised: the only failure that skips the binding."""

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds of the delivery-latency histogram, in seconds (a last, unbounded bucket follows)."""


@dataclass
class Stats:
    """Counters of one source, read by logs, the status line and metrics (at scrape time: the hot path only
    adds to plain ints)."""

    received: int = 0
    delivered: int = 0
    filtered: int = 0
    dead_lettered: int = 0
    deliveries_ok: int = 0
    deliveries_failed: int = 0
    retries: int = 0
    dead_letter_failures: int = 0  # refused dead-letter writes (each is retried: the event is held meanwhile)
    # successful invocations by duration: latency_counts[i] counts those <= LATENCY_BUCKETS_S[i] and above the
    # bound before it; the last entry counts those above every bound
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.latency_sum_s += seconds


def backoff_s(retry: RetryConfig, attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Delay before attempt ``attempt + 1`` (attempt counts from 1): exponential, capped, with ± jitter."""
    try:
        base = retry.initial_backoff_ms * retry.multiplier ** (attempt - 1)
    except OverflowError:  # a long run of attempts: far past any cap
        base = math.inf
    capped = min(base, retry.max_backoff_ms)
    jittered = capped * (1 + retry.jitter * (2 * rand() - 1))
    return max(0.0, jittered) / 1000


@dataclass
class _Attempts:
    count: int = 0
    first_at: float | None = None
    last_at: float | None = None

    def start(self) -> None:
        now = time.time()
        self.count += 1
        self.first_at = self.first_at or now
        self.last_at = now


class Dispatcher:
    """Delivers events of one source; shared by every source kind."""

    def __init__(
        self,
        source: SourceConfig,
        table: BindingTable,
        invoker: Invoker,
        dead_letters: DeadLetterSink,
        *,
        stats: Stats | None = None,
        on_delivery: Callable[[str, float], None] | None = None,
    ) -> None:
        self.source = source
        self.table = table
        self.invoker = invoker
        self.dead_letters = dead_letters
        self.stats = stats or Stats()
        self._on_delivery = on_delivery
        self._delivery: DeliveryConfig = source.delivery
        self._when: CompiledWhen | None = compile_when(source.when) if source.when else None
        self._payload: CompiledTree | None = (
            compile_tree(source.payload, root=("payload",)) if source.payload is not None else None
        )
        self._payload_check = PayloadValidator(source.payload_schema) if source.payload_schema else None
        self._source_view = {"id": source.id, "kind": source.kind}

    async def deliver(self, event: Event) -> Outcome:
        """Deliver one event to every current binding; return how it ended. Raises only on cancellation."""
        self.stats.received += 1
        if event.error is not None:
            await self._dead_letter(event, None, None, event.error.code, str(event.error), 0, _Attempts())
            outcome: Outcome = "dead_lettered"
        else:
            bindings = self.table.snapshot()
            while not bindings:  # every binding went away while the event waited: wait, do not acknowledge
                await self.table.wait_non_empty()
                bindings = self.table.snapshot()
            view = event.template_view()
            if len(bindings) == 1:
                results: list[Outcome] = [await self._deliver_guarded(event, view, bindings[0])]
            else:
                results = list(await asyncio.gather(*(self._deliver_guarded(event, view, b) for b in bindings)))
            if "dead_lettered" in results:
                outcome = "dead_lettered"
            elif results and all(r == "filtered" for r in results):
                outcome = "filtered"
            else:
                outcome = "delivered"
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        return outcome

    # one binding ---------------------------------------------------------------------------------------------

    async def _deliver_guarded(self, event: Event, view: dict[str, Any], binding: Binding) -> Outcome:
        """One binding's share, ended whatever happens: an error nothing else handled (a bug, or a check that
        failed on hostile data) dead-letters this binding's share as ``internal_error``. Kept per binding so that
        one binding's failure never ends the event while its siblings are still being delivered."""
        try:
            return await self._deliver_one(event, view, binding)
        except Exception as exc:
            log.exception("event %s → %s: unexpected error; dead-lettering it for this binding", event.id,
                          binding.function_id, extra=self._log_context(event, binding))
            message = f"{type(exc).__name__}: {exc}"
            await self._dead_letter(event, binding, None, "internal_error", message, 0, _Attempts())
            return "dead_lettered"

    async def _deliver_one(self, event: Event, view: dict[str, Any], binding: Binding) -> Outcome:
        ctx = make_context(view, binding.config, binding.template_view(), self._source_view)
        attempts = _Attempts()
        try:
            passed, payload = prepare_payload(ctx, view, self._when, self._payload, self._payload_check)
            if not passed:
                return "filtered"
        except EventError as exc:
            log.warning("event %s → %s: %s (dead-lettered)", event.id, binding.function_id, exc,
                        extra=self._log_context(event, binding))
            await self._dead_letter(event, binding, None, exc.code, str(exc), 0, attempts)
            return "dead_lettered"
        return await self._invoke_with_retries(event, binding, payload, attempts)

    async def _invoke_with_retries(
        self, event: Event, binding: Binding, payload: Any, attempts: _Attempts
    ) -> Outcome:
        """Condition (when bound with one), then the function, retried on failure. Each attempt first waits for
        the engine link and, while the binding is stale (the link dropped), for the engine to replay it: an outage
        never ends a binding's share of an event. Only the binding's end (an unbind, or the grace period running
        out) does."""
        delivery = self._delivery
        retry = delivery.retry
        condition = binding.condition_function_id
        invoker, table = self.invoker, self.table
        while True:
            if not invoker.connected:
                await invoker.wait_connected()
            if table.live(binding.id) is None and await table.wait_settled(binding.id) is None:
                log.info("event %s: binding %s → %s has ended (unbound, or not replayed in time); not delivering "
                         "to it", event.id, binding.id, binding.function_id, extra=self._log_context(event, binding))
                return "filtered"
            if not invoker.connected:
                continue  # the link dropped again while the binding waited
            attempts.start()
            calling = condition or binding.function_id
            started = time.perf_counter()
            try:
                if condition is not None:
                    if not await self._condition(event, binding, payload, condition):
                        return "filtered"
                    condition = None  # passed: a retry only repeats the delivery
                    calling = binding.function_id
                    started = time.perf_counter()
                await invoker.invoke(Invocation(
                    binding.function_id, payload, binding.namespace, delivery.timeout_ms, delivery.mode,
                    delivery.queue, binding.metadata, binding.id,
                ))
            except DeliveryError as exc:
                if calling == binding.function_id:
                    self.stats.deliveries_failed += 1
                if isinstance(exc, EngineUnavailable):
                    # The bridge's own link dropped under the call: that says nothing about the function, so it
                    # costs no attempt (an outage never dead-letters an event); the next one waits for the link.
                    attempts.count -= 1
                elif attempts.count >= retry.max_attempts:
                    log.warning(
                        "event %s → %s failed after %d attempt(s): %s (dead-lettered)",
                        event.id,
                        calling,
                        attempts.count,
                        exc,
                        extra=self._log_context(event, binding),
                    )
                    await self._dead_letter(event, binding, payload, exc.code, exc.message, attempts.count, attempts)
                    return "dead_lettered"
                delay = backoff_s(retry, max(attempts.count, 1))
                log.info(
                    "event %s → %s %s: %s; retrying in %.0f ms",
                    event.id,
                    calling,
                    "cut off by the engine link (no attempt counted)" if isinstance(exc, EngineUnavailable)
                    else f"attempt {attempts.count} failed",
                    exc,
                    delay * 1000,
                    extra=self._log_context(event, binding),
                )
                self.stats.retries += 1
                await asyncio.sleep(delay)
                continue
            elapsed = time.perf_counter() - started
            self.stats.deliveries_ok += 1
            self.stats.observe_latency(elapsed)
            if self._on_delivery is not None:
                self._on_delivery(binding.function_id, elapsed)
            return "delivered"

    async def _condition(self, event: Event, binding: Binding, payload: Any, condition: str) -> bool:
        """iii rules: ``false`` skips; the condition function's own error (``invocation_failed``) skips and is
        logged; anything else it returns delivers. Any other failure (engine unreachable, ``TIMEOUT``,
        ``invocation_stopped``, a function not registered again yet after an outage) says nothing about the
        condition: it is raised, and retried like a delivery."""
        try:
            result = await self.invoker.invoke(
                Invocation(condition, payload, binding.namespace, self._delivery.timeout_ms)
            )
        except DeliveryError as exc:
            if exc.code != CONDITION_FAILED:
                raise
            log.warning(
                "event %s: condition %s for %s failed (%s); skipping this binding",
                event.id,
                condition,
                binding.function_id,
                exc,
                extra=self._log_context(event, binding),
            )
            return False
        return result is not False

    def _log_context(self, event: Event, binding: Binding | None) -> dict[str, Any]:
        """What a JSON log line carries besides the message (the text format ignores it)."""
        context = {"trigger_type": self.source.id, "event_id": event.id}
        if binding is not None:
            context["binding_id"] = binding.id
            context["function_id"] = binding.function_id
        return context

    # dead letters --------------------------------------------------------------------------------------------

    async def _dead_letter(
        self,
        event: Event,
        binding: Binding | None,
        payload: Any,
        code: str,
        message: str,
        attempt_count: int,
        attempts: _Attempts,
    ) -> None:
        record = {
            "source": self.source.id,
            "event": event.template_view(),
            "binding": binding.record_view() if binding is not None else None,
            "payload": payload,
            "error": {"code": code, "message": message},
            "attempts": attempt_count,
            "first_attempt_at": iso_from_epoch(attempts.first_at) if attempts.first_at else None,
            "last_attempt_at": iso_from_epoch(attempts.last_at) if attempts.last_at else None,
        }
        delay = 0.5
        while True:
            try:
                await self.dead_letters.write(record, key=event.raw_key)
                return
            except Exception as exc:
                # Never acknowledge an event whose dead letter is not durable: hold it (and, through the
                # in-flight window, the source) until the destination works again. Destinations raise only
                # DeadLetterError; anything else is a bug of one, held and retried all the same rather than lost.
                self.stats.dead_letter_failures += 1
                log.error(
                    "event %s: %s; the event stays unacknowledged, retrying in %.1f s", event.id,
                    exc if isinstance(exc, DeadLetterError) else f"dead-letter write failed: {exc!r}", delay,
                    exc_info=not isinstance(exc, DeadLetterError), extra=self._log_context(event, binding),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def dead_letter_internal_error(self, event: Event, exc: BaseException) -> Outcome:
        """Dead-letter an event whose delivery failed with an error nothing else handled (a bug), so that it
        still ends: code ``internal_error``, no binding. Returns once the record is durable."""
        message = f"{type(exc).__name__}: {exc}"
        await self._dead_letter(event, None, None, "internal_error", message, 0, _Attempts())
        self.stats.dead_lettered += 1
        return "dead_lettered"
