"""The ``isc`` console command: ``isc <subcommand> [options]``.

Each subcommand is the ``main(argv)`` of a module in ``entrypoints/`` -- the same module that the
MLproject entry point of that name runs (``python -m entrypoints.<module>``, through
:func:`entrypoints._run.cli`) -- so the CLI and ``mlflow run`` behave identically. The dispatch lives
here, on the entry-point side: the ``isc`` library never imports ``entrypoints`` (tests/test_layout.py).
"""

from __future__ import annotations

import importlib
import logging
import sys

from isc.errors import ISCError

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("entrypoints.make_mini", "build a DISC21-shaped mini dataset (isc data make-mini ...)"),
    "baseline": ("entrypoints.baseline", "perceptual-hash / thumbnail baseline descriptors + evaluation"),
    "evaluate": ("entrypoints.evaluate", "score a descriptor h5 with the official ISC21 protocol"),
    "train": ("entrypoints.train", "train a descriptor model (one recipe stage)"),
    "extract": ("entrypoints.extract", "extract query/reference/training descriptors"),
    "settings": ("entrypoints.settings", "choose a model's extraction settings (size, TTA) on the val split"),
    "postprocess": ("entrypoints.postprocess", "negative embedding subtraction"),
    "match": ("entrypoints.match", "matching-track CSV from descriptors"),
    "tune": ("entrypoints.tune", "Optuna study over margins, memory size, lr"),
    "promote": ("entrypoints.promote", "register the best evaluated model and move @champion"),
    "search": ("entrypoints.search", "find copies of query images with a registered model"),
    "export": ("entrypoints.export", "a registered model as a standalone TorchScript/ONNX file"),
    "main": ("entrypoints.main", "the whole pipeline, data to promoted champion"),
}


def _usage() -> str:
    lines = ["usage: isc <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "isc <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"isc: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_entrypoint(COMMANDS[name][0], rest)


def run_entrypoint(module: str, argv: list[str]) -> int:
    """Run ``module.main(argv)``; an ``ISCError`` becomes one ``error:`` line and exit status 2.

    Log records and the error line pass through :mod:`isc.redact`, so a password in a URI or a
    command line never reaches the terminal or a captured log.
    """
    from isc.redact import install_log_redaction, redact

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mod = importlib.import_module(module)
    install_log_redaction()  # after the import: MLflow adds its own handlers when imported
    try:
        return int(mod.main(argv) or 0)
    except ISCError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
