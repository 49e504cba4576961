"""The registry of source kinds: each kind's spec imports no client library, and each client library is imported
only by its own kind's package."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.sources import REGISTRY

_CLIENTS = {"kafka": "aiokafka", "postgres": "asyncpg", "file": "watchfiles"}


def _imported_after(statement: str) -> set[str]:
    probe = (f"import sys\n{statement}\n"
             f"print(' '.join(sorted(m for m in {sorted(_CLIENTS.values())!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


def test_the_registry_holds_the_built_in_kinds_in_documentation_order() -> None:
    assert list(REGISTRY)[:3] == ["kafka", "postgres", "file"]
    assert all(spec.name == name for name, spec in REGISTRY.items())


def test_specs_config_checks_docs_and_render_import_no_client_library() -> None:
    assert _imported_after("import bridge.config, bridge.docs, bridge.render, bridge.metrics, bridge.deadletter, "
                           "bridge.sources.kafka.spec, bridge.sources.postgres.spec, bridge.sources.file.spec") == set()


@pytest.mark.parametrize("kind", sorted(_CLIENTS))
def test_a_kind_source_imports_its_own_client_library_only(kind: str) -> None:
    assert _imported_after(f"import bridge.sources.{kind}.source") == {_CLIENTS[kind]}
