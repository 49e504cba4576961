"""Cost of strict decoding on the hot path: µs per typical value, plain ``json`` against
:func:`bridge.strictjson.loads`, same run, best of several rounds (the machine may be busy: compare the two
figures of one run, not across runs).

    python bench/strict_decode.py [--rounds 7] [--number 100000]

"plain" is what the sources did before strict decoding: UTF-8 decode, then ``json.JSONDecoder`` refusing NaN and
Infinity. Also timed: a large document (1 MB, more than 512 brackets: the depth scan runs) both ways.
"""

from __future__ import annotations

import argparse
import functools
import json
import timeit
from typing import Any

from bridge.strictjson import loads


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_PLAIN = json.JSONDecoder(parse_constant=_no_constants)


def plain(raw: bytes) -> Any:
    return _PLAIN.decode(raw.decode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=100_000)
    args = parser.parse_args()
    typical = json.dumps({
        "order_id": 123456, "customer": {"id": "c-42", "name": "Ada Lovelace", "tier": "gold"},
        "items": [{"sku": "A-1", "qty": 2, "price": 9.99}, {"sku": "B-7", "qty": 1, "price": 24.5}],
        "currency": "EUR", "note": "leave at door",
    }).encode()
    large = json.dumps([{"a": [1, 2, {"b": "x[y"}], "c": 1.5} for _ in range(30_000)]).encode()
    for name, raw, number in (("typical", typical, args.number), ("large", large, max(1, args.number // 20_000))):
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, so both see the same load
            for label, decode in (("plain", plain), ("strict", loads)):
                took = timeit.timeit(functools.partial(decode, raw), number=number) / number
                best[label] = min(best.get(label, took), took)
        unit, scale = ("µs", 1e6) if name == "typical" else ("ms", 1e3)
        print(f"{name} value ({len(raw):,} bytes): plain {best['plain'] * scale:.2f} {unit}, "
              f"strict {best['strict'] * scale:.2f} {unit} (x{best['strict'] / best['plain']:.2f})")


if __name__ == "__main__":
    main()
