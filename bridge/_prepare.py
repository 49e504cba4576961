"""The steps between an event and a call, for one binding: ``when``, the payload templates, ``payload_schema``.

Live delivery (``bridge.dispatch``) and ``bridge test`` both run these, so a test case sees exactly what a bound
function would get. Nothing here touches the engine (the condition function is called by the dispatcher).
"""

from __future__ import annotations

from typing import Any

from bridge.config.schemas import PayloadValidator
from bridge.errors import RenderError
from bridge.templates import CompiledTree, CompiledWhen

__all__ = ["prepare_payload"]


def prepare_payload(
    ctx: dict[str, Any],
    view: dict[str, Any],
    when: CompiledWhen | None,
    payload: CompiledTree | None,
    payload_check: PayloadValidator | None,
) -> tuple[bool, Any]:
    """``(False, None)`` when ``when`` filters the event out, else ``(True, payload)``; the payload is ``view``
    itself when the source has no payload templates.

    Raises RenderError (a template failed, or the payload rendered null) or PayloadSchemaError.
    """
    if when is not None and not when.evaluate(ctx):
        return False, None
    rendered = payload.render(ctx) if payload is not None else view
    if rendered is None:
        raise RenderError("payload rendered null; the SDK cannot send a null payload")
    if payload_check is not None:
        payload_check.check(rendered)
    return True, rendered
