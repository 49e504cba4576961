"""Bounds on what one template render may compute (DESIGN.md §2: templates run on the event loop).

The operations that turn a small input into a huge result are checked before they run: ``**`` (an exponent over
10,000, or an integer result over 1 MiB of decimal digits), ``*`` repeating a string or list, ``+`` concatenating
them, ``%`` and ``format`` widths, the string methods that pad, replace or join, ``int.to_bytes``, ``tojson``'s
indent, and the Jinja filters that pad, indent, wrap, join, batch or slice. What grows by at most a small factor per
step (``~``, captured output, the rendered text) is checked after each step against a larger limit, so a doubling
loop stops early. Repetition itself (loops, calls) is bounded by ``bridge.templates``' step and time budgets.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any

from jinja2.filters import FILTERS as JINJA_FILTERS

from bridge._filters import FilterError

MAX_RESULT = 1 << 20
"""Characters (or bytes) a capped operation may produce: 1 MiB."""
MAX_ITEMS = 100_000
"""Items a capped operation may produce (the sandbox's own limit of ``range``)."""
MAX_EXPONENT = 10_000
MAX_INT_BITS = 3_483_294
"""An integer of MAX_RESULT decimal digits (log2(10) bits a digit): one multiplication of two such takes ~0.3 s."""
MAX_OUTPUT = 16 * MAX_RESULT
"""Characters a whole rendered string, a captured block or a ``~`` concatenation may hold."""


class LimitError(FilterError):
    """A render would compute a result over a limit; shown to the user as is."""


def _too_big(what: str, size: int, limit: int, unit: str = "characters") -> LimitError:
    return LimitError(f"{what} would produce {size} {unit}, over the template limit of {limit}")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, bytearray, list, tuple)) else 0


# ---------------------------------------------------------------------------------------------------------
# operators (SandboxedEnvironment.call_binop)

CHECKED_BINOPS = frozenset({"**", "*", "+", "%"})
"""Intercepted operators: the sandbox routes them to ``call_binop``, and Jinja never folds them at compile time."""


def check_binop(operator: str, left: Any, right: Any) -> None:
    """Raise LimitError if ``left operator right`` would be over a limit."""
    if operator == "**":
        exponent = right if isinstance(right, (int, float)) and not isinstance(right, bool) else None
        if exponent is not None and abs(exponent) > MAX_EXPONENT:
            raise LimitError(f"exponent {exponent} is over the template limit of {MAX_EXPONENT}")
        base, power = _int(left), _int(right)
        if base is not None and power is not None and power > 0 and base.bit_length() * power > MAX_INT_BITS:
            raise _too_big("**", base.bit_length() * power, MAX_INT_BITS, "bits")
    elif operator == "*":
        _check_repeat(left, right)
        _check_repeat(right, left)
        a, b = _int(left), _int(right)
        if a is not None and b is not None and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise _too_big("*", a.bit_length() + b.bit_length(), MAX_INT_BITS, "bits")
    elif operator == "+":
        if isinstance(left, (str, bytes, bytearray)) and isinstance(right, (str, bytes, bytearray)):
            if len(left) + len(right) > MAX_RESULT:
                raise _too_big("+", len(left) + len(right), MAX_RESULT)
        elif (isinstance(left, (list, tuple)) and isinstance(right, (list, tuple))
              and len(left) + len(right) > MAX_ITEMS):
            raise _too_big("+", len(left) + len(right), MAX_ITEMS, "items")
    elif operator == "%" and isinstance(left, (str, bytes)):
        check_percent_format(left, right)


def _check_repeat(sequence: Any, times: Any) -> None:
    count = _int(times)
    if count is None or count <= 0:
        return
    if isinstance(sequence, (str, bytes, bytearray)) and len(sequence) * count > MAX_RESULT:
        raise _too_big("*", len(sequence) * count, MAX_RESULT)
    if isinstance(sequence, (list, tuple)) and len(sequence) * count > MAX_ITEMS:
        raise _too_big("*", len(sequence) * count, MAX_ITEMS, "items")


def check_result(what: str, value: Any, limit: int = MAX_RESULT) -> Any:
    """``value``, or LimitError when it is a string or list longer than ``limit``."""
    if isinstance(value, (str, bytes, bytearray)) and len(value) > limit:
        raise _too_big(what, len(value), limit)
    if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
        raise _too_big(what, len(value), MAX_ITEMS, "items")
    return value


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def check_percent_format(template: str | bytes, args: Any) -> None:
    """Widths and precisions of a printf-style format over MAX_RESULT (given literally or by ``*``)."""
    text = template if isinstance(template, str) else template.decode("latin-1")
    starred = False
    for match in _PERCENT_SPEC.finditer(text):
        for part in match.groups():
            if part == "*":
                starred = True
            elif part is not None and (len(part) > 7 or int(part) > MAX_RESULT):
                raise LimitError(f"format width {part} is over the template limit of {MAX_RESULT}")
    if starred:
        values = args if isinstance(args, tuple) else (args,)
        _check_widths(values, "format width")


def _check_widths(values: Iterable[Any], what: str) -> None:
    for value in values:
        number = _int(value)
        if number is not None and abs(number) > MAX_RESULT:
            raise LimitError(f"{what} {number} is over the template limit of {MAX_RESULT}")


_FORMAT_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def check_brace_format(template: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Widths of a ``str.format`` template over MAX_RESULT (given literally or by a nested field)."""
    for field in _FORMAT_FIELD.findall(template):
        spec = field.partition(":")[2]
        for digits in re.findall(r"\d+", spec):
            if len(digits) > 7 or int(digits) > MAX_RESULT:
                raise LimitError(f"format width {digits} is over the template limit of {MAX_RESULT}")
        if "{" in spec:
            mapping = args[0] if not kwargs and len(args) == 1 and isinstance(args[0], dict) else kwargs
            _check_widths([*args, *mapping.values()], "format width")


# ---------------------------------------------------------------------------------------------------------
# method calls (SandboxedEnvironment.call)


def check_call(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Raise LimitError if calling the method ``target`` would be over a limit; the args to call it with (an
    iterable given to ``join`` is made a list first, to be measured)."""
    target = getattr(target, "__wrapped__", target)  # the sandbox's str.format wrapper
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if isinstance(owner, (str, bytes, bytearray)):
        if name in ("ljust", "rjust", "center", "zfill"):
            _check_widths([*args[:1], kwargs.get("width")], f"{name} width")
        elif name == "expandtabs":
            tabsize = _int(args[0] if args else kwargs.get("tabsize", 8)) or 0
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            size = len(owner) + tabs * max(tabsize, 0)
            if size > MAX_RESULT:
                raise _too_big("expandtabs", size, MAX_RESULT)
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1])
        elif name == "join" and args:
            items = list(args[0])
            _check_join(owner, items)
            return (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], dict):
            widest = max((_length(v) for v in args[0].values()), default=1)
            if len(owner) * widest > MAX_RESULT:
                raise _too_big("translate", len(owner) * widest, MAX_RESULT)
        elif name in ("format", "format_map") and isinstance(owner, str):
            check_brace_format(owner, args, kwargs)
    elif isinstance(owner, int) and name == "to_bytes":
        _check_widths([*args[:1], kwargs.get("length")], "to_bytes length")
    return args


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if not isinstance(text, (str, bytes, bytearray)) or not isinstance(old, type(text)):
        return
    count = len(text) + 1 if not old else text.count(old)  # type: ignore[arg-type]
    size = len(text) + count * (_length(new) - len(old))
    if size > MAX_RESULT:
        raise _too_big("replace", size, MAX_RESULT)


def _check_join(separator: Any, items: list[Any]) -> None:
    if len(items) > MAX_ITEMS:
        raise _too_big("join", len(items), MAX_ITEMS, "items")
    size = _length(separator) * max(len(items) - 1, 0) + sum(_length(item) for item in items)
    if size > MAX_RESULT:
        raise _too_big("join", size, MAX_RESULT)


# ---------------------------------------------------------------------------------------------------------
# Jinja's filters that can blow up, bounded


def _guarded(name: str, check: Callable[..., Any]) -> Callable[..., Any]:
    original = JINJA_FILTERS[name]
    skip = 1 if hasattr(original, "jinja_pass_arg") else 0  # the environment or eval context comes first

    @functools.wraps(original)  # keeps jinja_pass_arg, so Jinja passes what the original expects
    def bounded(*args: Any, **kwargs: Any) -> Any:
        replaced = check(*args[skip:], **kwargs)
        if replaced is not None:
            args = (*args[:skip], replaced, *args[skip + 1:])
        return check_result(name, original(*args, **kwargs))

    return bounded


def _center(value: Any, width: Any = 80) -> None:
    _check_widths([width], "center width")


def _indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    text = str(s)
    step = len(width) if isinstance(width, str) else (_int(width) or 0)
    size = len(text) + (text.count("\n") + 1) * max(step, 0)
    if size > MAX_RESULT:
        raise _too_big("indent", size, MAX_RESULT)


def _wordwrap(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
              break_on_hyphens: bool = True) -> None:
    text = str(s)
    step = _int(width) or 1
    lines = min(len(text), len(text) // max(step, 1) + text.count(" ") + text.count("\n") + 1)
    size = len(text) + lines * (len(wrapstring) if isinstance(wrapstring, str) else 2)
    if size > MAX_RESULT:
        raise _too_big("wordwrap", size, MAX_RESULT)


def _join(value: Any, d: Any = "", attribute: Any = None) -> list[Any]:
    items = list(value)
    if len(items) > MAX_ITEMS:
        raise _too_big("join", len(items), MAX_ITEMS, "items")
    if attribute is None:
        _check_join(str(d), items)
    return items


def _format(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        check_percent_format(value, kwargs or args)


def _replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_replace(str(s), str(old), str(new))


def _batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    _check_widths([linecount], "batch size")
    if _int(linecount) is not None and linecount > MAX_ITEMS:
        raise _too_big("batch", linecount, MAX_ITEMS, "items")


def _slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if _int(slices) is not None and slices > MAX_ITEMS:
        raise _too_big("slice", slices, MAX_ITEMS, "items")


_CHECKS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "join": _join,
    "format": _format,
    "replace": _replace,
    "batch": _batch,
    "slice": _slice,
}
BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {name: _guarded(name, check) for name, check in _CHECKS.items()}
"""Jinja's filters that can make a result far bigger than their input, with their bounds checked first."""


def bounded_join(join: Callable[[Iterable[Any]], str]) -> Callable[[Iterable[Any]], str]:
    """``join`` (Jinja's ``concat``, ``str_join`` or ``markup_join``, for captured blocks and ``~``) refusing a
    result over MAX_OUTPUT characters."""

    def bounded(parts: Iterable[Any]) -> str:
        items = [p if isinstance(p, str) else str(p) for p in parts]
        size = sum(len(p) for p in items)
        if size > MAX_OUTPUT:
            raise _too_big("the text", size, MAX_OUTPUT)
        return join(items)

    return bounded


def bounded_tojson(tojson: Callable[..., str]) -> Callable[..., str]:
    """The ``tojson`` filter refusing an ``indent`` that would make the text over MAX_RESULT: each line of
    indented JSON carries its depth times ``indent`` spaces, so a wide indent on deep data multiplies it."""

    def bounded(value: Any, indent: int | None = None) -> str:
        if indent is not None:
            step = _int(indent)
            if step is None:
                raise LimitError(f"tojson: indent must be an integer, not {type(indent).__name__}")
            if step > 0 and _indented_size(value, step) > MAX_RESULT:
                raise _too_big("tojson with indent", _indented_size(value, step), MAX_RESULT)
        return tojson(value, indent)

    return bounded


def _indented_size(value: Any, step: int) -> int:
    """An upper bound of the indentation ``tojson(value, indent=step)`` adds (stops counting past MAX_RESULT)."""
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= MAX_RESULT:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        for child in children:
            total += 1 + (depth + 1) * step
            stack.append((child, depth + 1))
        total += 1 + depth * step  # the closing bracket's line
    return total
