"""Which inbound frames the engine 0.23 can decode at all (its serde ``Message`` enum, ``engine/src/protocol.rs``).

The real engine logs a frame it cannot decode and drops it, connection kept: an unknown ``type``, a missing
required field (``data`` of ``invokefunction``, ``config`` of ``registertrigger``, ``description`` of
``registertriggertype``...), a field of the wrong JSON type, an ``invocation_id`` that is not a UUID, an
unknown ``action``. The test engine drops the same frames, so a client that sends them learns it here first.
"""

from __future__ import annotations

import uuid
from typing import Any

# Field kinds: "str" required string; "str?" string, null or absent; "any" required (null allowed);
# "any?" anything or absent; "uuid" required UUID string; "uuid?" UUID, null or absent; "action?" and
# "error?" the two nested enums/structs; "obj?" an object, null or absent.
_FIELDS: dict[str, dict[str, str]] = {
    "registertriggertype": {
        "id": "str", "description": "str", "trigger_request_format": "any?", "call_request_format": "any?",
        "namespace": "str?",
    },
    "registertrigger": {
        "id": "str", "trigger_type": "str", "function_id": "str", "config": "any", "metadata": "any?",
        "namespace": "str?", "trigger_namespace": "str?",
    },
    "triggerregistrationresult": {"id": "str", "trigger_type": "str", "function_id": "str", "error": "error?"},
    "unregistertrigger": {"id": "str", "trigger_type": "str?"},
    "registerfunction": {
        "id": "str", "description": "str?", "request_format": "any?", "response_format": "any?",
        "metadata": "any?", "invocation": "obj?", "observe": "obj?",
    },
    "unregisterfunction": {"id": "str"},
    "invokefunction": {
        "invocation_id": "uuid?", "function_id": "str", "data": "any", "traceparent": "str?", "baggage": "str?",
        "action": "action?", "metadata": "any?", "namespace": "str?", "activation": "obj?",
    },
    "invocationresult": {
        "invocation_id": "uuid", "function_id": "str", "result": "any?", "error": "error?", "traceparent": "str?",
        "baggage": "str?",
    },
    "registerservice": {"id": "str", "name": "str?", "description": "str?", "parent_service_id": "str?"},
    # observe.v1 (0.25; only an engine that announces it handles them), and 0.25's unregistertriggertype
    "observe": {"id": "str", "source": "obj", "target": "obj", "metadata": "any?"},
    "unobserve": {"id": "str"},
    "observerack": {"function_id": "str", "namespace": "str?", "id": "str", "revision": "any", "error": "error?"},
    "invocationsobserved": {"items": "any"},
    "localinvocationstats": {},
    "unregistertriggertype": {"id": "str", "namespace": "str?"},
    "ping": {},
    "pong": {},
    "reattach": {"previous_worker_id": "str", "reattach_token": "str?"},
    "workerregistered": {"worker_id": "str", "reattach_token": "str?"},
    "registrationrejected": {
        "code": "str", "namespace": "str", "worker_name": "str?", "function_id": "str?", "owner_worker_id": "str",
    },
}


def decodes(frame: dict[str, Any]) -> bool:
    """Whether the engine 0.23 would decode this frame (else it logs and drops it)."""
    fields = _FIELDS.get(frame.get("type"))  # type: ignore[arg-type]
    if fields is None:
        return False
    return all(_fits(kind, name in frame, frame.get(name)) for name, kind in fields.items())


def _fits(kind: str, present: bool, value: Any) -> bool:
    if kind.endswith("?"):
        if not present or value is None:
            return True
        kind = kind[:-1]
    elif not present:
        return False
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "obj":
        return isinstance(value, dict)
    if kind == "uuid":
        return _is_uuid(value)
    if kind == "action":
        return isinstance(value, dict) and (
            value.get("type") == "void"
            or (value.get("type") == "enqueue" and isinstance(value.get("queue"), str))
        )
    if kind == "error":
        return (
            isinstance(value, dict) and isinstance(value.get("code"), str) and isinstance(value.get("message"), str)
            and isinstance(value.get("stacktrace"), str | None)
        )
    raise ValueError(f"unknown field kind {kind!r}")


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
