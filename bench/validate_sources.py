"""`bridge validate` of a generated config with many sources: wall time of the whole command.

    python bench/validate_sources.py [--sources 50] [--rounds 5]

Writes a bridge.yaml with N sources (Kafka, Postgres LISTEN and file sources in turn, each with a ``when``, a
payload template, a ``bind_schema`` and a ``payload_schema``) and times ``bridge validate -c`` as a user runs it:
a fresh process, imports included. Outbox sources are left out: validate checks their table over a connection,
which would time the database rather than the bridge. Alongside, the same for a one-source config
and for ``python -c pass`` (the interpreter's own start), all interleaved; the medians are printed. Target (issue
13): 50 sources in at most 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_KINDS = (
    "    kafka:\n      bootstrap_servers: 127.0.0.1:9092\n      topics: [orders-{i}]\n      ordering: key\n",
    "    postgres:\n      dsn: postgresql://127.0.0.1/app\n      channels: [orders_{i}]\n",
    "    file:\n      path: ./inbox-{i}\n      include: ['*.json']\n",
)

_COMMON = """\
    when: "{{{{ event.id is defined }}}}"
    payload:
      id: "{{{{ event.id }}}}"
      source: "{{{{ source.id }}}}"
      region: "{{{{ binding.config.region | default('eu') }}}}"
    bind_schema:
      type: object
      properties:
        region: {{type: string, enum: [eu, us], default: eu}}
    payload_schema:
      type: object
      required: [id, source]
      properties:
        id: {{type: string}}
        source: {{type: string}}
        region: {{type: string}}
"""


def config_text(sources: int) -> str:
    lines = ["version: 1", "engine:", "  url: ws://127.0.0.1:49134", "state_dir: state", "sources:"]
    for i in range(sources):
        lines.append(f"  source_{i}:\n    description: generated source {i}\n"
                     + _KINDS[i % len(_KINDS)].format(i=i) + _COMMON.format())
    return "\n".join(lines) + "\n"


def _wall(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    spent = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for i in range(args.sources):
            (scratch / f"inbox-{i}").mkdir()
        (scratch / "many.yaml").write_text(config_text(args.sources))
        (scratch / "one.yaml").write_text(config_text(1))
        runs = {
            f"validate {args.sources} sources": [sys.executable, "-m", "bridge", "validate", "-c", "many.yaml"],
            "validate 1 source": [sys.executable, "-m", "bridge", "validate", "-c", "one.yaml"],
            "python -c pass": [sys.executable, "-c", "pass"],
        }
        _wall(next(iter(runs.values())), scratch)  # warm the file cache and the bytecode once
        walls: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(args.rounds):
            for label, command in runs.items():
                walls[label].append(_wall(command, scratch))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: median wall of {args.rounds} interleaved runs")
    for label, values in walls.items():
        print(f"  {label:<22} {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    many = statistics.median(walls[f"validate {args.sources} sources"])
    verdict = "met" if many <= 0.5 else "MISSED"
    print(f"bridge validate, {args.sources} sources: {many:.3f} s (target <= 0.5 s: {verdict})")


if __name__ == "__main__":
    main()
