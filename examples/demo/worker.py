"""The demo's function author: a small iii worker (iii-sdk 0.25) that binds ``demo::print-file`` to the bridge's
``inbox`` trigger type (the default ./bridge.yaml) and prints every call it receives.

    III_URL=ws://127.0.0.1:49134 python examples/demo/worker.py

`make demo` runs it next to the bundled test engine and `bridge up`. Against a real iii engine it works the same
way: point ``III_URL`` at the engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import Any

from iii import InitOptions, register_worker

FUNCTION_ID = "demo::print-file"
TRIGGER_TYPE = "inbox"  # the source id in bridge.yaml


class _NoDeprecationNotice(logging.Filter):
    """iii-sdk 0.25 logs that the trigger API is deprecated (engines do not speak its replacement yet)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is deprecated" not in record.getMessage()


def main() -> int:
    logging.getLogger("iii.iii").addFilter(_NoDeprecationNotice())
    url = os.environ.get("III_URL", "ws://127.0.0.1:49134")
    iii = register_worker(url, InitOptions(worker_name="demo-worker", otel={"enabled": False},
                                           enable_metrics_reporting=False))
    calls = 0

    async def print_file(payload: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        shown = {k: v for k, v in payload.items() if k != "_caller_worker_id"} if isinstance(payload, dict) else payload
        stamp = time.strftime("%H:%M:%S")
        print(f"[worker] {stamp} call #{calls} of {FUNCTION_ID}: {json.dumps(shown, ensure_ascii=False)}", flush=True)
        return {"ok": True}

    iii.register_function(FUNCTION_ID, print_file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the same notice, as a warning
        iii.register_trigger({"type": TRIGGER_TYPE, "function_id": FUNCTION_ID, "config": {}})
    print(f"[worker] {FUNCTION_ID} is bound to the trigger type {TRIGGER_TYPE!r} at {url}; waiting for calls",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    iii.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
