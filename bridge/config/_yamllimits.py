"""Limits on what bridge.yaml (and a schema file it ``$ref``s) may hold, so that every check after reading
stays fast and inside Python's limits: nesting depth, integer size, lone surrogates, file size.
``bridge.config.yamlpos`` applies them while loading; the messages are shared with the other readers.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import Node

# Far deeper than any real config, and shallow enough that every later step (schema checks, templates, docs),
# which recurse once or more per level, stays well inside Python's recursion limit.
MAX_DEPTH = 64
# Python refuses to print integers of more than 4,300 digits; no config number comes near this.
MAX_INTEGER_BITS = 3322  # 10**1000 has 3,322 bits

MAX_FILE_BYTES = 16 * 1024 * 1024  # a config is a few kilobytes; this stops `-c /dev/zero`


def read_capped(path: Path) -> bytes:
    """The bytes of ``path``; OSError(EFBIG) when it holds more than ``MAX_FILE_BYTES``."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB, too large for a config")
    return data


TOO_DEEP = f"the document is nested deeper than {MAX_DEPTH} levels here"
TOO_DEEP_HINT = "flatten this part of the file"
TOO_LARGE = "the number is too large (more than 1,000 digits)"


NOT_TEXT = "holds a lone surrogate escape (\\ud800-\\udfff), which is not a character"  # after "the text"/"the key"
NOT_TEXT_HINT = "write the character itself, or \\U0001F600 for one beyond \\uFFFF"
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    """Whether ``text`` cannot be written as UTF-8 (a ``"\\ud800"`` escape; a non-UTF-8 environment value)."""
    return _SURROGATE.search(text) is not None


def join_surrogates(text: str) -> str | None:
    """``text`` with each ``\\ud83d\\ude00`` pair (YAML keeps the two halves apart) joined into its character;
    None when a half has no partner."""
    try:
        joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    return None if has_surrogate(joined) else joined


def is_huge_int(value: Any) -> bool:
    """Whether ``value`` is an integer beyond ``MAX_INTEGER_BITS`` (Python cannot even print the largest)."""
    return isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS


class DepthLoader(yaml.SafeLoader):
    """SafeLoader that stops composing at ``MAX_DEPTH`` nested collections, at the node that passes it."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # Stopped while scanning: PyYAML's scanner slows down quadratically with `[[[[...` before the
        # composer would see the first of them.
        if self.flow_level >= MAX_DEPTH:
            raise TooDeep(self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:
                raise TooDeep(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class TooDeep(Exception):
    """Nesting passed ``MAX_DEPTH`` at ``mark`` (a PyYAML mark: 0-based line and column)."""

    def __init__(self, mark: Any) -> None:
        super().__init__()
        self.mark = mark
