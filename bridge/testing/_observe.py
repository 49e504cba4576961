"""The observe side of :class:`~bridge.testing.engine.TestEngine` (engines that announce ``observe.v1``), as the
iii-sdk 0.25 wheel defines the wire (``iii/iii_types.py``, ``observe_wire.py``, ``observable.py``,
``observer_handle.py``) and the iii 0.25 docs describe the engine:

- ``registerfunction`` may carry ``observe {delivery, args_format, legacy_trigger_type, allow}``; every accepted
  ``registerfunction`` is answered by ``functionregistered {id, namespace, revision, observers}`` with the
  function's current observers (also the pending and refused ones: each is offered again).
- ``observe {id, source, target, ...}`` creates (or, same id from the same worker, replays) an observer. Its
  ``args`` are checked against the source's ``args_format`` (``INVALID_ARGS``); ``allow: false`` refuses it
  (``NOT_OBSERVABLE``). The observer is offered to the source's owner (``observeradded``) and turns active on
  the owner's ``observerack`` (the observing worker hears ``observeresult`` / ``observerstatechanged``).
- The legacy shim: a ``registertrigger`` whose type an observable function names as ``legacy_trigger_type``
  (resolved like a trigger type: ``trigger_namespace`` strictly, else the binder's namespace, then
  ``default``) becomes an observer with the trigger's id, its ``config`` as ``args`` and ``legacy {trigger_type,
  config}``; its target receives the event itself (``deliver: input``). A refusal (``INVALID_ARGS`` or the
  owner's) reaches the binder as a ``triggerregistrationresult`` error, as a provider's refusal does. A trigger
  of a type nothing provides yet stays parked and is adopted when such a function registers.
- Owner delivery: ``invokefunction`` with ``activation {observer_id}`` from the owner goes to that observer's
  stored target (with ``activation {observer_id, activation_id}`` and the observer's metadata); an observer
  that is not active gets ``OBSERVER_NOT_ACTIVE``. ``invocationsobserved`` items go, fire-and-forget, to the
  target of each matched active observer: the envelope (``Observed``), or its ``input`` / ``output`` as the
  observer's ``deliver`` says.
- Two owners of one function id: the engine keeps the first (``registrationrejected``
  ``FUNCTION_NAMESPACE_CONFLICT`` for the second, its connection kept); when the owner leaves, the observers
  wait (pending) until some worker registers the function again.
- A worker that leaves takes its observers with it (the owner hears ``observerremoved``; the SDK replays them
  on its next connection). ``unregistertriggertype`` takes effect on a 0.25 engine: the type's bindings park.

:class:`Observing` is mixed into TestEngine next to the Router; it runs on the engine's loop under its lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import jsonschema

from bridge.testing._enginestate import DEFAULT_NS, Binding, Observable, Observer, State, Worker

_ENVELOPE_FIELDS = ("input", "output", "error", "caller", "metadata", "started_at_ms", "duration_ms")


def args_problems(schema: Any, args: Any) -> str | None:
    """Why ``args`` do not fit ``schema`` (the engine's ``INVALID_ARGS`` message), or None."""
    if not isinstance(schema, dict):
        return None
    try:
        validator = jsonschema.Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(args), key=lambda e: list(e.absolute_path))
    except jsonschema.SchemaError:
        return None
    if not errors:
        return None
    return "; ".join(f"args{''.join(f'.{p}' for p in e.absolute_path)}: {e.message}" for e in errors)


class Observing:
    """The observe handlers; TestEngine provides the attributes declared here."""

    _send: Callable[[Worker, dict[str, Any]], None]

    # ------------------------------------------------------------------ functions

    def _observe_function_registered(self, w: Worker, d: dict[str, Any]) -> None:
        """After ``registerfunction`` was accepted: keep its descriptor, adopt parked legacy triggers, and answer
        ``functionregistered`` with every observer of the function (each offered again)."""
        st = w.state
        key = (w.namespace, d["id"])
        descriptor = d.get("observe") if isinstance(d.get("observe"), dict) else None
        st.observables.pop(key, None)
        if descriptor is not None:
            legacy = descriptor.get("legacy_trigger_type")
            observable = Observable(
                w.namespace, d["id"], w, descriptor.get("delivery") or "auto", descriptor.get("args_format"),
                legacy if isinstance(legacy, str) and legacy else None, descriptor.get("allow") is not False,
            )
            st.observables[key] = observable
            if observable.legacy_trigger_type is not None:
                self._adopt_parked(st, observable)
        st.revision += 1
        observers = []
        for o in [o for o in st.observers.values() if o.source_key == key]:
            refusal = self._refusal(st, o)  # the args are checked again against this registration's args_format
            if refusal is not None:
                self._set_state(o, "error", refusal)
                continue
            o.revision = st.revision
            observers.append(o)
        self._send(w, {
            "type": "functionregistered", "id": d["id"], "namespace": w.namespace, "revision": st.revision,
            "local_dispatch": False, "observers": [o.info() for o in observers],
        })

    def _observe_worker_dropped(self, w: Worker) -> None:
        """A connection closed (after its functions were released): its observers end, the observers of the
        functions it owned wait for a new owner."""
        st = w.state
        for key in [k for k, o in st.observables.items() if o.owner is w]:
            del st.observables[key]
            for o in st.observers.values():
                if o.source_key == key and o.worker is not w:
                    self._set_state(o, "pending", None)
        for o in [o for o in st.observers.values() if o.worker is w]:
            self._remove_observer(st, o)

    # ------------------------------------------------------------------ observers

    def _on_observe(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        source, target = d["source"], d["target"]
        observer_id = d["id"]
        existing = st.observers.get(observer_id)
        if existing is not None and existing.worker is w:
            self._send(w, self._observe_result(existing))  # a replay: idempotent
            return
        if existing is not None:
            self._send(w, {"type": "observeresult", "id": observer_id, "state": "error", "error": {
                "code": "OBSERVER_ID_CONFLICT", "message": f"observer id {observer_id} is taken by another worker",
            }})
            return
        if not isinstance(source.get("function_id"), str) or not isinstance(target.get("function_id"), str):
            return
        args = source.get("args") if isinstance(source.get("args"), dict) else {}
        o = Observer(
            observer_id, w, source.get("namespace") or w.namespace, source["function_id"], args,
            source.get("filters") or {}, target["function_id"], target.get("namespace") or w.namespace,
            source.get("capture"), source.get("on"), source.get("deliver"), d.get("metadata"),
        )
        st.observers[observer_id] = o
        refusal = self._refusal(st, o)
        if refusal is not None:
            o.state, o.error = "error", refusal
        self._send(w, self._observe_result(o))
        if refusal is None:
            self._offer(st, o)

    def _on_unobserve(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        o = st.observers.get(d["id"])
        if o is not None and o.worker is w:
            self._remove_observer(st, o)
            self._send(w, {"type": "observerstatechanged", "id": o.id, "state": "disposed", "reason": {
                "code": "UNOBSERVED", "message": "disposed by the observing worker",
            }})

    def _on_observer_ack(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        o = st.observers.get(d["id"])
        if o is None or st.functions.get(o.source_key) is not w:
            return  # only the source's owner may answer for an observer
        revision = d.get("revision")
        if isinstance(revision, int) and revision < o.revision:
            return  # an answer to an older offer
        error = d.get("error")
        if error is not None:
            self._set_state(o, "error", error)
        else:
            self._set_state(o, "active", None)

    def _refusal(self, st: State, o: Observer) -> dict[str, str] | None:
        observable = st.observables.get(o.source_key)
        if observable is None:
            return None  # checked when an owner registers it
        if not observable.allow:
            return {"code": "NOT_OBSERVABLE", "message": f"{o.function_id} does not accept observers"}
        problems = args_problems(observable.args_format, o.args)
        if problems is not None:
            return {"code": "INVALID_ARGS", "message": f"args rejected by {o.function_id}: {problems}"}
        return None

    def _offer(self, st: State, o: Observer) -> None:
        """Offer an observer to its source's owner, if the source is registered (else it waits)."""
        owner = st.functions.get(o.source_key)
        if owner is None or not owner.connected:
            return
        st.revision += 1
        o.revision = st.revision
        self._send(owner, {
            "type": "observeradded", "function_id": o.function_id, "namespace": o.namespace,
            "revision": st.revision, "observer": o.info(),
        })

    def _remove_observer(self, st: State, o: Observer) -> None:
        st.observers.pop(o.id, None)
        owner = st.functions.get(o.source_key)
        if owner is not None and owner.connected:
            st.revision += 1
            self._send(owner, {
                "type": "observerremoved", "function_id": o.function_id, "namespace": o.namespace,
                "revision": st.revision, "id": o.id,
            })

    def _set_state(self, o: Observer, state: str, error: dict[str, Any] | None) -> None:
        changed = (state, error) != (o.state, o.error)
        o.state, o.error = state, error
        if not changed or not o.worker.connected:
            return
        if o.legacy is None:
            frame: dict[str, Any] = {"type": "observerstatechanged", "id": o.id, "state": state}
            if error is not None:
                frame["reason"] = error
            self._send(o.worker, frame)
        elif error is not None:
            self._send(o.worker, self._trigger_error(o.id, o.legacy["trigger_type"], o.target, error))

    @staticmethod
    def _observe_result(o: Observer) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "observeresult", "id": o.id, "state": o.state}
        if o.error is not None:
            frame["error"] = o.error
        return frame

    @staticmethod
    def _trigger_error(trigger_id: str, trigger_type: str, function_id: str, error: Any) -> dict[str, Any]:
        return {
            "type": "triggerregistrationresult", "id": trigger_id, "trigger_type": trigger_type,
            "function_id": function_id, "error": error,
        }

    # ------------------------------------------------------------------ the legacy shim

    def _legacy_source(self, st: State, binding: Binding) -> Observable | None:
        """The observable function that takes over ``binding``'s trigger type, resolved like a provider."""
        if binding.trigger_namespace is not None:
            namespaces: tuple[str, ...] = (binding.trigger_namespace,)
        else:
            namespaces = (binding.home_namespace, DEFAULT_NS)
        for namespace in namespaces:
            for observable in st.observables.values():
                if observable.namespace == namespace and observable.legacy_trigger_type == binding.trigger_type:
                    return observable
        return None

    def _shim_trigger(self, st: State, binding: Binding) -> bool:
        """A ``registertrigger`` for a type an observable function took over: an observer now. False if none
        did (the trigger-type rules apply)."""
        observable = self._legacy_source(st, binding)
        if observable is None:
            return False
        previous = st.observers.get(binding.id)
        if previous is not None:
            self._remove_observer(st, previous)  # an upsert of the trigger: the observer starts over
        config = binding.config
        o = Observer(
            binding.id, binding.owner, observable.namespace, observable.function_id,
            config if isinstance(config, dict) else {}, {}, binding.function_id, binding.namespace,
            None, None, "input", binding.metadata, legacy={"trigger_type": binding.trigger_type, "config": config},
        )
        st.pending.pop(binding.id, None)
        st.observers[o.id] = o  # kept also when refused: the function's next registration offers it again
        refusal = self._refusal(st, o)
        if refusal is not None:
            self._set_state(o, "error", refusal)
        else:
            self._offer(st, o)
        return True

    def _adopt_parked(self, st: State, observable: Observable) -> None:
        for binding in [b for b in st.pending.values() if b.trigger_type == observable.legacy_trigger_type]:
            if binding.owner.connected and self._legacy_source(st, binding) is observable:
                del st.pending[binding.id]
                self._shim_trigger(st, binding)

    def _shim_unbind(self, st: State, trigger_id: str) -> bool:
        o = st.observers.get(trigger_id)
        if o is None or o.legacy is None:
            return False
        self._remove_observer(st, o)
        return True

    # ------------------------------------------------------------------ deliveries

    def _owner_call(self, w: Worker, d: dict[str, Any]) -> dict[str, Any] | None:
        """``invokefunction`` with ``activation`` from an owner (``obs.call``): the call as the engine routes it
        to the observer's target, or None when it was answered here (the observer is not active)."""
        st = w.state
        activation = d["activation"]
        observer_id = activation.get("observer_id") if isinstance(activation, dict) else None
        o = st.observers.get(observer_id) if isinstance(observer_id, str) else None
        if o is None or o.state != "active" or st.functions.get(o.source_key) is not w:
            invocation_id = d.get("invocation_id")
            if invocation_id is not None:
                self._send(w, {
                    "type": "invocationresult", "invocation_id": invocation_id, "function_id": d["function_id"],
                    "error": {"code": "OBSERVER_NOT_ACTIVE", "message": "the observer is not active"},
                })
            return None
        routed = {k: v for k, v in d.items() if k != "activation"}
        routed.update(function_id=o.target, namespace=o.target_namespace)
        routed["activation"] = {"observer_id": o.id, "activation_id": str(uuid.uuid4())}
        if o.metadata is not None:
            routed["metadata"] = o.metadata
        return routed

    def _on_invocations_observed(self, w: Worker, d: dict[str, Any]) -> None:
        st = w.state
        items = d["items"] if isinstance(d["items"], list) else []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("function_id"), str):
                continue
            key = (item.get("namespace") or w.namespace, item["function_id"])
            if st.functions.get(key) is not w:
                continue
            for observer_id in item.get("matched") or []:
                o = st.observers.get(observer_id)
                if o is None or o.state != "active" or o.source_key != key:
                    continue
                self._activate_observer(w, o, item)

    def _activate_observer(self, owner: Worker, o: Observer, item: dict[str, Any]) -> None:
        target = owner.state.functions.get((o.target_namespace, o.target))
        if target is None:
            return  # fire-and-forget: nobody to tell
        activation_id = str(uuid.uuid4())
        if o.deliver in ("input", "output"):
            data = item.get(o.deliver)
        else:
            data = {
                "observer_id": o.id, "activation_id": activation_id, "function_id": o.function_id,
                "namespace": o.namespace, "invocation_id": item.get("invocation_id"),
                "status": item.get("status", "success"),
            }
            data.update({k: item[k] for k in _ENVELOPE_FIELDS if k in item})
        if isinstance(data, dict):
            data = {**data, "_caller_worker_id": owner.id}
        frame: dict[str, Any] = {
            "type": "invokefunction", "invocation_id": str(uuid.uuid4()), "function_id": o.target, "data": data,
            "activation": {"observer_id": o.id, "activation_id": activation_id},
        }
        if o.metadata is not None:
            frame["metadata"] = o.metadata
        self._send(target, frame)

    # ------------------------------------------------------------------ trigger types (0.25)

    def _on_unregister_trigger_type(self, w: Worker, d: dict[str, Any]) -> None:
        """Takes effect on a 0.25 engine: the type is gone, its bindings park until it is registered again."""
        st = w.state
        key = (d.get("namespace") or w.namespace, d["id"])
        tt = st.trigger_types.get(key)
        if tt is None or tt.provider is not w:
            return
        del st.trigger_types[key]
        w.provides.discard(key)
        for binding in [b for b in st.bindings.values() if b.provider_key == key]:
            del st.bindings[binding.id]
            st.pending[binding.id] = binding
