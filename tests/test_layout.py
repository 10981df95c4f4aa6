"""The package layout's rules: the library never reaches up into the entry points or the registry layer,
the ``isc`` console script resolves, long functions say why they are long."""

from __future__ import annotations

import ast
import importlib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER_LAYERS = ("entrypoints", "registry")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
SIZED_LAYERS = ("isc", "entrypoints", "registry")


def _library_files() -> list[Path]:
    return sorted((ROOT / "isc").rglob("*.py"))


def _upper_layer(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in UPPER_LAYERS


def test_the_isc_library_never_imports_entrypoints_or_registry():
    """Dependencies point one way: entrypoints/ and registry/ use isc/, never the reverse (not even by
    name through importlib: the CLI dispatcher lives in entrypoints/cli.py)."""
    offenders = []
    for path in _library_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str | None] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__", "run_module", "find_spec"):
                    names = [str(node.args[0].value)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if _upper_layer(n)]
    assert not offenders, "isc/ imports an upper layer:\n" + "\n".join(offenders)


def test_the_layout_check_above_is_not_vacuous():
    assert _upper_layer("entrypoints.cli") and _upper_layer("registry.promote") and not _upper_layer("isc.io")
    assert len(_library_files()) > 20


def test_console_script_target_resolves():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["isc"].partition(":")
    assert module == "entrypoints.cli"
    assert callable(getattr(importlib.import_module(module), attr))


def test_no_other_installed_distribution_provides_the_generic_top_level_names():
    """``entrypoints`` and ``registry`` are generic names (PyPI has an ``entrypoints`` module): another
    distribution providing one would shadow ours (or be shadowed). See docs/architecture.md, "Packaging"."""
    owners = packages_distributions()
    for name in UPPER_LAYERS:
        foreign = {d for d in owners.get(name, []) if d.lower().replace("_", "-") != "isc-platform"}
        assert not foreign, f"top-level '{name}' is also installed by {sorted(foreign)}"


def _sized_files() -> list[Path]:
    return sorted(p for layer in SIZED_LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_no_function_over_80_lines_and_no_module_over_500():
    """Rooms a newcomer can read: a function that outgrows 80 lines (decorators and docstring included) is
    split into steps with names, a module that outgrows 500 lines is split by job (isc/extract/ is one)."""
    long_functions, big_modules = [], []
    for path in _sized_files():
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big_modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text, filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - start + 1} lines")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long_functions)
    assert not big_modules, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big_modules)


def test_the_size_check_above_reads_every_layer():
    layers = {p.relative_to(ROOT).parts[0] for p in _sized_files()}
    assert layers == set(SIZED_LAYERS) and len(_sized_files()) > 60


# The commands a user or the driver starts most often; `isc extract` needs torch for its work anyway.
LIGHT_COMMANDS = ["cli", "main", "promote", "train", "tune", "evaluate", "search", "serve", "postprocess"]


def test_light_commands_start_without_importing_torch():
    """Eight ``isc promote`` processes at once (a real race test) paid 1.5 s each when registry.register's
    import of isc.train.config pulled in the training loop; a command loads torch only when it runs work
    that needs it."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for name in {LIGHT_COMMANDS!r}:\n"
            "    importlib.import_module('entrypoints.' + name)\n"
            "print(sorted(m for m in ('torch', 'timm', 'pytorch_metric_learning') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"], out.stdout
