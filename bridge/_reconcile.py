"""Keeping each binding table in line with the engine (DESIGN.md "Replicas").

The engine holds one provider per (namespace, trigger type): the replica that registered the type last. It hears
every bind and unbind at once; every other replica of a kind that delivers on all replicas (Kafka, outbox)
**mirrors** the engine's list of the type's bindings instead, and never registers the type again just because its
table differs (two replicas doing so would pull the bindings back and forth). Each round, per trigger type this
bridge advertises:

- no live provider (the engine parked the type's bindings: the provider went away): register the type again; the
  engine replays every binding here. The table is kept meanwhile (events wait for the replay, not for nothing).
- this bridge is the provider: a binding the list leaves out has ended (a missed unbind); one the list shows and
  this bridge does not hold was lost on the way (the type is registered again, so the engine replays it).
- another replica is the provider: mirror its list (each config checked with the source's bind_schema; one that
  fails is skipped and logged).

Never dropped by a list: stale bindings (the link dropped; they wait for their replay or the grace period) and
bindings received after the list was asked for (the engine lists a binding only once it was sent to its provider,
so a list taken just before may not show it yet).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from bridge.bindings import Binding
from bridge.errors import BindConfigError

if TYPE_CHECKING:
    from bridge.engine import TriggerTypeSpec

log = logging.getLogger("bridge.engine")

LIST_BINDINGS = "engine::registered-triggers::list"
LIST_PROVIDERS = "engine::triggers::list"
LIST_FUNCTIONS = "engine::functions::list"
DEFAULT_NAMESPACE = "default"

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""Invokes an engine function (in the default namespace) and returns its result; raises DeliveryError."""


def _rows(result: Any, key: str) -> list[dict[str, Any]]:
    rows = result.get(key) if isinstance(result, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


class Reconciler:
    """One reconciliation round at a time, for the trigger types the engine link advertises."""

    def __init__(
        self,
        call: Call,
        *,
        namespace: str | None,
        worker_name: Callable[[], str | None],
        advertised: Callable[[str], bool],
        advertise: Callable[[TriggerTypeSpec], None],
    ) -> None:
        self._call = call
        self._namespace = namespace or DEFAULT_NAMESPACE
        self._worker_name = worker_name
        self._advertised = advertised
        self._advertise = advertise
        self._missed: dict[str, set[str]] = {}  # trigger type -> listed bindings its provider (this bridge) lacked
        self._skipped: dict[str, str] = {}  # binding id -> the config last logged as failing (log once per config)
        # trigger type -> binding id -> (the config as listed, as checked): a round re-checks only what changed
        self._checked: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {}

    async def run(self, specs: Iterable[TriggerTypeSpec]) -> None:
        """One round over ``specs``; raises DeliveryError when the engine does not answer."""
        mine = [s for s in specs if self._advertised(s.id)]
        if not mine:
            return
        asked = {s.id: s.table.mark() for s in mine}
        providers = await self.providers()
        for spec in mine:
            if not self._advertised(spec.id):
                continue  # an exclusive replica that stepped down meanwhile
            provider = providers.get(spec.id)
            if provider is None:
                log.info("trigger type %s has no live provider (its bindings are parked); registering it again to "
                         "receive them", spec.id)
                self._advertise(spec)
                continue
            rows = await self.binding_rows(spec.id)
            if not self._advertised(spec.id):
                continue
            if provider == self._worker_name():
                listed = {str(r["id"]) for r in rows}
                self._drop_absent(spec, listed, asked[spec.id], "the engine no longer lists it")
                missed = {bid for bid in listed if spec.table.get(bid) is None}
                # Missing in two rounds in a row: not merely on their way when the list was taken.
                missed, self._missed[spec.id] = missed & self._missed.get(spec.id, set()), missed
                if missed:
                    # The engine routed these here but they never arrived: registering again has the engine replay
                    # the type's bindings to this bridge, its provider already.
                    log.info("trigger type %s: the engine lists %d binding(s) this bridge does not hold (%s); "
                             "registering the type again to receive them", spec.id, len(missed),
                             ", ".join(sorted(missed)[:5]))
                    self._advertise(spec)
                    # The replay takes its time on a busy engine: two more rounds must miss them before the next
                    # registration (each one replays every binding of the type).
                    self._missed[spec.id] = set()
            else:
                await self._mirror(spec, rows, asked[spec.id], provider)

    def forget(self, trigger_type: str) -> None:
        """Drop what is remembered of ``trigger_type``'s bindings (its bind schema or table changed: check anew).
        Skipped configs are kept by binding id alone, so all are forgotten (at worst a warning is logged again)."""
        self._missed.pop(trigger_type, None)
        self._checked.pop(trigger_type, None)
        self._skipped.clear()

    async def providers(self) -> dict[str, str | None]:
        """Trigger type id -> the worker name of its live provider, for this bridge's namespace."""
        result = await self._call(LIST_PROVIDERS, {"include_internal": False})
        found: dict[str, str | None] = {}
        for row in _rows(result, "triggers"):
            if (row.get("namespace") or DEFAULT_NAMESPACE) != self._namespace or not isinstance(row.get("id"), str):
                continue
            name = row.get("worker_name")
            found.setdefault(row["id"], name if isinstance(name, str) else None)
        return found

    async def binding_rows(self, trigger_type: str) -> list[dict[str, Any]]:
        """The engine's live bindings of ``trigger_type`` (parked ones are not listed)."""
        result = await self._call(LIST_BINDINGS, {"trigger_type": trigger_type, "include_internal": True})
        return [
            r for r in _rows(result, "registered_triggers")
            if r.get("trigger_type") == trigger_type and isinstance(r.get("id"), str)
            and isinstance(r.get("function_id"), str)
        ]

    def _drop_absent(self, spec: TriggerTypeSpec, live: set[str], asked: int, why: str) -> None:
        for binding in spec.table.reconcile(live, asked):
            log.info("binding %s of %s → %s dropped: %s", binding.id, spec.id, binding.function_id, why)

    async def _mirror(
        self, spec: TriggerTypeSpec, rows: list[dict[str, Any]], asked: int, provider: str | None
    ) -> None:
        table = spec.table
        unknown = [r for r in rows if table.get(r["id"]) is None and not self._still_skipped(r)]
        namespaces = await self._namespaces(unknown) if unknown else {}
        live: set[str] = set()
        for row in rows:
            binding = self._binding(spec, row, namespaces)
            if binding is None:
                continue
            live.add(binding.id)
            change = table.upsert(binding)
            if change != "unchanged":
                log.info("binding %s %s from the engine's list: %s → %s (provided by replica %s)", binding.id, change,
                         spec.id, binding.function_id, provider)
        cache = self._checked.get(spec.id, {})
        for gone in set(cache) - {r["id"] for r in rows}:
            del cache[gone]
        absent = [b for b in table.snapshot() if b.id not in live and not table.is_stale(b.id)]
        if not absent:
            return
        # The list is empty of them either because they ended or because the provider went away between the two
        # calls (its bindings parked, so unlisted): only the first is a reason to drop them.
        if (await self.providers()).get(spec.id) != provider or not self._advertised(spec.id):
            return
        self._drop_absent(spec, live, asked, f"the engine no longer lists it (provided by replica {provider})")

    def _still_skipped(self, row: dict[str, Any]) -> bool:
        return self._skipped.get(row["id"]) == json.dumps(row.get("config"), sort_keys=True, default=str)

    def _binding(self, spec: TriggerTypeSpec, row: dict[str, Any], namespaces: dict[str, str | None]) -> Binding | None:
        binding_id = row["id"]
        config = row.get("config")
        cache = self._checked.setdefault(spec.id, {})
        known = cache.get(binding_id)
        try:
            if known is not None and known[0] == config:
                checked = known[1]
            else:
                checked = spec.bind.check(config if config is not None else {})
                cache[binding_id] = (config, checked)
        except BindConfigError as exc:
            shown = json.dumps(config, sort_keys=True, default=str)
            if self._skipped.get(binding_id) != shown:
                self._skipped[binding_id] = shown
                log.warning("binding %s of %s → %s in the engine's list is skipped here: its config does not fit "
                            "this bridge's bind_schema: %s", binding_id, spec.id, row["function_id"], exc)
            return None
        self._skipped.pop(binding_id, None)
        existing = spec.table.get(binding_id)
        # The list carries neither the target's namespace nor the metadata: keep what the binding arrived with.
        if existing is not None and existing.function_id == row["function_id"]:
            namespace, metadata = existing.namespace, existing.metadata
        else:
            namespace, metadata = namespaces.get(binding_id), None
        return Binding(binding_id, spec.id, row["function_id"], namespace, checked, metadata)

    async def _namespaces(self, rows: list[dict[str, Any]]) -> dict[str, str | None]:
        """Binding id -> its target function's namespace, from the engine's function list (a list row names the
        target's owner, not its namespace); None (the default namespace) when it cannot tell."""
        result = await self._call(LIST_FUNCTIONS, {"include_internal": True})
        owners: dict[tuple[str, str | None], set[str]] = {}
        for fn in _rows(result, "functions"):
            if isinstance(fn.get("function_id"), str):
                key = (fn["function_id"], fn.get("worker_name"))
                owners.setdefault(key, set()).add(str(fn.get("namespace") or DEFAULT_NAMESPACE))
        found: dict[str, str | None] = {}
        for row in rows:
            candidates = owners.get((row["function_id"], row.get("worker_name")), set())
            if len(candidates) == 1:
                (namespace,) = candidates
            elif DEFAULT_NAMESPACE in candidates or not candidates:
                namespace = DEFAULT_NAMESPACE
            else:
                namespace = sorted(candidates)[0]
                log.warning("binding %s → %s: its function is registered in several namespaces (%s); delivering to "
                            "%s", row["id"], row["function_id"], ", ".join(sorted(candidates)), namespace)
            found[row["id"]] = None if namespace == DEFAULT_NAMESPACE else namespace
        return found
