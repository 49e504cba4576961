"""Masking secrets wherever the config is printed or logged (DESIGN.md §1): values of secret keys (password,
token, secret, SASL fields) and credentials inside URLs and DSNs. ``bridge.config`` exports these; the
config checks use them so that no diagnostic echoes a secret either.

A URL's credentials are everything between ``scheme://`` and the LAST ``@`` of the URL (passwords may hold an
unencoded ``@``, ``#``, ``?`` or ``/``, which ``urllib.parse.urlsplit`` would read as the end of the host).
When in doubt this masks too much rather than too little.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"
_SECRET_NAMES = frozenset({"password", "passwd", "secret", "token", "api_key", "apikey", "access_key",
                           "secret_key", "private_key"})
# Keys whose values are not secret as a whole but may carry credentials (shown with those masked).
CREDENTIAL_KEYS = frozenset({"dsn", "url", "bootstrap_servers"})
_SECRET_WORDS = ("password", "passwd", "token", "secret", "apikey", "api_key")
_PASSWORD_PAIR = re.compile(r"((?:^|(?<=[\s?&;]))\w*(?:password|passwd|token|secret|api_?key)\w*\s*=\s*)"
                            r"('(?:[^'\\]|\\.)*'|[^&\s;]*)", re.IGNORECASE)
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")


def is_secret_key(name: str) -> bool:
    """Whether a key's whole value is a secret: password, token, secret…, and SASL settings."""
    lowered = name.lower()
    return (lowered in _SECRET_NAMES or lowered.endswith(("_password", "_secret", "_token"))
            or (lowered.startswith("sasl_") and lowered != "sasl_mechanism"))


def _scheme_start(text: str, sep: int, floor: int) -> int:
    """Where the scheme before ``://`` at ``sep`` starts (``sep`` when there is none)."""
    start = sep
    while start > floor and text[start - 1] in _SCHEME_CHARS:
        start -= 1
    while start < sep and not text[start].isalpha():
        start += 1
    return start


def _mask_urls(text: str) -> str:
    """``scheme://user:password@host…`` → ``scheme://user:***@host…``, in one linear pass."""
    out: list[str] = []
    done = 0
    sep = text.find("://")
    while sep >= 0:
        next_sep = text.find("://", sep + 3)
        # The URL ends at whitespace or where the next URL's scheme starts (a comma-separated list of URLs).
        end = len(text) if next_sep < 0 else _scheme_start(text, next_sep, sep + 3)
        space = next((i for i in range(sep + 3, end) if text[i].isspace()), end)
        at = text.rfind("@", sep + 3, space)
        if _scheme_start(text, sep, done) < sep and at >= 0:
            userinfo = text[sep + 3 : at]
            user, colon, password = userinfo.partition(":")
            if colon and password:
                out.append(text[done : sep + 3] + f"{user}:{REDACTED}")
                done = at
        sep = next_sep
    out.append(text[done:])
    return "".join(out)


def redact_dsn(dsn: str) -> str:
    """``dsn`` with passwords masked: ``postgresql://app:***@db/x``, ``host=db password=***``, ``?password=***``
    (and ``token=``, ``secret=``, ``api_key=`` pairs).
    User names stay (they help to debug a failed login)."""
    masked = _mask_urls(dsn) if "://" in dsn else dsn
    lowered = masked.lower()
    if not any(word in lowered for word in _SECRET_WORDS):
        return masked
    return _PASSWORD_PAIR.sub(lambda m: m.group(1) + REDACTED, masked)


def redact_servers(servers: str) -> str:
    """A Kafka ``bootstrap_servers`` list with credentials masked, with or without a scheme: ``u:***@k1:9092``."""
    items = []
    for item in servers.split(","):
        at = item.rfind("@")
        user, colon, _ = item[: max(at, 0)].partition(":")
        items.append(f"{user}:{REDACTED}{item[at:]}" if at >= 0 and colon and "://" not in item else item)
    return redact_dsn(",".join(items))


def redact_value(key: str, value: Any) -> Any:
    """``value`` as shown for the key ``key``."""
    if value is None:
        return None
    if is_secret_key(key):
        return REDACTED
    if key == "bootstrap_servers" and isinstance(value, str):
        return redact_servers(value)
    return redact(value)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, config dataclasses, strings) fit to print or log: values of secret
    keys (password, token, secret, SASL password) become ``***`` and credentials in URLs and DSNs are masked."""
    if isinstance(obj, str):
        return redact_dsn(obj)
    if isinstance(obj, Mapping):
        return {k: redact_value(k, v) if isinstance(k, str) else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            new = redact_value(f.name, value)
            if new is not value and new != value:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj
