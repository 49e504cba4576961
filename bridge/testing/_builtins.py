"""The built-in ``engine::*`` functions of :class:`~bridge.testing.engine.TestEngine` (engine 0.23,
``engine/src/workers/engine_fn/mod.rs``): worker registration with its namespace and name lease, and the
listings a provider or a replica reads.

:class:`Builtins` is mixed into TestEngine next to the Router; it runs on the engine's loop under its lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bridge.testing._enginestate import DEFAULT_NS, Builtin, State, Worker

_CONFIG_SUMMARY_CHARS = 80


class BuiltinError(Exception):
    """A built-in function's failure with the engine's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _first_segment(text: str) -> str:
    return text.split("::", 1)[0]


def _clean_name(raw: Any) -> str | None:
    """The worker name as the engine keeps it: control characters dropped, trimmed, empty is none."""
    if not isinstance(raw, str):
        return None
    cleaned = "".join(c for c in raw if c.isprintable()).strip()
    return cleaned or None


def _filters(data: Any) -> dict[str, Any]:
    return data if isinstance(data, dict) else {}


def _matches(needle: Any, *haystacks: str) -> bool:
    if not isinstance(needle, str) or not needle:
        return True
    lowered = needle.lower()
    return any(lowered in h.lower() for h in haystacks)


class Builtins:
    """The built-in functions; TestEngine provides the attributes declared here."""

    _builtins: dict[str, Builtin]
    _send: Callable[[Worker, dict[str, Any]], None]
    _fix_namespace: Callable[[Worker, str], None]

    def _run_builtin(self, w: Worker, function_id: str, data: Any, reply_id: str | None) -> bool:
        """Run a built-in function for ``w`` and answer ``reply_id`` if given; False if there is none."""
        builtin = self._builtins.get(function_id)
        if builtin is None:
            return False
        frame: dict[str, Any] = {"type": "invocationresult", "invocation_id": reply_id, "function_id": function_id}
        try:
            frame["result"] = builtin(w, data)
        except BuiltinError as exc:
            frame["error"] = {"code": exc.code, "message": str(exc)}
        if reply_id is not None:
            self._send(w, frame)
        return True

    def _fn_register_worker(self, w: Worker, data: Any) -> dict[str, Any]:
        info = _filters(data)
        namespace = info.get("namespace")
        if isinstance(namespace, str) and not namespace.strip():
            raise BuiltinError(
                "INVALID_NAMESPACE", f"namespace is empty: worker {info.get('name')!r} declared it blank"
            )
        # A late call (after the grace timer fixed the namespace) keeps the fixed one.
        namespace = w.namespace if w.held is None else (namespace or DEFAULT_NS)
        name = _clean_name(info.get("name"))
        st = w.state
        if name is not None:
            owner = st.worker_names.get((namespace, name))
            if owner is not None and owner is not w and owner.connected:
                # Fatal for the SDK: it stops reconnecting. Its held registrations are never applied.
                if w.grace is not None:
                    w.grace.cancel()
                    w.grace = None
                self._send(w, {
                    "type": "registrationrejected", "code": "WORKER_NAMESPACE_CONFLICT", "namespace": namespace,
                    "worker_name": name, "owner_worker_id": owner.id,
                })
                w.close_after_flush = True
                return {"success": False}
            st.worker_names[(namespace, name)] = w
        w.name = name
        w.metadata = {k: v for k, v in info.items() if k != "_caller_worker_id"}
        self._fix_namespace(w, namespace)
        return {"success": True}

    def _fn_registered_triggers(self, w: Worker, data: Any) -> dict[str, Any]:
        """Every live binding of every namespace (the engine does not scope this list by the caller)."""
        filters = _filters(data)
        trigger_type, function_id = filters.get("trigger_type"), filters.get("function_id")
        worker = filters.get("worker")
        st = w.state
        rows = []
        for b in st.bindings.values():
            if not filters.get("include_internal") and b.function_id.startswith("engine::"):
                continue
            if trigger_type is not None and b.trigger_type != trigger_type:
                continue
            if function_id is not None and b.function_id != function_id:
                continue
            owner = _function_owner(st, b.namespace, b.function_id)
            if worker is not None and owner != worker:
                continue
            if not _matches(filters.get("search"), b.id, b.trigger_type, b.function_id):
                continue
            summary = json.dumps(b.config, separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)
            if len(summary) > _CONFIG_SUMMARY_CHARS:
                summary = summary[:_CONFIG_SUMMARY_CHARS] + "…"
            rows.append({
                "id": b.id, "trigger_type": b.trigger_type, "function_id": b.function_id, "worker_name": owner,
                "config": b.config, "config_summary": summary,
            })
        return {"registered_triggers": sorted(rows, key=lambda r: r["id"])}

    def _fn_triggers(self, w: Worker, data: Any) -> dict[str, Any]:
        filters = _filters(data)
        prefix, worker = filters.get("prefix"), filters.get("worker")
        rows = []
        for t in w.state.trigger_types.values():
            name = t.provider.name or _first_segment(t.id)
            if not filters.get("include_internal") and t.id.startswith("engine::"):
                continue
            if isinstance(prefix, str) and not t.id.startswith(prefix):
                continue
            if worker is not None and name != worker:
                continue
            if not _matches(filters.get("search"), t.id, t.description or ""):
                continue
            rows.append({"id": t.id, "namespace": t.namespace, "worker_name": name, "description": t.description})
        return {"triggers": sorted(rows, key=lambda r: r["id"])}

    def _fn_workers(self, w: Worker, _data: Any) -> dict[str, Any]:
        return {"workers": [
            {
                "id": o.id, "name": o.name, "namespace": o.namespace, "functions": sorted(o.functions),
                "trigger_types": sorted(type_id for _ns, type_id in o.provides),
            }
            for o in w.state.workers.values()
        ]}

    def _fn_functions(self, w: Worker, _data: Any) -> dict[str, Any]:
        return {"functions": [
            {"function_id": fid, "namespace": ns, "worker_id": o.id, "worker_name": o.name}
            for (ns, fid), o in sorted(w.state.functions.items())
        ]}


def _function_owner(st: State, namespace: str, function_id: str) -> str:
    """The name of the worker that registered the target function, else the first segment of its id."""
    owner = st.functions.get((namespace, function_id))
    if owner is not None and owner.name is not None:
        return owner.name
    return _first_segment(function_id)
